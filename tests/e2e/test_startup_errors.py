"""Each start-up mistake is one line on standard error, exit status 1, no
traceback -- in the foreground (``-n``) and as a daemon (the line comes
before twistd forks, from the process the administrator started).

Every mistake runs as a real ``twistd mailguard``; all of them start at
once (they only fail), and each test reads its own outcome.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import Twistd, free_port, write_config
from tests.e2e.startup_helpers import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_NET_BIND_SERVICE,
    IS_ROOT,
    env,
    public_dir,
    remove,
    twistd_command,
    without,
)


class Lab:
    """The files and sockets the mistakes are made with."""

    def __init__(self, tmp: Path, public: Path) -> None:
        self.tmp = tmp
        self.public = public
        self.cfg = write_config(tmp / "mailserver.cfg")
        self.broken = tmp / "broken.cfg"
        self.broken.write_text('<?xml version="1.0"?>\n<config>\n  <variable name="VRFYEnabled">1</variable>\n'
                               '  <variable name="Oops">\n</config>\n')
        self.gateway = tmp / "gateway.cfg"
        self.gateway.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<config>\n'
                                '  <variable name="InternetHostname">mx.example.com</variable>\n'
                                '  <variable name="GatewayEnabled">1</variable>\n</config>\n')
        # A mailguard running on its spool.
        self.running_spool = public / "running"
        port = free_port()
        self.running = Twistd(public, ["--config", str(self.cfg), "--spool", str(self.running_spool),
                                       "--smtp", f"tcp:{port}:interface=127.0.0.1"], port)
        self.in_flight = self.running_spool / "incoming" / "a-message-being-received"
        self.in_flight.write_bytes(b"Subject: half\r\n")
        # A port somebody else holds.
        self.holder = socket.socket()
        self.holder.bind(("127.0.0.1", 0))
        self.holder.listen()
        self.busy = self.holder.getsockname()[1]
        # Directories only their owner may enter or write.
        self.closed = public / "closed"
        self.closed.mkdir(mode=0o700)
        self.nobodys = public / "nobodys"
        self.nobodys.mkdir(mode=0o755)
        self.rootlog = public / "rootlog"
        self.rootlog.mkdir(mode=0o755)
        if IS_ROOT:
            os.chown(self.nobodys, 65534, 65534)

    def spool(self, name: str) -> str:
        return str(self.public / f"spool-{name}")

    def close(self) -> None:
        self.holder.close()
        self.running.stop()


@dataclass
class Mistake:
    id: str
    args: Callable[[Lab], list[str]]
    says: Callable[[Lab], list[str]]
    twistd_args: tuple[str, ...] = ()
    preexec: Callable | None = None
    root: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)


def loopback(port: int | str) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


MISTAKES = [
    Mistake("port-in-use",
            lambda lab: ["--config", str(lab.cfg), "--smtp", loopback(lab.busy)],
            lambda lab: [f"mailguard: --smtp {loopback(lab.busy)}: cannot listen on 127.0.0.1:{lab.busy}: "
                         "address already in use (another server listens there: stop it or choose another port)"]),
    Mistake("port-below-1024-without-privilege",
            lambda lab: ["--config", str(lab.cfg), "--smtp", loopback(25)],
            lambda lab: ["mailguard: --smtp tcp:25:interface=127.0.0.1: cannot listen on 127.0.0.1:25: "
                         "permission denied (a port below 1024 needs root: start twistd as root with "
                         "--uid/--gid, which drops privileges after binding)"],
            preexec=without(CAP_NET_BIND_SERVICE), root=True),
    Mistake("spool-of-a-running-mailguard",
            lambda lab: ["--config", str(lab.cfg), "--smtp", loopback(0), "--spool", str(lab.running_spool)],
            lambda lab: [f"mailguard: --spool {lab.running_spool}: another mailguard is running on this spool "
                         f"(it holds {lab.running_spool / 'control.lock'}); stop it, or choose another --spool"]),
    Mistake("misspelt-endpoint-parameter",
            lambda lab: ["--config", str(lab.cfg), "--smtp", "tcp:2525:interfce=127.0.0.1"],
            lambda lab: ['mailguard: --smtp tcp:2525:interfce=127.0.0.1: unknown parameter "interfce"']),
    Mistake("port-out-of-range",
            lambda lab: ["--config", str(lab.cfg), "--smtp", "tcp:99999"],
            lambda lab: ["mailguard: --smtp tcp:99999: the port must be 0 to 65535"]),
    Mistake("unknown-endpoint-type",
            lambda lab: ["--config", str(lab.cfg), "--submission", "tpc:587"],
            lambda lab: ["mailguard: --submission tpc:587: unknown endpoint type 'tpc'"]),
    Mistake("systemd-without-sockets",
            lambda lab: ["--config", str(lab.cfg), "--smtp", "systemd:domain=INET:name=smtp"],
            lambda lab: ["mailguard: --smtp systemd:domain=INET:name=smtp: systemd passed no socket: "
                         "LISTEN_FDS is not set"]),
    Mistake("same-endpoint-twice",
            lambda lab: ["--config", str(lab.cfg), "--smtp", loopback(lab.busy + 1),
                         "--submission", loopback(lab.busy + 1)],
            lambda lab: [f"mailguard: --submission {loopback(lab.busy + 1)}: the endpoint is given twice "
                         "(also as --smtp)"]),
    Mistake("unknown-option",
            lambda lab: ["--smpt", loopback(2525)],
            lambda lab: ["mailguard: option --smpt not recognized"]),
    Mistake("missing-config",
            lambda lab: ["--config", str(lab.tmp / "nonexistent.cfg")],
            lambda lab: [f"{lab.tmp / 'nonexistent.cfg'}:", "cannot read: No such file or directory"]),
    Mistake("broken-config",
            lambda lab: ["--config", str(lab.broken)],
            lambda lab: [f"{lab.broken}:5:"]),
    Mistake("missing-tls-files",
            lambda lab: ["--config", str(lab.cfg), "--tls-cert", str(lab.tmp / "cert.pem"),
                         "--tls-key", str(lab.tmp / "key.pem")],
            lambda lab: [f"mailguard: --tls-cert/--tls-key: {lab.tmp / 'cert.pem'}: No such file or directory"]),
    Mistake("gateway-without-domains",
            lambda lab: ["--config", str(lab.gateway), "--relay-host", "127.0.0.1:2"],
            lambda lab: [f"{lab.gateway}:4: GatewayEnabled is 1 but no domain is listed"]),
    Mistake("no-config-on-a-public-address",
            lambda lab: ["--smtp", "tcp:0:interface=0.0.0.0"],
            lambda lab: ["mailguard: --smtp tcp:0:interface=0.0.0.0 listens on 0.0.0.0:",
                         "which is not loopback: without --config mailguard runs the embedded example, "
                         "whose accounts and passwords are published; pass --config FILE"]),
    Mistake("spool-that-cannot-be-created",
            lambda lab: ["--config", str(lab.cfg), "--smtp", loopback(0),
                         "--spool", str(lab.nobodys / "spool")],
            lambda lab: [f"mailguard: --spool {lab.nobodys / 'spool'}: cannot create {lab.nobodys / 'spool'}: "
                         "permission denied (running as root"],
            preexec=without(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), root=True),
    Mistake("spool-the-user-cannot-reach",
            lambda lab: ["--config", str(lab.cfg), "--smtp", loopback(0),
                         "--spool", str(lab.closed / "spool")],
            lambda lab: [f"mailguard: --spool {lab.closed}: nobody (uid 65534, gid 65534) cannot enter "
                         f"(it is above {lab.closed / 'spool'}): give it to that user (chown/chmod) "
                         "or choose another --spool"],
            twistd_args=("--uid", "nobody", "--gid", "nogroup"), root=True),
    Mistake("security-log-the-user-cannot-rotate",
            lambda lab: ["--config", str(lab.cfg), "--smtp", loopback(0),
                         "--security-log", str(lab.rootlog / "security.log")],
            lambda lab: [f"mailguard: --security-log {lab.rootlog}: nobody (uid 65534, gid 65534) cannot "
                         "write (to rotate security.log)"],
            twistd_args=("--uid", "nobody", "--gid", "nogroup"), root=True),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Start every mistake, in the foreground and as a daemon, all at once;
    (returncode, stdout, stderr, its directory) for each."""
    public = public_dir("mailguard-startup-")
    lab = Lab(tmp_path_factory.mktemp("startup"), public)
    running = {}
    try:
        for mistake in MISTAKES:
            if mistake.root and not IS_ROOT:
                continue
            for mode in ("foreground", "daemon"):
                where = public / f"{mistake.id}-{mode}"
                where.mkdir()
                args = mistake.args(lab)
                if "--spool" not in args:
                    args += ["--spool", lab.spool(f"{mistake.id}-{mode}")]
                cmd = twistd_command(where, args, daemon=mode == "daemon", twistd_args=mistake.twistd_args)
                running[mistake.id, mode] = (subprocess.Popen(
                    cmd, cwd=str(where), env=env(**mistake.extra_env), preexec_fn=mistake.preexec,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), where)
        out = {}
        for key, (proc, where) in running.items():
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            out[key] = (proc.returncode, stdout, stderr, where)
        yield lab, out
    finally:
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lab.close()
        remove(public)


@pytest.mark.parametrize("mode", ["foreground", "daemon"])
@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_a_start_up_mistake_is_one_line(outcomes, mistake, mode):
    if mistake.root and not IS_ROOT:
        pytest.skip("needs root")
    lab, out = outcomes
    returncode, stdout, stderr, where = out[mistake.id, mode]
    log = (where / "twistd.log").read_text() if (where / "twistd.log").exists() else ""
    assert "Traceback" not in stdout + stderr + log
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for fragment in mistake.says(lab):
        assert fragment in lines[0]
    assert returncode == 1
    # Nothing was left running or behind: a daemon never forked.
    assert not (where / "twistd.pid").exists()


def test_a_second_mailguard_leaves_the_running_ones_spool_alone(outcomes):
    """Refused before the store is opened, which would have removed the
    messages the running one is receiving."""
    lab, out = outcomes
    assert out["spool-of-a-running-mailguard", "foreground"][0] == 1
    assert lab.in_flight.read_bytes() == b"Subject: half\r\n"
    assert lab.running.proc.poll() is None
