"""The systemd units in ``contrib/systemd``: checked by systemd itself
(``systemd-analyze verify``: no error, no warning), and their commands run
for real -- ExecStart, ExecReload and the stop -- with the paths pointed
at this checkout (the test venv's twistd, a temporary spool and
configuration, a free port on loopback).
"""

from __future__ import annotations

import shlex
import signal
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TWISTD, USERS, free_port, wait_for_port, write_config
from tests.e2e.test_lifecycle import RELOADED, _env, client, notify, rcpt_code, reaped  # noqa: F401 (notify: a fixture)

UNITS = ROOT / "contrib" / "systemd"
PLAIN = UNITS / "mailguard.service"
ACTIVATED = UNITS / "socket-activated" / "mailguard.service"
SOCKET = UNITS / "socket-activated" / "mailguard.socket"
NEWBIE = ("newbie", "example.com", "newbie-secret", True)


def settings(unit: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, as systemd reads a unit: comments dropped,
    backslash continuations joined."""
    out: dict[tuple[str, str], list[str]] = {}
    section, pending = "", ""
    for raw in unit.read_text().split("\n"):
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def one(unit: Path, section: str, key: str) -> str:
    [value] = settings(unit)[(section, key)]
    return value


def local_copy(unit: Path, directory: Path) -> Path:
    """The unit with its twistd pointed at the test venv's (verify checks
    that ExecStart exists)."""
    directory.mkdir(exist_ok=True)
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace("/opt/mailguard/bin/twistd", TWISTD))
    return copy


@pytest.mark.parametrize("units", [[PLAIN], [SOCKET, ACTIVATED]], ids=["plain", "socket-activated"])
def test_systemd_analyze_verify_finds_nothing(units, tmp_path):
    copies = [local_copy(u, tmp_path / "units") for u in units]
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, copies)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""  # warnings too: an unknown key is only a warning


def test_the_units_say_what_the_docs_say():
    for unit in (PLAIN, ACTIVATED):
        assert one(unit, "Service", "Type") == "notify"
        assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
        argv = shlex.split(one(unit, "Service", "ExecStart"))
        assert argv[:3] == ["/opt/mailguard/bin/twistd", "--nodaemon", "--pidfile="]
        assert float(one(unit, "Service", "TimeoutStopSec")) > 30 + 5  # SmtpShutdownGrace + LINGER
    name = one(SOCKET, "Socket", "FileDescriptorName")
    assert f"systemd:domain=INET6:name={name}" in one(ACTIVATED, "Service", "ExecStart")


def command(unit: Path, tmp: Path, port: int, cfg: Path) -> list[str]:
    """The unit's ExecStart, with this machine's paths."""
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    swap = {"/opt/mailguard/bin/twistd": TWISTD, "/etc/mailguard/mailserver.cfg": str(cfg),
            "/var/lib/mailguard": str(tmp / "spool"), "tcp:25": f"tcp:{port}:interface=127.0.0.1"}
    return [swap.get(a, a) for a in argv]


def reload_as_systemd(unit: Path, pid: int) -> None:
    argv = shlex.split(one(unit, "Service", "ExecReload").replace("$MAINPID", str(pid)))
    subprocess.run(argv, check=True, timeout=30)


def start(argv: list[str], tmp: Path, env: dict[str, str]) -> subprocess.Popen:
    """The service's process, its output in C{tmp/journal}."""
    with open(tmp / "journal", "wb") as journal:
        return subprocess.Popen(argv, cwd=str(tmp), env=env, stdout=journal, stderr=subprocess.STDOUT)


def test_the_plain_units_commands_start_reload_and_stop(tmp_path, notify):
    cfg = write_config(tmp_path / "mailserver.cfg")
    port = free_port()
    with reaped(start(command(PLAIN, tmp_path, port, cfg), tmp_path, _env(notify.env))) as proc:
        assert notify.until("READY=1").startswith("READY=1\nMAINPID=" + str(proc.pid))
        write_config(cfg, users=USERS + (NEWBIE,))
        reload_as_systemd(PLAIN, proc.pid)
        assert notify.until("READY=1") == RELOADED
        c = client(port)
        assert rcpt_code(c, "newbie@example.com") == 250
        proc.send_signal(signal.SIGTERM)  # KillSignal
        assert notify.until("STOPPING=1")
        assert c.getreply()[0] == 421
        assert proc.wait(60) == 0
    journal = (tmp_path / "journal").read_text()  # twistd -n logs to stdout: the journal
    assert "configuration reloaded" in journal and "Traceback" not in journal


def test_the_socket_activated_pair_runs_under_systemd_socket_activate(tmp_path, notify):
    """The listening socket comes from systemd (here its
    ``systemd-socket-activate``, which starts the service at the first
    connection and execs it: the same process); mailguard adopts it by
    the socket unit's name, on IPv6 loopback as ``ListenStream=25`` is."""
    cfg = write_config(tmp_path / "mailserver.cfg")
    port = free_port()
    name = one(SOCKET, "Socket", "FileDescriptorName")
    env = _env(notify.env)
    argv = ["systemd-socket-activate", "-l", f"[::1]:{port}", f"--fdname={name}",
            "-E", f"PYTHONPATH={env['PYTHONPATH']}", "-E", f"NOTIFY_SOCKET={notify.path}",
            *command(ACTIVATED, tmp_path, port, cfg)]
    with reaped(start(argv, tmp_path, env)) as proc:
        wait_for_port("::1", port, proc)  # systemd-socket-activate listens at once
        c = smtplib.SMTP("::1", port, timeout=30)  # mailguard, started meanwhile, greets it
        assert notify.until("READY=1")
        c.ehlo("client.test")
        c.sendmail("a@sender.test", ["john@example.com"], b"Subject: activated\r\n\r\nHi.\r\n")
        write_config(cfg, users=USERS + (NEWBIE,))
        reload_as_systemd(ACTIVATED, proc.pid)
        assert notify.until("READY=1") == RELOADED
        assert rcpt_code(c, "newbie@example.com") == 550  # begun before the reload
        fresh = smtplib.SMTP("::1", port, timeout=30)
        fresh.ehlo("client.test")
        assert rcpt_code(fresh, "newbie@example.com") == 250
        proc.send_signal(signal.SIGTERM)
        assert c.getreply()[0] == 421
        assert proc.wait(60) == 0
    new = tmp_path / "spool" / "mail" / "example.com" / "john" / "Maildir" / "new"
    assert len(list(new.iterdir())) == 1
