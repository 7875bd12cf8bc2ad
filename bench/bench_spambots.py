"""Benchmark: a spambot simulation against a real ``twistd -n mailguard``.

Run:
    .venv/bin/python bench/bench_spambots.py [--delay 2.5] [--giveup 300]
        [--early 300] [--reactive 100] [--patient 100] [--legit 100] [--spread 5]

Not part of the test suite.  Time is scaled down ten times from Kerio's
figures: a 2.5 s delay stands for the recommended 25 s, and bots that give
up after 1-2 s stand for spam tools that wait 10-20 s.  Every client
connects from a loopback source address (legitimate senders from
127.0.0.2-9, bots from 127.0.0.10-250), at a random moment within
``--spread`` seconds, and tries to send one message to john@example.com
carrying an ``X-Bench-Id`` header.  The classes:

- ``giveup``   waits for the final ``220 `` line for 1-2 s, then hangs up;
- ``early``    pipelines its whole transaction at once, without waiting;
- ``reactive`` waits (up to 30 s) for the first byte of the greeting, then
               pipelines its whole transaction at once: it is fooled by the
               teaser's ``220-`` line;
- ``patient``  a spam run through a real, RFC-abiding MTA: waits for the
               greeting and talks proper SMTP (the delay cannot and must not
               stop it: it is indistinguishable from a legitimate sender);
- ``legit``    a compliant MTA: waits up to 30 s, proper SMTP.

The simulation runs twice, without and with ``SmtpGreetingTeaser``.  What
was delivered is counted from the Maildir (the ``X-Bench-Id`` headers), not
from what the clients believe, and the security log is counted by event.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
LEGIT_IPS = [f"127.0.0.{i}" for i in range(2, 10)]
BOT_IPS = [f"127.0.0.{i}" for i in range(10, 251)]
CLASSES = ("giveup", "early", "reactive", "patient", "legit")

CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<config>
  <variable name="InternetHostname">mx.example.com</variable>
  <variable name="SmtpGreetingDelay">{delay}</variable>
  <variable name="SmtpGreetingDelayExceptions">Probe</variable>
  <variable name="SmtpGreetingDelayLog">1</variable>
  <variable name="SmtpGreetingTeaser">{teaser}</variable>
  <list name="Domain"><listitem><variable name="Domain">example.com</variable></listitem></list>
  <list name="IpAddressGroup">
    <listitem><variable name="Group">Probe</variable><variable name="Address">127.0.0.1</variable></listitem>
  </list>
  <list name="User">
    <listitem><variable name="Name">john</variable><variable name="Domain">example.com</variable></listitem>
  </list>
</config>
"""


def message(ident: str) -> bytes:
    return (f"From: <sender@example.org>\r\nTo: <john@example.com>\r\nSubject: {ident}\r\n"
            f"X-Bench-Id: {ident}\r\n\r\nbody of {ident}\r\n").encode()


def pipeline(ident: str) -> bytes:
    return (b"EHLO bot.example.org\r\nMAIL FROM:<sender@example.org>\r\nRCPT TO:<john@example.com>\r\n"
            b"DATA\r\n" + message(ident) + b".\r\nQUIT\r\n")


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """One whole reply (all its lines)."""
    data = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("closed")
        data += line
        if line[3:4] != b"-":
            return data


async def converse(reader, writer, ident: str) -> None:
    """Proper SMTP, one command at a time."""
    for cmd in (b"EHLO mta.example.org", b"MAIL FROM:<sender@example.org>",
                b"RCPT TO:<john@example.com>", b"DATA"):
        writer.write(cmd + b"\r\n")
        reply = await read_reply(reader, 30)
        if reply[:1] not in (b"2", b"3"):
            raise ConnectionError(reply)
    writer.write(message(ident) + b".\r\n")
    reply = await read_reply(reader, 30)
    if not reply.startswith(b"250"):
        raise ConnectionError(reply)
    writer.write(b"QUIT\r\n")
    await read_reply(reader, 30)


async def client(kind: str, n: int, port: int, start: float, rnd: random.Random) -> str:
    """One client; returns what it believes happened (for the table)."""
    await asyncio.sleep(start)
    ident = f"{kind}-{n}"
    ip = rnd.choice(LEGIT_IPS if kind == "legit" else BOT_IPS)
    patience = rnd.uniform(1.0, 2.0) if kind == "giveup" else 30.0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
    except OSError as e:
        return f"connect failed: {e}"
    try:
        if kind == "early":
            writer.write(pipeline(ident))
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 10)
            return "refused" if b"554 5.7.1" in rest else "answered"
        if kind == "reactive":
            first = await asyncio.wait_for(reader.read(1), patience)
            writer.write(pipeline(ident))
            await writer.drain()
            rest = first + await asyncio.wait_for(reader.read(), 10)
            return "refused" if b"554 5.7.1" in rest else "answered"
        # giveup, patient, legit: wait for the final 220 line.
        try:
            greeting = await read_reply(reader, patience)
        except asyncio.TimeoutError:
            return "gave up"
        if not greeting.startswith(b"220"):
            return f"greeting {greeting[:20]!r}"
        await converse(reader, writer, ident)
        return "sent"
    except (ConnectionError, asyncio.TimeoutError, OSError) as e:
        return f"error: {type(e).__name__}"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def simulate(port: int, counts: dict[str, int], spread: float, seed: int):
    rnd = random.Random(seed)
    tasks, kinds = [], []
    for kind in CLASSES:
        for n in range(counts[kind]):
            tasks.append(client(kind, n, port, rnd.uniform(0, spread), rnd))
            kinds.append(kind)
    results = await asyncio.gather(*tasks)
    outcome = collections.defaultdict(collections.Counter)
    for kind, r in zip(kinds, results):
        outcome[kind][r] += 1
    return outcome


def delivered(spool: Path) -> collections.Counter:
    new = spool / "mail" / "example.com" / "john" / "Maildir" / "new"
    found = collections.Counter()
    for f in new.iterdir() if new.exists() else ():
        for line in f.read_bytes().split(b"\r\n"):
            if line.startswith(b"X-Bench-Id: "):
                found[line.split(b" ", 1)[1].decode().split("-")[0]] += 1
                break
    return found


def wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("twistd exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5, source_address=("127.0.0.1", 0)):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("twistd did not start")


def run(args, teaser: bool, tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "mailserver.cfg").write_text(CONFIG.format(delay=args.delay, teaser=int(teaser)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [TWISTD, "--logfile", str(tmp / "twistd.log"), "--pidfile", "", "-n", "mailguard",
         "--config", str(tmp / "mailserver.cfg"), "--spool", str(tmp / "spool"),
         "--smtp", f"tcp:{port}:interface=127.0.0.1:backlog=1024"], env=env, cwd=str(tmp))
    try:
        wait_port(port, proc)
        counts = {k: getattr(args, k) for k in CLASSES}
        t0 = time.monotonic()
        outcome = asyncio.run(simulate(port, counts, args.spread, args.seed))
        elapsed = time.monotonic() - t0
        time.sleep(0.5)  # let the security log thread write
    finally:
        proc.terminate()
        proc.wait(20)
    seclog = tmp / "spool" / "security.log"
    events = collections.Counter(
        line.split("\t")[1] for line in seclog.read_text().splitlines()) if seclog.exists() else {}
    return {"teaser": teaser, "counts": counts, "outcome": outcome, "elapsed": elapsed,
            "delivered": delivered(tmp / "spool"), "events": events}


def report(r: dict, delay: float) -> None:
    counts, got = r["counts"], r["delivered"]
    print(f"\n== SmtpGreetingDelay={delay:g} s, SmtpGreetingTeaser={int(r['teaser'])} "
          f"(run took {r['elapsed']:.1f} s) ==")
    print(f"{'class':<10} {'clients':>8} {'delivered':>10} {'refused':>8}  client view")
    bots = refused_bots = 0
    for kind in CLASSES:
        n, d = counts[kind], got.get(kind, 0)
        view = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcome"][kind].items()))
        print(f"{kind:<10} {n:>8} {d:>10} {n - d:>8}  {view}")
        if kind != "legit":
            bots += n
            refused_bots += n - d
    lost = counts["legit"] - got.get("legit", 0)
    print(f"bot messages refused: {refused_bots}/{bots} = {100 * refused_bots / max(bots, 1):.1f} %"
          f"  (of the bots that do not behave like an MTA, all but 'patient': "
          f"{refused_bots}/{bots - counts['patient']})")
    print(f"legitimate messages lost: {lost}")
    print("security log lines by event: " + ", ".join(f"{k}={v}" for k, v in sorted(r["events"].items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay", type=float, default=2.5)
    ap.add_argument("--giveup", type=int, default=300)
    ap.add_argument("--early", type=int, default=300)
    ap.add_argument("--reactive", type=int, default=100)
    ap.add_argument("--patient", type=int, default=100)
    ap.add_argument("--legit", type=int, default=100)
    ap.add_argument("--spread", type=float, default=5.0, help="clients arrive within this many seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--teaser", choices=["both", "off", "on"], default="both")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.teaser]
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-bots-") as tmp:
        for teaser in modes:
            sub = Path(tmp) / f"teaser{int(teaser)}"
            sub.mkdir()
            r = run(args, teaser, sub)
            report(r, args.delay)
            failed |= r["counts"]["legit"] != r["delivered"].get("legit", 0)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
