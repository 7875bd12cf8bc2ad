"""Benchmark: RCPT decisions per second of a gateway (VRFY to a back-end,
cold and warm cache), against a mailguard deciding from its local directory.

Run:

    .venv/bin/python bench/bench_gateway.py [--quick] [--users N]
        [--addresses N] [--clients N] [--connections N] [--batch N]

Not part of the test suite.  Three real processes on loopback:

- the **back-end**: ``twistd -n mailguard`` on 127.0.0.1, ``VRFYEnabled=1``,
  ``--users`` accounts in example.com, 127.0.0.2 in its relay IP group;
- the **gateway**: ``twistd -n mailguard`` on 127.0.0.1 with
  ``GatewayEnabled=1``, asking the back-end from 127.0.0.2 over
  ``--connections`` pooled connections (``GatewayConnections``);
- the **client**: this script (asyncio), ``--clients`` concurrent SMTP
  sessions from 127.0.0.3, each pipelining ``RCPT TO`` in batches of
  ``--batch`` lines (one ``MAIL FROM`` per transaction of at most 500
  recipients, then ``RSET``).

Measurements, in one run, each over ``--addresses`` distinct addresses,
half of them accounts on the back-end and half unknown, interleaved:

- ``local directory``: the client against the back-end itself (a plain
  mailguard deciding each RCPT from its in-memory directory): the reference;
- ``gateway, warm cache``: every address already in the gateway's cache;
- ``gateway, cold cache``: every address new to the gateway: one back-end
  VRFY per RCPT (a fresh address set for each cold row, so nothing is
  cached).  The gateway's protocol answers one session's RCPTs in order, so
  a cold session waits for each VRFY: parallel sessions are what keeps the
  pool busy; rows with 1 session and with ``--clients`` sessions show both.

Every reply is checked (250 for an account, 550 for an unknown address);
a wrong one aborts the run.  Each figure is the median of ``--repeats``
runs.  Everything started is stopped (by process id) on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
CLIENT_IP = "127.0.0.3"
GATEWAY_SOURCE = "127.0.0.2"
PROCS: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all() -> None:
    for p in PROCS:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in PROCS:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


atexit.register(stop_all)


def start(home: Path, config: Path, port: int, *args: str) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([TWISTD, "--logfile", str(home / "twistd.log"), "--pidfile", "", "-n",
                             "mailguard", "--config", str(config), "--spool", str(home / "spool"),
                             "--smtp", f"tcp:{port}:interface=127.0.0.1", *args],
                            cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    PROCS.append(proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"twistd exited: see {home / 'twistd.log'}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"twistd on port {port} did not start")


def write_cfg(path: Path, variables: dict[str, str], users: int = 0) -> Path:
    vars_xml = "\n".join(f'  <variable name="{k}">{v}</variable>' for k, v in variables.items())
    rows = "\n".join(
        f'    <listitem><variable name="Name">u{i}</variable><variable name="Domain">example.com</variable>'
        f'<variable name="Enabled">1</variable></listitem>' for i in range(users))
    path.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<config>
{vars_xml}
  <list name="Domain">
    <listitem><variable name="Domain">example.com</variable></listitem>
  </list>
  <list name="IpAddressGroup">
    <listitem><variable name="Group">Trusted</variable><variable name="Address">{GATEWAY_SOURCE}</variable><variable name="Enabled">1</variable></listitem>
  </list>
  <list name="User">
{rows}
  </list>
</config>
""")
    return path


COMMON = {
    "SmtpGreetingDelay": "0",
    "SmtpMaxRecipients": "1000",
    "SmtpMaxConnectionsPerIp": "1000",
    "SmtpIdleTimeout": "600",
}


def address_sets(count: int, users: int, sets: int) -> list[list[tuple[str, bool]]]:
    """C{sets} disjoint lists of C{count} (address, known) pairs, known and
    unknown interleaved; known ones are back-end accounts."""
    half = count // 2
    if half * sets > users:
        raise SystemExit(f"need --users >= {half * sets} for {sets} sets of {count} addresses")
    out = []
    for s in range(sets):
        known = [f"u{s * half + i}@example.com" for i in range(half)]
        unknown = [f"nobody{s}-{i}@example.com" for i in range(count - half)]
        mixed = []
        for i in range(count):
            mixed.append((known[i // 2], True) if i % 2 == 0 and i // 2 < len(known)
                         else (unknown[i // 2], False))
        out.append(mixed)
    return out


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def session(port: int, work: list[tuple[str, bool]], batch: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(CLIENT_IP, 0))
    try:
        greeting = await read_reply(reader)
        assert greeting.startswith(b"220 "), greeting
        writer.write(b"EHLO bench.test\r\n")
        assert (await read_reply(reader)).startswith(b"250")
        done = 0
        for start_tx in range(0, len(work), 500):
            tx = work[start_tx:start_tx + 500]
            writer.write(b"MAIL FROM:<bench@outside.test>\r\n")
            assert (await read_reply(reader)).startswith(b"250")
            for i in range(0, len(tx), batch):
                chunk = tx[i:i + batch]
                writer.write(b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a, _ in chunk))
                for address, known in chunk:
                    reply = await read_reply(reader)
                    want = b"250 " if known else b"550 "
                    if not reply.startswith(want):
                        raise SystemExit(f"RCPT {address}: expected {want!r}, got {reply!r}")
                    done += 1
            writer.write(b"RSET\r\n")
            assert (await read_reply(reader)).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
        return done
    finally:
        writer.close()


async def measure_async(port: int, work: list[tuple[str, bool]], clients: int, batch: int) -> float:
    shares = [work[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(session(port, s, batch) for s in shares if s))
    elapsed = time.perf_counter() - t0
    assert sum(counts) == len(work)
    return len(work) / elapsed


def measure(port: int, work, clients: int, batch: int) -> float:
    return asyncio.run(measure_async(port, work, clients, batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer addresses and repeats")
    ap.add_argument("--users", type=int, default=None, help="accounts on the back-end")
    ap.add_argument("--addresses", type=int, default=None, help="RCPTs per measurement")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client sessions")
    ap.add_argument("--connections", type=int, default=4, help="GatewayConnections")
    ap.add_argument("--batch", type=int, default=50, help="RCPT lines per pipelined write")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    addresses = args.addresses or (2000 if args.quick else 6000)
    repeats = args.repeats or (1 if args.quick else 3)
    cold_rows = 2  # 1 session and --clients sessions
    sets_needed = 1 + cold_rows * repeats
    users = args.users or (addresses // 2) * sets_needed

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    try:
        bport, gport = free_port(), free_port()
        backend_cfg = write_cfg(tmp / "backend.cfg", {
            "InternetHostname": "backend.example.com", "VRFYEnabled": "1",
            "RelayControlIpGroupEnabled": "1", "RelayControlIpGroup": "Trusted", **COMMON}, users)
        gateway_cfg = write_cfg(tmp / "gateway.cfg", {
            "InternetHostname": "gw.example.com", "GatewayEnabled": "1",
            "GatewayBindAddress": GATEWAY_SOURCE,
            "GatewayConnections": str(args.connections), **COMMON})
        t0 = time.perf_counter()
        start(tmp / "backend", backend_cfg, bport)
        start(tmp / "gateway", gateway_cfg, gport, "--relay-host", f"127.0.0.1:{bport}")
        print(f"back-end with {users} accounts and gateway started in {time.perf_counter() - t0:.1f} s")
        sets = address_sets(addresses, users, sets_needed)
        warm_set, cold_sets = sets[0], sets[1:]

        results: dict[str, list[float]] = {}

        def record(name: str, value: float) -> None:
            results.setdefault(name, []).append(value)

        # Fill the cache with the warm set (itself a cold run, not recorded).
        measure(gport, warm_set, args.clients, args.batch)
        for r in range(repeats):
            record(f"local directory, {args.clients} sessions", measure(bport, warm_set, args.clients, args.batch))
            record("local directory, 1 session", measure(bport, warm_set, 1, args.batch))
            record(f"gateway, warm cache, {args.clients} sessions", measure(gport, warm_set, args.clients, args.batch))
            record("gateway, warm cache, 1 session", measure(gport, warm_set, 1, args.batch))
            record(f"gateway, cold cache, {args.clients} sessions",
                   measure(gport, cold_sets[2 * r], args.clients, args.batch))
            record("gateway, cold cache, 1 session", measure(gport, cold_sets[2 * r + 1], 1, args.batch))

        print()
        print(f"RCPT decisions/s ({addresses} RCPTs per run, half known; median of {repeats}; "
              f"GatewayConnections={args.connections}, batches of {args.batch})")
        print()
        ref = statistics.median(results[f"local directory, {args.clients} sessions"])
        width = max(len(k) for k in results)
        print(f"| {'measurement'.ljust(width)} | RCPT/s | vs local directory ({args.clients} sessions) |")
        print(f"|{'-' * (width + 2)}|-------:|------:|")
        for name, values in results.items():
            med = statistics.median(values)
            print(f"| {name.ljust(width)} | {med:6.0f} | {med / ref:5.2f} |")
        print()
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
