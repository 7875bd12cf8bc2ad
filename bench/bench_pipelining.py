"""Benchmark: pipelined commands answered per second by a real twistd.

Run:
    .venv/bin/python bench/bench_pipelining.py [--megabytes 2] [--command "HELO x"]
        [--repeats 3] [--mailguard-root DIR] [--candidate DIR]

Not part of the test suite.  One client on 127.0.0.3 (untrusted) sends
C{--megabytes} of one command, pipelined (``HELO x``: 8 octets, 262,144
commands in 2 MB), while it reads the replies in a second thread, so the
figure is the server's rate, not the client's patience.  Reported per run:
commands answered per second (first byte sent to last reply received) and
the server's peak RSS.  ``--candidate DIR`` runs another checkout too,
interleaved (the way to compare before and after a change:
``git archive COMMIT | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from mgproc import ROOT, Server, write_config


def run_once(server: Server, payload: bytes, commands: int) -> tuple[float, int]:
    s = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.3", 0))
    s.recv(1000)  # the greeting
    peak = [server.rss_kb]
    done = threading.Event()

    def watch():
        while not done.wait(0.05):
            peak[0] = max(peak[0], server.rss_kb)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
    sender.start()
    seen, tail = 0, b"\n"  # the greeting ended with a line end
    while seen < commands:
        data = s.recv(1 << 20)
        if not data:
            raise RuntimeError(f"closed after {seen} replies")
        # A reply's last line is "NNN text" at a line start (continuations are "NNN-").
        chunk = tail + data
        seen += len(re.findall(rb"\n\d{3} ", chunk))
        tail = chunk[-4:] if b"\n" in chunk[-4:] else b""
        tail = tail[tail.rfind(b"\n"):] if tail else b""
    elapsed = time.monotonic() - t0
    done.set()
    sender.join()
    s.sendall(b"QUIT\r\n")
    s.close()
    return commands / elapsed, max(peak[0], server.rss_kb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megabytes", type=float, default=2.0)
    ap.add_argument("--command", default="HELO x")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mailguard-root", type=Path, default=ROOT)
    ap.add_argument("--candidate", type=Path, action="append", default=[])
    args = ap.parse_args()
    line = args.command.encode() + b"\r\n"
    commands = int(args.megabytes * 1024 * 1024) // len(line)
    payload = line * commands
    roots = [args.mailguard_root, *args.candidate]
    results: dict[Path, list[tuple[float, int]]] = {r: [] for r in roots}
    with tempfile.TemporaryDirectory(prefix="mg-pipe-") as tmp:
        servers = {}
        for i, root in enumerate(roots):
            home = Path(tmp) / f"s{i}"
            home.mkdir()
            cfg = write_config(home / "mailserver.cfg", {"SmtpMaxErrors": "20"})
            servers[root] = Server(home, cfg, root)
        try:
            for _ in range(args.repeats):
                for root in roots:
                    results[root].append(run_once(servers[root], payload, commands))
        finally:
            for s in servers.values():
                s.stop()
    print(f"{commands} pipelined {args.command!r} commands ({len(payload) / 1e6:.1f} MB), "
          f"{args.repeats} runs each, one untrusted client reading as it sends")
    print(f"{'checkout':<40} {'commands/s (median)':>20} {'runs':>30} {'peak RSS':>10}")
    for root, runs in results.items():
        rates = [r for r, _ in runs]
        print(f"{str(root):<40} {statistics.median(rates):>20,.0f} "
              f"{', '.join(f'{r:,.0f}' for r in rates):>30} {max(k for _, k in runs) / 1024:>8.1f} MB")


if __name__ == "__main__":
    main()
