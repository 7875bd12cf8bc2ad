"""Benchmark peer: plain twisted.mail doing mailguard's durable write.

    python bench/peers/twisted_durable.py --port PORT --maildir DIR
           [--max-size BYTES] [--domain example.com]

A stock ``twisted.mail.smtp.SMTPFactory`` building ``smtp.ESMTP`` on the
default reactor, bound to 127.0.0.1 only, with an ``IMessageDelivery``
that accepts recipients of ``--domain`` (``550`` for others).  Its
``IMessage`` is what twisted.mail invites you to write:

- ``lineReceived(line)`` is called by twisted.mail once per DATA line
  (already unstuffed, without its line end); each line goes into a
  buffered file in ``MAILDIR/tmp/`` with ``\\n``, as twisted.mail's own
  maildir does;
- ``eomReceived()`` flushes the buffer and runs ``durable.commit`` (fsync,
  rename into ``new/``, fsync ``new/``) in the reactor's thread pool
  (``deferToThread``: at most 10 threads, the same pool mailguard uses),
  and twisted.mail answers ``250`` when its Deferred fires.

Messages over ``--max-size`` (default 31457280, the benchmark's
``MaxMessageSize``) are refused with ``552`` at the end of DATA.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import durable  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.mail import smtp  # noqa: E402
from zope.interface import implementer  # noqa: E402


@implementer(smtp.IMessage)
class DurableMessage:
    def __init__(self, maildir: str, max_size: int) -> None:
        self.maildir = maildir
        self.max_size = max_size
        fd, self.name = durable.open_tmp(maildir)
        self.file = os.fdopen(fd, "wb", buffering=65536)
        self.size = 0

    def lineReceived(self, line: bytes) -> None:
        self.size += len(line) + 1
        if self.size > self.max_size:
            raise smtp.SMTPServerError(552, b"5.3.4 Message too big")
        self.file.write(line + b"\n")

    def eomReceived(self):
        self.file.flush()
        fd = os.dup(self.file.fileno())
        self.file.close()
        self.file = None
        return deferToThread(durable.commit, self.maildir, fd, self.name)

    def connectionLost(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        durable.abort(self.maildir, None, self.name)


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, maildir: str, domain: str, max_size: int) -> None:
        self.maildir = maildir
        self.domain = domain.lower().encode("ascii")
        self.max_size = max_size

    def receivedHeader(self, helo, origin, recipients):
        return (b"Received: from " + helo[0] + b" ([" + helo[1] + b"])\n\tby mx.example.com with ESMTP;\n\t"
                + smtp.rfc822date())

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        if user.dest.domain.lower() != self.domain:
            raise smtp.SMTPBadRcpt(user)
        return lambda: DurableMessage(self.maildir, self.max_size)


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    noisy = False
    domain = b"mx.example.com"

    def __init__(self, delivery: Delivery) -> None:
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.delivery = self.delivery
        p.noisy = False
        return p


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--max-size", type=int, default=31457280)
    p.add_argument("--domain", default="example.com")
    args = p.parse_args(argv)
    durable.ensure_maildir(args.maildir)
    reactor.listenTCP(args.port, Factory(Delivery(args.maildir, args.domain, args.max_size)),
                      backlog=1024, interface="127.0.0.1")
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.run()


if __name__ == "__main__":
    main()
