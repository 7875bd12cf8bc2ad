"""The security log: one line per detected attack.

Kerio writes recognised spam attacks to its Security log, and warns that a
busy server can overflow it.  So this log is bounded: when the file passes
C{max_bytes} it is rotated to ``FILE.1`` (one generation kept).  Lines are
queued and written in batches from a thread, so a slow disk never stalls the
reactor; a flood beyond C{max_pending} queued lines is counted and
summarised instead of queued.

Line format (tab-separated, one event per line)::

    2026-11-27T14:03:05Z  early-talker  203.0.113.9  51234  waited=3.02  first=b'EHLO x\\r\\n'
"""

from __future__ import annotations

import os
import time

from twisted.logger import Logger
from zope.interface import implementer

from mailguard.interfaces import ISecurityLog

log = Logger()


def _escape(data: bytes, limit: int = 64) -> str:
    return repr(bytes(data[:limit]))


def format_line(when: float, event: str, host: str, port: int, waited: float, first_bytes: bytes) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return f"{stamp}\t{event}\t{host}\t{port}\twaited={waited:.2f}\tfirst={_escape(first_bytes)}\n"


@implementer(ISecurityLog)
class SecurityLog:
    def __init__(self, path: str, reactor, max_bytes: int = 10 * 1024 * 1024,
                 max_pending: int = 10000, threaded: bool = True) -> None:
        self.path = path
        self.reactor = reactor
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.threaded = threaded
        self._pending: list[str] = []
        self._dropped = 0
        self._flushing = False
        self.written = 0

    def record(self, event, host, port, waited, first_bytes=b"") -> None:
        if len(self._pending) >= self.max_pending:
            self._dropped += 1
        else:
            self._pending.append(format_line(self.reactor.seconds(), event, host, port, waited, first_bytes))
        log.info("security: {event} from {host}:{port} after {waited:.2f}s",
                 event=event, host=host, port=port, waited=waited)
        if not self._flushing:
            self._flushing = True
            self.reactor.callLater(0, self._flush)

    def _take(self) -> list[str]:
        lines, self._pending = self._pending, []
        if self._dropped:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.reactor.seconds()))
            lines.append(f"{stamp}\tdropped\t-\t-\tcount={self._dropped}\n")
            self._dropped = 0
        return lines

    def _flush(self):
        lines = self._take()
        if not lines:
            self._flushing = False
            return None
        if self.threaded:
            from twisted.internet.threads import deferToThreadPool

            d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._write, lines)
        else:
            from twisted.internet.defer import maybeDeferred

            d = maybeDeferred(self._write, lines)
        d.addErrback(lambda f: log.failure("security log write failed", f))
        d.addBoth(lambda _: self._after_flush())
        return d

    def _after_flush(self):
        if self._pending or self._dropped:
            return self._flush()
        self._flushing = False

    def _write(self, lines: list[str]) -> None:
        data = "".join(lines).encode("utf-8", "replace")
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            os.replace(self.path, self.path + ".1")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self.written += len(lines)
