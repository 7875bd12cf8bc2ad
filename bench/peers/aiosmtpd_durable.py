"""Benchmark peer: aiosmtpd doing mailguard's durable write before ``250``.

    python bench/peers/aiosmtpd_durable.py --port PORT --maildir DIR
           [--max-size BYTES] [--threads 10] [--domain example.com]

An ``aiosmtpd.smtp.SMTP`` server on asyncio, bound to 127.0.0.1 only.
Its handler accepts recipients of ``--domain`` (``550`` for others) and, at
the end of DATA, runs ``durable.deliver`` (write to ``tmp/``, fsync, rename
into ``new/``, fsync ``new/``, see ``durable.py``) in a thread pool, then
answers ``250``.

Fairness notes:

- aiosmtpd reads DATA a line at a time (``StreamReader.readuntil``) and
  holds the whole message in memory; the handler gets it at the end.  That
  is aiosmtpd's design, measured as it is.
- The blocking disk work runs in a ``ThreadPoolExecutor`` of ``--threads``
  workers (default 10, the maximum of Twisted's reactor thread pool that
  mailguard and the twisted.mail peer use), not on the event loop, so
  concurrent sessions overlap their fsyncs the same way.
- No greeting delay, no VRFY, no relay policy: the peers measure the
  framework plus the durable write, mailguard pays for its full policy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import durable  # noqa: E402
from aiosmtpd.smtp import SMTP  # noqa: E402


class DurableHandler:
    def __init__(self, maildir: str, domain: str, executor: ThreadPoolExecutor) -> None:
        self.maildir = maildir
        self.domain = domain.lower()
        self.executor = executor

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.rpartition("@")[2].lower() != self.domain:
            return "550 5.1.1 Unknown recipient"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        loop = asyncio.get_running_loop()
        try:
            name = await loop.run_in_executor(self.executor, durable.deliver,
                                              self.maildir, envelope.original_content)
        except OSError:
            return "451 4.3.0 Cannot store message"
        return f"250 2.0.0 Ok: queued as {name.split('.')[1]}"


async def serve(args) -> None:
    durable.ensure_maildir(args.maildir)
    executor = ThreadPoolExecutor(max_workers=args.threads)
    handler = DurableHandler(args.maildir, args.domain, executor)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=args.max_size, hostname="mx.example.com"),
        "127.0.0.1", args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    executor.shutdown(wait=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--max-size", type=int, default=31457280)
    p.add_argument("--threads", type=int, default=10)
    p.add_argument("--domain", default="example.com")
    asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
