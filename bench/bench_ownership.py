"""Benchmark: what ``--uid``/``--gid`` cost at start-up on a large spool.

Run (as root): .venv/bin/python bench/bench_ownership.py [--messages N] [--repeats R]

Not part of the test suite.  A spool in the shape mailguard writes --
N messages (default 100,000) in the Maildirs of 1,000 users, one in ten
also in a second user's Maildir (a hard link), and 1,000 queue entries --
is made by root, as a spool is after a run without ``--uid``.  Measured:

  1. ``give()`` the first time: every directory and queue file changes
     owner (root -> nobody); the messages in the Maildirs are not looked at;
  2. ``give()`` again: nothing to change, the walk alone (every start);
  3. ``check()``: the writability checks as nobody;
  4. ``twistd -n mailguard`` start-up on that spool, from the command to
     the first accepted connection on 127.0.0.1: without ``--uid``, and
     with ``--uid nobody`` (the spool already given).

Each figure is the median of R runs (default 3) with the worst; the spool
lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailguard.store.ownership import RunAs, check, give  # noqa: E402

NOBODY = RunAs(65534, 65534, "nobody")
TWISTD = str(Path(sys.executable).with_name("twistd"))


def make_spool(spool: Path, messages: int) -> int:
    """The spool's entries (files and directories), all root's."""
    users = 1000
    made = 0
    for u in range(users):
        for sub in ("tmp", "new", "cur"):
            (spool / "mail" / "example.com" / f"u{u}" / "Maildir" / sub).mkdir(parents=True, mode=0o700)
    for d in ("incoming", "queue/active", "queue/tmp"):
        (spool / d).mkdir(parents=True, mode=0o700)
    body = b"Subject: x\r\n\r\n" + b"x" * 2000 + b"\r\n"
    for m in range(messages):
        path = spool / "mail" / "example.com" / f"u{m % users}" / "Maildir" / "new" / f"{m}.bench"
        path.write_bytes(body)
        made += 1
        if m % 10 == 0:
            os.link(path, spool / "mail" / "example.com" / f"u{(m + 1) % users}" / "Maildir" / "cur" / f"{m}.bench")
            made += 1
    for q in range(1000):
        (spool / "queue" / "active" / f"Q{q}.env").write_text("{}")
        made += 1
    return made + users * 5 + 5


def to_root(spool: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(spool):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), 0, 0)
    os.lchown(spool, 0, 0)


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def start_up(tmp: Path, spool: Path, twistd_args: list[str]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ROOT / "mailserver.cfg.example"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [TWISTD, "-n", "--pidfile", "", "--logfile", str(tmp / "twistd.log"), *twistd_args, "mailguard",
           "--config", str(cfg), "--spool", str(spool), "--smtp", f"tcp:{port}:interface=127.0.0.1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(tmp), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"twistd exited with {proc.returncode}: see {tmp / 'twistd.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(30)


def report(label: str, runs: list[float]) -> None:
    print(f"{label:<52} median {statistics.median(runs):7.3f} s   worst {max(runs):7.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark changes owners")
    tmp = Path(tempfile.mkdtemp(prefix="mailguard-bench-own-"))
    tmp.chmod(0o755)
    try:
        spool = tmp / "spool"
        entries = make_spool(spool, args.messages)
        print(f"spool: {args.messages:,} messages, {entries:,} entries", flush=True)
        first, again, checks = [], [], []
        queue = (str(spool / "queue"),)
        for _ in range(args.repeats):
            to_root(spool)
            first.append(timed(lambda: give(str(spool), NOBODY, queue)))
            again.append(timed(lambda: give(str(spool), NOBODY, queue)))
            checks.append(timed(lambda: check(NOBODY, [("--spool", str(spool)),
                                                       ("--spool", str(spool / "incoming"))])))
        report("give(): root's directories and queue -> nobody", first)
        report("give(): nothing to change (the walk alone)", again)
        report("check() as nobody", checks)
        to_root(spool)
        plain = [start_up(tmp, spool, []) for _ in range(args.repeats)]
        report("twistd start-up, no --uid", plain)
        as_nobody = [start_up(tmp, spool, ["--uid", "nobody", "--gid", "nogroup"]) for _ in range(args.repeats)]
        report("twistd start-up, --uid nobody (first run gives)", as_nobody)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
