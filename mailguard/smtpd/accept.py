"""Listening when the process is out of file descriptors.

When ``accept()`` fails for want of a descriptor (``EMFILE``), Twisted
frees a reserved one, accepts every waiting connection and closes it
without a word, and logs a line per connection: a flood of log lines, and
trusted clients dropped with the rest.  mailguard keeps a reserve of
descriptors so that this should not happen (the connection limit is fitted
to the open-file limit at start-up, L{mailguard.policy.budgets.descriptor_plan});
if it happens all the same, L{AcceptGuard} makes it quiet and harmless:
the listener stops accepting for a moment (waiting connections stay in
the kernel's queue, to be served once descriptors are free), and one line
is logged per interval, with a count.

L{GuardedEndpoint} wraps a server endpoint so that each port it listens
on is guarded.
"""

from __future__ import annotations

import errno

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["AcceptGuard", "GuardedEndpoint"]

log = Logger()

# accept() errors that mean "no descriptor or buffer for a new connection now".
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE = 1.0  # seconds without accepting after such an error
LOG_INTERVAL = 60.0  # at most one log line per this many seconds


class AcceptGuard:
    """Stands in for a listening port's socket: C{accept} that pauses the
    port instead of failing for want of descriptors.  Anything else is the
    socket's own."""

    def __init__(self, sock, port, clock, pause: float = PAUSE, interval: float = LOG_INTERVAL) -> None:
        self._sock = sock
        self._port = port
        self._clock = clock
        self._pause = pause
        self._interval = interval
        self._resume = None
        self._last_log: float | None = None
        self.exhausted = 0  # such errors since the last log line

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def accept(self):
        try:
            return self._sock.accept()
        except OSError as e:
            if e.errno not in _EXHAUSTED:
                raise
            self._exhausted(e.errno)
            # To the port's accept loop: no more connections for now.
            raise BlockingIOError(errno.EAGAIN, "accepting paused") from None

    def _exhausted(self, code: int) -> None:
        self.exhausted += 1
        now = self._clock.seconds()
        if self._last_log is None or now - self._last_log >= self._interval:
            log.warn("cannot accept connections: {error} ({count} time(s) since the last message); "
                     "accepting pauses {pause:g} s each time (SmtpMaxConnections, ulimit -n)",
                     error=errno.errorcode.get(code, str(code)), count=self.exhausted, pause=self._pause)
            self._last_log, self.exhausted = now, 0
        if self._resume is None or not self._resume.active():
            self._port.stopReading()
            self._resume = self._clock.callLater(self._pause, self._start)

    def _start(self) -> None:
        self._resume = None
        if getattr(self._port, "connected", True):
            self._port.startReading()


@implementer(IStreamServerEndpoint)
class GuardedEndpoint:
    """A server endpoint whose ports are guarded by L{AcceptGuard}."""

    def __init__(self, endpoint, clock) -> None:
        self._endpoint = endpoint
        self._clock = clock

    def listen(self, factory):
        return self._endpoint.listen(factory).addCallback(self._guard)

    def _guard(self, port):
        sock = getattr(port, "socket", None)
        if sock is not None and hasattr(port, "stopReading"):
            port.socket = AcceptGuard(sock, port, self._clock)
        return port
