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


class Twistd:
    """A real ``twistd -n mailguard`` process."""

    def __init__(self, tmp: Path, args: list[str], smtp_port: int, wait_port: int | None = None):
        self.tmp = tmp
        self.port = smtp_port
        self.spool = tmp / "spool"
        self.logfile = tmp / "twistd.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [TWISTD, "--logfile", str(self.logfile),
               "--pidfile", "", "-n", "mailguard", "--spool", str(self.spool), *args]
        self.proc = subprocess.Popen(cmd, cwd=str(tmp), env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", wait_port or smtp_port, self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(self.output())

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

    def start(*args: str, config: str | Path | None = None, port: int | None = None) -> Twistd:
        port = port or free_port()
        full = list(args)
        if config is not None:
            full = ["--config", str(config), *full]
        if not any(a.startswith("--smtp=") or a == "--smtp" for a in full):
            full += ["--smtp", f"tcp:{port}:interface=127.0.0.1"]
        server = Twistd(tmp_path, full, port)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


def write_config(path: Path, variables: dict[str, str] | None = None, body: str = "") -> Path:
    """A small mailserver.cfg: example.com with john, jane, a disabled user,
    an alias, a relay group of 127.0.0.2 and an exception group."""
    variables = {
        "InternetHostname": "mx.example.com",
        "VRFYEnabled": "1",
        "SmtpGreetingDelay": "0",
        "RelayControlIpGroupEnabled": "1",
        "RelayControlIpGroup": "Trusted",
        **(variables or {}),
    }
    vars_xml = "\n".join(f'  <variable name="{k}">{v}</variable>' for k, v in variables.items())
    path.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<config>
{vars_xml}
  <list name="Domain">
    <listitem><variable name="Domain">example.com</variable><variable name="Aliases">example.net</variable></listitem>
  </list>
  <list name="IpAddressGroup">
    <listitem><variable name="Group">Trusted</variable><variable name="Address">127.0.0.2</variable><variable name="Enabled">1</variable></listitem>
    <listitem><variable name="Group">NoDelay</variable><variable name="Address">127.0.0.4</variable><variable name="Enabled">1</variable></listitem>
  </list>
  <list name="User">
    <listitem><variable name="Name">john</variable><variable name="Domain">example.com</variable><variable name="Password">john-secret</variable><variable name="Enabled">1</variable></listitem>
    <listitem><variable name="Name">jane</variable><variable name="Domain">example.com</variable><variable name="Password">jane-secret</variable><variable name="Enabled">1</variable></listitem>
    <listitem><variable name="Name">former</variable><variable name="Domain">example.com</variable><variable name="Enabled">0</variable></listitem>
  </list>
  <list name="Alias">
    <listitem><variable name="Name">sales</variable><variable name="Domain">example.com</variable><variable name="DeliverTo">john@example.com,jane@example.com</variable></listitem>
  </list>
{body}
</config>
""")
    return path
