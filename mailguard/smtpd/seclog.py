"""The security log: one line per detected attack.

Kerio writes recognised spam attacks to its Security log, and warns that a
busy server can overflow it.  So this log is bounded on disk and in memory:

- **Rotation by size.**  Before a batch would take the file past
  C{max_bytes} (``SecurityLogMaxBytes``, default 10 MiB), ``FILE.1`` ...
  become ``FILE.2`` ... (the oldest, ``FILE.N``, is dropped), the file
  becomes ``FILE.1`` and a new file is started: C{generations}
  (``SecurityLogGenerations``, default 5) old files are kept, at most
  about (N + 1) x C{max_bytes} on disk.  An attack that fills one file
  in minutes must not push the evidence of the one before out at once.
  C{max_bytes=0} turns rotation off (the file then grows without bound:
  leave it to logrotate).
- **Never blocks the reactor.**  C{record} only formats a line and appends
  it to a list; the lines are written in batches from the reactor's thread
  pool (C{threaded=True}), one batch at a time.
- **Bounded queue.**  Past C{max_pending} queued lines (a flood while the
  disk is slow), further events are counted, not queued, and the next
  batch ends with one ``dropped`` line giving the count; the same count
  goes to the twistd log (a warning) and to the metrics, so a loss is
  never silent.
- **Nothing lost at a clean shutdown.**  With a real reactor, queued lines
  are written before the reactor stops (a "before shutdown" trigger).

Line format: tab-separated, UTC, one event per line::

    2026-11-27T14:03:05Z<TAB>early-talker<TAB>203.0.113.9<TAB>51234<TAB>waited=3.02<TAB>first=b'EHLO x\\r\\n'
    2026-11-27T14:03:31Z<TAB>gave-up<TAB>198.51.100.7<TAB>40022<TAB>waited=12.50<TAB>first=b''
    2026-11-27T14:04:00Z<TAB>dropped<TAB>-<TAB>-<TAB>count=1234

``first`` is the Python C{repr} of the first 64 bytes the client sent:
printable ASCII as is, quotes, backslashes, CR, LF, TAB and everything else
escaped, so a line never contains a raw control character or a tab.

The abuse budgets (L{mailguard.policy.budgets}) write the same first four
columns, then ``name=value`` fields (L{format_fields})::

    2026-11-27T14:05:00Z<TAB>auth-failed<TAB>203.0.113.9<TAB>51234<TAB>mechanism=PLAIN<TAB>user=alice@example.com
    2026-11-27T14:05:09Z<TAB>auth-lockout<TAB>203.0.113.9<TAB>51240<TAB>failures=20<TAB>window=600<TAB>locked=600<TAB>mechanism=LOGIN<TAB>user=bob
    2026-11-27T14:06:00Z<TAB>error-limit<TAB>198.51.100.7<TAB>40022<TAB>errors=100<TAB>window=600<TAB>locked=600
    2026-11-27T14:06:30Z<TAB>connection-rate<TAB>198.51.100.7<TAB>40188<TAB>limit=30/min

A value of letters, digits and ``. @ + - _ : /`` is written as it is;
anything else (a user name an attacker chose) as a JSON string, with every
control character, quote, backslash and non-ASCII character escaped.  A
password is never a field.
"""

from __future__ import annotations

import json
import os
import re
import time

from twisted.logger import Logger
from zope.interface import implementer

from mailguard.interfaces import ISecurityLog
from mailguard.operational import named, report

log = Logger()


def _escape(data: bytes, limit: int = 64) -> str:
    return repr(bytes(data[:limit]))


def format_line(when: float, event: str, host: str, port: int, waited: float, first_bytes: bytes) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return f"{stamp}\t{event}\t{host}\t{port}\twaited={waited:.2f}\tfirst={_escape(first_bytes)}\n"


_PLAIN = re.compile(r"[A-Za-z0-9.@+_:/-]+")


def format_fields(fields: dict) -> str:
    """C{name=value} pairs, tab-separated, each value escaped if it needs to be."""
    out = []
    for name, value in fields.items():
        text = str(value)
        out.append(f"{name}={text if _PLAIN.fullmatch(text) else json.dumps(text[:256])}")
    return "\t".join(out)


def format_note(when: float, event: str, host: str, port: int, fields: dict) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    tail = format_fields(fields)
    return f"{stamp}\t{event}\t{host}\t{port}" + (f"\t{tail}" if tail else "") + "\n"


@implementer(ISecurityLog)
class SecurityLog:
    def __init__(self, path: str, reactor, max_bytes: int = 10 * 1024 * 1024,
                 max_pending: int = 10000, threaded: bool = True, generations: int = 5) -> None:
        self.path = path
        self.reactor = reactor
        self.max_bytes = max_bytes
        self.generations = generations
        self.dropped = 0  # lines counted, not written, since the start (metrics)
        self.max_pending = max_pending
        self.threaded = threaded
        self._pending: list[str] = []
        self._dropped = 0
        self._flushing = False
        self._waiters: list = []
        self.written = 0
        add_trigger = getattr(reactor, "addSystemEventTrigger", None)
        if threaded and add_trigger is not None:
            add_trigger("before", "shutdown", self.flush)

    def record(self, event, host, port, waited, first_bytes=b"") -> None:
        self._queue(format_line(self.reactor.seconds(), event, host, port, waited, first_bytes))

    def note(self, event, host, port, **fields) -> None:
        self._queue(format_note(self.reactor.seconds(), event, host, port, fields))

    def _queue(self, line: str) -> None:
        if len(self._pending) >= self.max_pending:
            self._dropped += 1
            self.dropped += 1
        else:
            self._pending.append(line)
        # Not echoed to the twistd log: under attack that would be one line
        # per bot in a log that is not bounded like this one.
        if not self._flushing:
            self._flushing = True
            self.reactor.callLater(0, self._flush)

    def flush(self):
        """A Deferred that fires once every queued line is written (the
        reactor waits for it at shutdown)."""
        from twisted.internet.defer import Deferred, succeed

        if not self._pending and not self._dropped and not self._flushing:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        if not self._flushing:
            self._flushing = True
            self.reactor.callLater(0, self._flush)
        return d

    def _take(self) -> list[str]:
        lines, self._pending = self._pending, []
        if self._dropped:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.reactor.seconds()))
            lines.append(f"{stamp}\tdropped\t-\t-\tcount={self._dropped}\n")
            log.warn("security-log-dropped count={count} file={file}", count=self._dropped, file=self.path)
            self._dropped = 0
        return lines

    def _flush(self):
        lines = self._take()
        if not lines:
            self._done()
            return None
        if self.threaded:
            from twisted.internet.threads import deferToThreadPool

            d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._write, lines)
        else:
            from twisted.internet.defer import maybeDeferred

            d = maybeDeferred(self._write, lines)
        d.addErrback(lambda f, n=len(lines): report(log, f, "security-log-failed", {"file": self.path, "lost": n},
                                                    "later lines are tried again"))
        d.addBoth(lambda _: self._after_flush())
        return d

    def _after_flush(self):
        if self._pending or self._dropped:
            return self._flush()
        self._done()

    def _done(self) -> None:
        self._flushing = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _write(self, lines: list[str]) -> None:
        data = "".join(lines).encode("utf-8", "replace")
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = 0
        if self.max_bytes and size and size + len(data) > self.max_bytes:
            self._rotate()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
        except OSError as e:
            raise named(e, self.path)
        finally:
            os.close(fd)
        self.written += len(lines)

    def _rotate(self) -> None:
        """FILE.(N-1) -> FILE.N ... FILE -> FILE.1 (N = C{generations};
        0: the full file is simply removed)."""
        path, n = self.path, self.generations
        if n <= 0:
            os.unlink(path)
            return
        for i in range(n - 1, 0, -1):
            try:
                os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            except FileNotFoundError:
                pass
        os.replace(path, path + ".1")
