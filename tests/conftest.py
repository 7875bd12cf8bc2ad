"""Shared fixtures: real twistd processes on loopback, and config files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "mailserver.cfg.example"
# The real twistd script of the interpreter running the tests.
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"twistd exited early with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def eventually(predicate, timeout: float = 30.0):
    """Poll until C{predicate()} is true, and return its value (false after
    C{timeout}): bounded polling instead of a sleep, with a timeout that
    only a broken test reaches, never a slow machine."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _limit_files(n: int) -> None:
    """In the child: an open-file limit of C{n} that it cannot raise."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


class Twistd:
    """A real ``twistd -n mailguard`` process.  C{twistd_args} go before
    ``mailguard`` (``--logger ...``); C{stdout}: a file for its standard
    output (a JSON log, say), instead of a pipe nobody reads; C{prefix}: a
    command to run it under (``strace -f -o FILE``, say)."""

    def __init__(self, tmp: Path, args: list[str], smtp_port: int, wait_port: int | None = None,
                 env: dict[str, str] | None = None, logfile: bool = True,
                 twistd_args: tuple[str, ...] = (), stdout: Path | None = None, nofile: int | None = None,
                 prefix: tuple[str, ...] = ()):
        """C{env}: more environment variables; C{logfile=False}: twistd
        logs to its standard output (kept in C{self.logfile} all the same);
        C{nofile}: an open-file limit it cannot raise."""
        self.tmp = tmp
        self.port = smtp_port
        self.spool = tmp / "spool"
        self.logfile = tmp / "twistd.log"
        env = {**os.environ, **(env or {})}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        log_args = ["--logfile", str(self.logfile)] if logfile else []
        cmd = [*prefix, TWISTD, *log_args, *twistd_args, "--pidfile", "", "-n", "mailguard", "--spool",
               str(self.spool), *args]
        if stdout is not None:
            out = open(stdout, "ab")
        else:
            out = subprocess.PIPE if logfile else open(self.logfile, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(tmp), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=None if nofile is None else lambda: _limit_files(nofile))
        if out is not subprocess.PIPE:
            out.close()
        try:
            wait_for_port("127.0.0.1", wait_port or smtp_port, self.proc)
        except RuntimeError:
            exited = self.proc.poll() is not None and self.proc.stdout is not None
            said = self.proc.stdout.read().decode(errors="replace") if exited else ""
            self.stop()
            raise RuntimeError(self.output() + said)

    def output(self) -> str:
        text = ""
        if self.logfile.exists():
            text += self.logfile.read_text(errors="replace")
        return text

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()

    def maildir_files(self, mailbox: str) -> list[Path]:
        local, domain = mailbox.split("@")
        new = self.spool / "mail" / domain / local / "Maildir" / "new"
        return sorted(new.iterdir()) if new.exists() else []


@pytest.fixture
def twistd(tmp_path):
    """Factory fixture: twistd(args..., config=...) starts a server."""
    started: list[Twistd] = []

    def start(*args: str, config: str | Path | None = None, port: int | None = None, **kw) -> Twistd:
        port = port or free_port()
        full = list(args)
        if config is not None:
            full = ["--config", str(config), *full]
        if not any(a.startswith("--smtp=") or a == "--smtp" for a in full):
            full += ["--smtp", f"tcp:{port}:interface=127.0.0.1"]
        server = Twistd(tmp_path, full, port, **kw)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


# (name, domain, password, enabled)
USERS = (
    ("john", "example.com", "john-secret", True),
    ("jane", "example.com", "jane-secret", True),
    # Kerio's SHA: form of "sam-secret" (fixed salt, so the file is stable)
    ("sam", "example.com",
     "SHA:001122334455667759553be30e3c7a03a6ea503cfda13919b12d3309", True),
    ("former", "example.com", "former-secret", False),
)
# (group, address)
GROUPS = (("Trusted", "127.0.0.2"), ("NoDelay", "127.0.0.4"))
# (name, domain, deliver to)
ALIASES = (("sales", "example.com", "john@example.com,jane@example.com"),)
DEFAULT_VARIABLES = {
    "InternetHostname": "mx.example.com",
    "VRFYEnabled": "1",
    "SmtpGreetingDelay": "0",
    "RelayControlIpGroupEnabled": "1",
    "RelayControlIpGroup": "Trusted",
}


def write_config(path: Path, variables: dict[str, str] | None = None, body: str = "", *,
                 users=USERS, groups=GROUPS, aliases=ALIASES, defaults=DEFAULT_VARIABLES) -> Path:
    """A small mailserver.cfg: example.com (alias example.net) with john,
    jane, sam (a SHA: password), a disabled user, the alias sales, the
    relay group "Trusted" = 127.0.0.2 and the group "NoDelay" = 127.0.0.4;
    no greeting delay, VRFY on.  C{variables} override or add scalars."""
    def var(name, value):
        return f'<variable name="{name}">{value}</variable>'

    variables = {**defaults, **(variables or {})}
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<config>"]
    lines += [f"  {var(k, v)}" for k, v in variables.items()]
    lines += ['  <list name="Domain">',
              f'    <listitem>{var("Domain", "example.com")}{var("Aliases", "example.net")}</listitem>',
              "  </list>"]
    if groups:
        lines.append('  <list name="IpAddressGroup">')
        lines += [f'    <listitem>{var("Group", g)}{var("Address", a)}{var("Enabled", 1)}</listitem>'
                  for g, a in groups]
        lines.append("  </list>")
    if users:
        lines.append('  <list name="User">')
        lines += [f'    <listitem>{var("Name", n)}{var("Domain", d)}{var("Password", p)}'
                  f'{var("Enabled", int(e))}</listitem>' for n, d, p, e in users]
        lines.append("  </list>")
    if aliases:
        lines.append('  <list name="Alias">')
        lines += [f'    <listitem>{var("Name", n)}{var("Domain", d)}{var("DeliverTo", t)}</listitem>'
                  for n, d, t in aliases]
        lines.append("  </list>")
    lines += [body, "</config>", ""]
    path.write_text("\n".join(lines))
    return path


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/, and every test that starts a real
    ``twistd`` (the ``twistd`` fixture), is marked ``e2e`` so
    ``pytest -m "not e2e"`` is the fast loop.  Other tests that start a
    process carry the mark themselves."""
    e2e = ROOT / "tests" / "e2e"
    for item in items:
        if e2e in Path(str(item.fspath)).parents or "twistd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
