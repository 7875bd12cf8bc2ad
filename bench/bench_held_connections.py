"""Benchmark: server memory per connection held in the greeting delay.

Run:
    .venv/bin/python bench/bench_held_connections.py [--connections 5000] [--delay 30]

Not part of the test suite.  Three servers, each a separate process, are
measured one after the other in the same run, with the same client:

- ``twisted``: a plain Twisted ``Protocol`` that does nothing (the floor:
  what the reactor and a TCP transport cost);
- ``aiosmtpd``: an aiosmtpd ``SMTP`` server on asyncio (greets at once; its
  connections sit idle waiting for a command);
- ``mailguard``: the real ``twistd -n mailguard`` with
  ``SmtpGreetingDelay`` (default 30 s), its connections held before the
  greeting.

For each, the client (this process) opens N connections from source
addresses spread over 127.0.0.2..127.0.0.250, waits until the server has
accepted every one (its open file descriptors, from ``/proc``), lets memory
settle and reads the server's ``VmRSS`` from ``/proc/PID/status``.  The
figure is (RSS with N held - RSS before) / N.  Kernel socket buffers are not
in RSS and are the same for every server.

For mailguard it also checks that a held connection has no banner yet,
measures the banner latency of a trusted client (127.0.0.1, in the
exception group) while the N wait, and, after the delay, that all N were
greeted.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
SOURCES = [f"127.0.0.{i}" for i in range(2, 251)]
TRUSTED = "127.0.0.1"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the peer servers (run as: bench_held_connections.py --serve KIND PORT) ---

def serve_twisted(port: int) -> None:
    from twisted.internet import protocol, reactor

    class Idle(protocol.Protocol):
        pass

    f = protocol.Factory.forProtocol(Idle)
    f.noisy = False
    reactor.listenTCP(port, f, backlog=1024, interface="127.0.0.1")
    reactor.run()


def serve_aiosmtpd(port: int) -> None:
    import asyncio

    from aiosmtpd.handlers import Sink
    from aiosmtpd.smtp import SMTP

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Sink(), hostname="mx.example.com"),
                                          "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


MAILGUARD_CFG = """<?xml version="1.0" encoding="UTF-8"?>
<config>
  <variable name="InternetHostname">mx.example.com</variable>
  <variable name="SmtpGreetingDelay">{delay}</variable>
  <variable name="SmtpGreetingDelayExceptions">Trusted</variable>
  <variable name="SmtpGreetingDelayLog">1</variable>
  <variable name="SmtpMaxConnections">{max_total}</variable>
  <list name="Domain"><listitem><variable name="Domain">example.com</variable></listitem></list>
  <list name="IpAddressGroup">
    <listitem><variable name="Group">Trusted</variable><variable name="Address">127.0.0.1</variable></listitem>
  </list>
  <list name="User">
    <listitem><variable name="Name">john</variable><variable name="Domain">example.com</variable></listitem>
  </list>
</config>
"""


# --- measuring a server process ------------------------------------------------

def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_rss(pid: int) -> int:
    """RSS once it stops moving (the reactor may still be allocating)."""
    last = rss_kb(pid)
    for _ in range(20):
        time.sleep(0.3)
        now = rss_kb(pid)
        if now == last:
            return now
        last = now
    return last


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5,
                                          source_address=(TRUSTED, 0)):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_many(port: int, n: int, pid: int, batch: int = 100) -> list[socket.socket]:
    """N connections, in batches that the server accepts before the next
    (so no SYN is dropped for a full backlog)."""
    socks: list[socket.socket] = []
    base = fd_count(pid)
    for start in range(0, n, batch):
        pending = []
        for i in range(start, min(n, start + batch)):
            s = socket.socket()
            s.setsockopt(socket.SOL_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
            s.bind((SOURCES[i % len(SOURCES)], 0))
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            pending.append(s)
        # wait until the server has accepted them all
        deadline = time.monotonic() + 10
        while fd_count(pid) < base + len(socks) + len(pending):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server accepted only {fd_count(pid) - base} of {len(socks) + len(pending)}")
            time.sleep(0.002)
        socks += pending
    return socks


def banner_latency(port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(TRUSTED, 0)) as s:
        data = b""
        while not data.endswith(b"\r\n") or not data.split(b"\r\n")[-2][3:4] == b" ":
            chunk = s.recv(1024)
            if not chunk:
                raise RuntimeError("closed before the banner")
            data += chunk
        t = time.perf_counter() - t0
        assert data.startswith(b"220"), data
        s.sendall(b"QUIT\r\n")
    return t


def measure(kind: str, n: int, delay: float, tmp: Path) -> dict:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if kind == "mailguard":
        cfg = tmp / "mailserver.cfg"
        cfg.write_text(MAILGUARD_CFG.format(delay=delay, max_total=n + 1000))
        cmd = [TWISTD, "--logfile", str(tmp / "twistd.log"), "--pidfile", "", "-n", "mailguard",
               "--config", str(cfg), "--spool", str(tmp / "spool"),
               "--smtp", f"tcp:{port}:interface=127.0.0.1:backlog=1024"]
    else:
        cmd = [sys.executable, __file__, "--serve", kind, str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp), preexec_fn=raise_nofile)
    result: dict = {"kind": kind}
    socks: list[socket.socket] = []
    try:
        wait_port(port, proc)
        # Warm up: a few whole connections, so lazy imports and first-use
        # allocations are not charged to the held connections.
        for _ in range(5):
            banner_latency(port) if kind != "twisted" else socket.create_connection(
                ("127.0.0.1", port), source_address=(TRUSTED, 0)).close()
        time.sleep(0.5)
        before = settled_rss(proc.pid)
        t0 = time.perf_counter()
        socks = open_many(port, n, proc.pid)
        t_open = time.perf_counter() - t0
        after = settled_rss(proc.pid)
        result.update(before_kb=before, after_kb=after, per_conn_kb=(after - before) / n,
                      open_s=t_open)
        if kind == "mailguard":
            # A held connection has had no banner yet.
            try:
                got = socks[0].recv(100, socket.MSG_DONTWAIT)
                result["held_banner"] = got
            except BlockingIOError:
                result["held_banner"] = b""
            lat = [banner_latency(port) for _ in range(20)]
            result["trusted_ms_median"] = statistics.median(lat) * 1000
            result["trusted_ms_max"] = max(lat) * 1000
            # After the delay, every held connection gets its 220.
            remaining = delay - (time.perf_counter() - t0) + 2.0
            if remaining > 0:
                time.sleep(remaining)
            greeted = 0
            for s in socks:
                try:
                    if s.recv(200, socket.MSG_DONTWAIT).startswith(b"220 "):
                        greeted += 1
                except BlockingIOError:
                    pass
            result["greeted_after_delay"] = greeted
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(20)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", "-n", type=int, default=5000)
    ap.add_argument("--delay", type=float, default=30.0, help="mailguard SmtpGreetingDelay (s)")
    ap.add_argument("--only", choices=["twisted", "aiosmtpd", "mailguard"], action="append")
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    raise_nofile()
    if args.serve:
        kind, port = args.serve
        {"twisted": serve_twisted, "aiosmtpd": serve_aiosmtpd}[kind](int(port))
        return
    kinds = args.only or ["twisted", "aiosmtpd", "mailguard"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-held-") as tmp:
        for kind in kinds:
            sub = Path(tmp) / kind
            sub.mkdir()
            r = measure(kind, args.connections, args.delay, sub)
            results.append(r)
            print(f"  {kind}: {r['per_conn_kb']:.2f} KB/connection "
                  f"(RSS {r['before_kb']} -> {r['after_kb']} KB, opened in {r['open_s']:.1f} s)",
                  file=sys.stderr)
    floor = next((r["per_conn_kb"] for r in results if r["kind"] == "twisted"), None)
    aio = next((r["per_conn_kb"] for r in results if r["kind"] == "aiosmtpd"), None)
    print(f"\n{args.connections} connections held idle; server RSS from /proc/PID/status\n")
    print(f"{'server':<12} {'RSS before':>11} {'RSS held':>10} {'KB/conn':>8} {'vs plain Twisted':>17} {'vs aiosmtpd':>12}")
    for r in results:
        ratio = f"{r['per_conn_kb'] / floor:.2f}x" if floor else "-"
        ratio_aio = f"{r['per_conn_kb'] / aio:.2f}x" if aio else "-"
        print(f"{r['kind']:<12} {r['before_kb'] / 1024:>8.1f} MB {r['after_kb'] / 1024:>7.1f} MB "
              f"{r['per_conn_kb']:>8.2f} {ratio:>17} {ratio_aio:>12}")
    for r in results:
        if r["kind"] == "mailguard":
            print(f"\nmailguard, SmtpGreetingDelay={args.delay:g}: banner on a held connection "
                  f"before the delay: {r['held_banner']!r}")
            print(f"trusted client (127.0.0.1, exception group) banner latency while "
                  f"{args.connections} wait: median {r['trusted_ms_median']:.2f} ms, "
                  f"max {r['trusted_ms_max']:.2f} ms (20 connections)")
            print(f"greeted after the delay: {r['greeted_after_delay']}/{args.connections}")
            verdict = "OK" if r["per_conn_kb"] <= 3.0 else "OVER"
            print(f"target <= 3 KB per held connection: {verdict}")


if __name__ == "__main__":
    main()
