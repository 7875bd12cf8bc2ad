"""A real ``twistd -n mailguard`` for the abuse benchmarks: start it from a
checkout, read its memory, stop it by process id.

Shared by ``bench_pipelining.py`` and ``bench_abuse.py``; not a benchmark
itself.  Everything started here is stopped on exit, error or Ctrl-C, and
only loopback addresses are ever used.
"""

from __future__ import annotations

import atexit
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
_STARTED: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    """Resident memory of C{pid} now, in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def write_config(path: Path, variables: dict[str, str], users=(("john", "john-secret"),),
                 trusted: str = "127.0.0.2") -> Path:
    """example.com with C{users} (plain-text passwords), the relay group
    "Trusted" = C{trusted}, and C{variables}."""
    v = {"InternetHostname": "mx.example.com", "RelayControlIpGroupEnabled": "1",
         "RelayControlIpGroup": "Trusted", **variables}
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<config>"]
    lines += [f'  <variable name="{k}">{x}</variable>' for k, x in v.items()]
    lines += ['  <list name="Domain"><listitem><variable name="Domain">example.com</variable></listitem></list>',
              '  <list name="IpAddressGroup"><listitem><variable name="Group">Trusted</variable>'
              f'<variable name="Address">{trusted}</variable></listitem></list>',
              '  <list name="User">']
    lines += [f'    <listitem><variable name="Name">{n}</variable><variable name="Domain">example.com</variable>'
              f'<variable name="Password">{p}</variable></listitem>' for n, p in users]
    lines += ["  </list>", "</config>", ""]
    path.write_text("\n".join(lines))
    return path


class Server:
    """``twistd -n mailguard`` from checkout C{root} on 127.0.0.1:C{port}."""

    def __init__(self, home: Path, config: Path, root: Path = ROOT, nofile: int | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.spool = home / "spool"
        self.log = home / "twistd.log"
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))

        def limits():
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [TWISTD, "--logfile", str(self.log), "--pidfile", "", "-n", "mailguard",
             "--config", str(config), "--spool", str(self.spool),
             "--smtp", f"tcp:{self.port}:interface=127.0.0.1:backlog=1024"],
            env=env, cwd=str(home), preexec_fn=limits)
        _STARTED.append(self.proc)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5,
                                              source_address=("127.0.0.1", 0)) as s:
                    s.recv(100)
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("twistd did not start")

    @property
    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    def security_log(self) -> list[str]:
        path = self.spool / "security.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@atexit.register
def _stop_all() -> None:
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _on_signal(signum, frame):
    raise SystemExit(1)


signal.signal(signal.SIGTERM, _on_signal)
