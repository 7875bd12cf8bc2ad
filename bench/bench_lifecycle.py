"""Benchmark: a configuration reload under load, and a graceful stop with
thousands of held connections.

Run:
    .venv/bin/python bench/bench_lifecycle.py [--users 20000] [--reloads 5] [--held 1000 5000]

Not part of the test suite.  No peer: the figures are mailguard's own, for
the claims of docs/operations.md.

1. **Reload.**  ``twistd -n mailguard`` on a configuration in the real
   shape (``tests/realshape.py``: settings in sections, a 2,000-row IP
   group, 50 domains, and a ``users.cfg`` of N users with ``D3S:``
   passwords).  Eight clients send ``NOOP`` after ``NOOP``, timing each
   round trip, in sessions of 50 (a new connection each time).  After a 2 s baseline the
   server gets ``SIGHUP`` R times in a row, each once the previous reload
   has said ``READY=1`` on the notification socket (``NOTIFY_SOCKET``, as
   under systemd).  Reported: the reload time (HUP to READY), the NOOP
   round trips during the reloads against the baseline (median, 99th
   percentile, worst: how long the sessions are stalled), and the errors
   (any is a failure).
2. **The reactor's pauses.**  In one process, the real service (the
   reactor, ``build_service``) on the same files, a 1 ms ``LoopingCall``
   recording the gaps between its ticks, and ``reload()`` called R times:
   the longest pause of the reactor during each reload, with the files
   read in a thread (as shipped) and read on the reactor thread (the
   alternative it replaced).
3. **Stop.**  The same server with a 300 s greeting delay, H connections
   held in it (from 127.0.0.10-127.0.0.209) and one client in ``DATA``;
   then ``SIGTERM``.  Reported: the time until every held client has read
   ``421 4.3.2``, until the DATA client (sending the rest of its message
   as soon as the 421s are in) has its ``250``, and until twistd exits,
   with its exit status.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
sys.path.insert(0, str(ROOT))

from tests.realshape import mailserver_cfg, users_cfg  # noqa: E402

SETTINGS = {"InternetHostname": ("SmtpServer", "mx.example.com"),
            "RelayControlIpGroupEnabled": (None, "1"), "RelayControlIpGroup": (None, "Trusted"),
            "SmtpMaxConnectionsPerIp": (None, "0"), "SmtpIdleTimeout": (None, "0"),
            "SmtpMaxSessionTime": (None, "0"), "SmtpMaxErrors": (None, "10000")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, work: Path, cfg: Path, port: int) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(work / "notify.sock"))
        self.notify.settimeout(300)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(work / "notify.sock")}
        self.proc = subprocess.Popen(
            [TWISTD, "--logfile", str(work / "twistd.log"), "--pidfile", "", "-n", "mailguard",
             "--config", str(cfg), "--spool", str(work / "spool"),
             "--smtp", f"tcp:{port}:interface=127.0.0.1:backlog=4096"],
            cwd=str(work), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.until("READY=1")

    def until(self, prefix: str) -> str:
        while True:
            message = self.notify.recv(4096).decode()
            if message.startswith(prefix):
                return message

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


def _stats(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"median {statistics.median(values) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, " \
           f"worst {values[-1] * 1000:.1f} ms ({len(values)} round trips)"


def bench_reload(work: Path, users: int, reloads: int) -> None:
    cfg = mailserver_cfg(work / "mailserver.cfg", settings=SETTINGS, domains=50, ip_rows=2000)
    users_cfg(work / "users.cfg", users=users, domains=50)
    port = free_port()
    server = Server(work, cfg, port)
    stop, lock = threading.Event(), threading.Lock()
    samples: list[tuple[float, float]] = []  # (when, round trip)
    errors: list[BaseException] = []

    def noop(n: int) -> None:
        try:
            while not stop.is_set():  # sessions of 50 NOOPs (within the junk-command budget)
                with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=60) as c:
                    c.ehlo("client.test")
                    for _ in range(50):
                        t0 = time.monotonic()
                        code, _ = c.noop()
                        t1 = time.monotonic()
                        if code != 250:
                            raise RuntimeError(f"NOOP answered {code}")
                        with lock:
                            samples.append((t0, t1 - t0))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=noop, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)  # the baseline
        windows, durations = [], []
        for _ in range(reloads):
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGHUP)
            state = server.until("READY=1")
            t1 = time.monotonic()
            if "reloaded" not in state:
                raise RuntimeError(f"the reload failed: {state}")
            windows.append((t0, t1))
            durations.append(t1 - t0)
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        server.close()
    during = [rt for when, rt in samples if any(a <= when <= b for a, b in windows)]
    first = min(a for a, _ in windows)
    before = [rt for when, rt in samples if when < first]
    print(f"reload: {users} users, 2,000-row IP group, 50 domains; {reloads} reloads")
    print(f"  HUP to READY: {', '.join(f'{d:.2f}' for d in durations)} s "
          f"(median {statistics.median(durations):.2f} s)")
    print(f"  NOOP baseline:       {_stats(before)}")
    print(f"  NOOP during reloads: {_stats(during) if during else 'none'}")
    print(f"  errors: {len(errors)}{' ' + repr(errors[0]) if errors else ''}")
    for inline in (False, True):
        subprocess.run([sys.executable, __file__, "--gaps", str(cfg), str(work / f"gaps-spool-{inline}"),
                        str(reloads), "inline" if inline else "thread"], check=True)


def reactor_gaps(cfg: str, spool: str, reloads: int, inline: bool) -> None:
    """Runs in its own process (``--gaps``): prints the reactor's longest
    pause during each reload."""
    from twisted.internet import reactor, task

    from mailguard.policy import build
    from mailguard.service import build_service
    from mailguard.store.durable import run_inline

    config, tables = build.load(cfg)
    top = build_service(config, {"config": cfg, "spool": spool, "smtp": "tcp:0:interface=127.0.0.1"},
                        reactor, tables)
    if inline:
        top.run = run_inline
    ticks: list[float] = []
    windows: list[tuple[float, float]] = []

    def reload(n: int) -> None:
        t0 = time.monotonic()

        def done(result):
            assert result.ok
            windows.append((t0, time.monotonic()))
            reactor.callLater(0.3, reload, n - 1) if n > 1 else reactor.callLater(0.3, reactor.stop)

        top.reload().addCallback(done)

    task.LoopingCall(lambda: ticks.append(time.monotonic())).start(0.001)
    reactor.callLater(0.5, reload, reloads)
    reactor.run()
    worst = []
    for a, b in windows:  # from the last tick before the reload to the first after it
        before = [t for t in ticks if t <= a][-1:]
        after = [t for t in ticks if t > b][:1]
        inside = before + [t for t in ticks if a < t <= b] + after
        worst.append(max(y - x for x, y in zip(inside, inside[1:])))
    print(f"  read {'inline' if inline else 'in a thread'}: reload "
          f"{', '.join(f'{b - a:.2f}' for a, b in windows)} s; longest reactor pause "
          f"{', '.join(f'{w * 1000:.0f}' for w in worst)} ms")


def bench_stop(work: Path, held: int) -> None:
    work.mkdir()
    settings = dict(SETTINGS, SmtpGreetingDelay=(None, "300"), SmtpGreetingDelayExceptions=(None, "Trusted"))
    cfg = mailserver_cfg(work / "mailserver.cfg", settings=settings, domains=1, ip_rows=10)
    port = free_port()
    server = Server(work, cfg, port)
    try:
        busy = smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=60)
        busy.ehlo("client.test")
        busy.mail("a@sender.test")
        busy.rcpt("far@remote.test")  # relayed (trusted): queued, no local user needed
        busy.putcmd("data")
        assert busy.getreply()[0] == 354
        busy.send(b"Subject: last\r\n\r\nfirst half\r\n")
        socks = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{10 + i % 200}", 0))
                 for i in range(held)]
        probe = smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=60)
        probe.quit()  # accepted in order: every held one is in
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        got, left = 0, held
        while left:
            for key, _ in sel.select(timeout=120):
                data = key.fileobj.recv(4096)
                if data.startswith(b"421 4.3.2"):
                    got += 1
                if not data or data.endswith(b"\r\n"):
                    sel.unregister(key.fileobj)
                    left -= 1
        t_421 = time.monotonic() - t0
        busy.send(b"second half\r\n.\r\n")
        code, _ = busy.getreply()
        t_250 = time.monotonic() - t0
        status = server.proc.wait(120)
        t_exit = time.monotonic() - t0
        for s in socks:
            s.close()
        print(f"stop: {held} held + 1 in DATA: {got}/{held} held got 421 4.3.2 in {t_421 * 1000:.0f} ms; "
              f"DATA answered {code} at {t_250 * 1000:.0f} ms; exit status {status} at {t_exit * 1000:.0f} ms")
    finally:
        server.close()


def main() -> None:
    if sys.argv[1:2] == ["--gaps"]:
        cfg, spool, reloads, how = sys.argv[2:6]
        return reactor_gaps(cfg, spool, int(reloads), how == "inline")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--held", type=int, nargs="+", default=[1000, 5000])
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="mailguard-bench-") as tmp:
        bench_reload(Path(tmp), args.users, args.reloads)
        for n in args.held:
            bench_stop(Path(tmp) / f"stop{n}", n)


if __name__ == "__main__":
    main()
