#!/usr/bin/env python3
"""What counting Received fields (mail loops, ``SmtpHopCountLimit``) costs
the DATA path.

The sans-IO session (``mailguard.smtpd.session.ServerSession``) reads whole
messages, as the Twisted adapter would hand them over in 64 KiB reads, and
the events are drained (the bytes for the store are dropped: the disk is
not measured here).  Each workload runs with the counter and with it
switched off (a counter that says the header ended before it began), in
alternation, best of N.  Workloads: one 20 MB message (the header, then a
body the counter never looks at), and 20,000 messages of 1 KB with 10
Received fields each (where the header is most of the message).

    .venv/bin/python bench/bench_hops.py [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailguard.policy.decide import RecipientVerdict  # noqa: E402
from mailguard.policy.session import Session  # noqa: E402
from mailguard.smtpd import events as E  # noqa: E402
from mailguard.smtpd import hops  # noqa: E402
from mailguard.smtpd.session import ServerSession  # noqa: E402
from mailguard.testing import make_context  # noqa: E402
from mailguard import replies as R  # noqa: E402

READ = 64 * 1024
RECEIVED = b"".join(b"Received: from relay%d.example (relay%d.example [192.0.2.%d])\r\n"
                    b"\tby mx%d.example with ESMTP id X%d; Mon, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i, i, i, i)
                    for i in range(10))


class NoCounter(hops.ReceivedCounter):
    """The counter switched off: the header is over before it starts."""

    def __init__(self) -> None:
        super().__init__()
        self.in_header = False


def message(size: int) -> bytes:
    head = RECEIVED + b"From: a@example.org\r\nTo: john@example.com\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max((size - len(head)) // len(line), 1)


def drain(m: ServerSession) -> int:
    """Carry out the session's events as the adapter would; the number of
    message bytes it handed over."""
    n = 0
    while True:
        event = m.next_event()
        kind = type(event)
        if kind is E.WriteMessage:
            n += len(event.data)
        elif kind is E.CheckRecipient:
            m.answer(RecipientVerdict(R.RECIPIENT_OK, "bench", mailboxes=("john@example.com",),
                                      address="john@example.com"))
        elif kind in (E.BeginMessage, E.CommitMessage):
            m.answer(None)
        elif isinstance(event, E.Signal):
            return n


def run(ctx, data: bytes, count: int) -> float:
    """Seconds to receive C{count} messages of C{data} in one session."""
    m = ServerSession(Session("127.0.0.2", 40000, "smtp"), ctx)
    m.greet()
    m.receive_data(b"EHLO bench.example\r\n")
    drain(m)
    wire = data + b".\r\n"
    start = time.perf_counter()
    got = 0
    for _ in range(count):
        m.receive_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
        drain(m)
        for i in range(0, len(wire), READ):
            m.receive_data(wire[i:i + READ])
            got += drain(m)
    elapsed = time.perf_counter() - start
    assert got >= len(data) * count, "the messages were not read"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ctx = make_context()
    workloads = [("one 20 MB message", message(20 * 1000 * 1000), 1, "MB/s"),
                 ("20,000 messages of 1 KB", message(1024), 20000, "messages/s")]
    real = hops.ReceivedCounter
    print(f"{'workload':28} {'counter':>14} {'no counter':>14} {'cost':>8}")
    for name, data, count, unit in workloads:
        best = {"counter": float("inf"), "off": float("inf")}
        for _ in range(args.repeats):
            for mode in ("counter", "off"):
                hops_module = sys.modules["mailguard.smtpd.session"]
                hops_module.ReceivedCounter = real if mode == "counter" else NoCounter
                best[mode] = min(best[mode], run(ctx, data, count))
        hops_module.ReceivedCounter = real
        rate = (lambda s: len(data) * count / s / 1e6) if unit == "MB/s" else (lambda s: count / s)
        cost = (best["counter"] / best["off"] - 1) * 100
        print(f"{name:28} {rate(best['counter']):10.1f} {unit:>4}"
              f" {rate(best['off']):10.1f} {unit:>4} {cost:+7.1f}%")


if __name__ == "__main__":
    main()
