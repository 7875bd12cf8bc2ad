"""Graceful stop, the side that waits: every connection is told the server
is stopping, and the stop waits for them, within a grace period.

What each connection does is decided by its session
(L{mailguard.smtpd.session.ServerSession.shut_down}): a client held in the
greeting delay, an idle session or one between commands gets ``421 4.3.2``
and is closed at once; a message being received may finish -- its final
dot is answered as ever, a ``250`` still meaning fsynced, then ``421``.
Here only the clock:

    0                 every connection is told (L{Drain.start})
    grace             a message still arriving is cut short: discarded, 421
                      (one being committed still gets its answer)
    grace + LINGER    whatever is still open is aborted: a client that
                      never reads its 421, a commit the disk never finishes

The stop is over when the last connection is gone.  A second stop signal
ends the grace at once, a third the linger (L{Drain.hurry}).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailguard.smtpd.events import DATA

__all__ = ["LINGER", "Drain", "Drained"]

log = Logger()

#: Seconds after the grace for the last replies to go out before what is
#: left is aborted.
LINGER = 5.0


@dataclass
class Drained:
    """How the stop went, counted per connection."""

    at_once: int = 0  # closed with 421 at the start (held, idle, mid-transaction)
    finishing: int = 0  # given the grace to finish a message
    cut_short: int = 0  # still in DATA when the grace ended
    aborted: int = 0  # still open after the linger


class Drain:
    """Stops the connections counted by C{connections} (a
    L{mailguard.smtpd.context.Connections}) gracefully.

    @param clock: an C{IReactorTime}.
    @param grace: seconds a message being received may take to finish
        (``SmtpShutdownGrace``).
    """

    def __init__(self, connections, clock: IReactorTime, grace: float) -> None:
        self.connections = connections
        self.clock = clock
        self.grace = grace
        self.result = Drained()
        self._done: defer.Deferred | None = None
        self._timer = None

    def start(self) -> defer.Deferred:
        """Tell every connection; a Deferred that fires with L{Drained}
        once none is left.  Calling it again returns the same wait."""
        if self._done is not None:
            return self._done
        connections = self.connections
        connections.stop()  # a connection accepted from now on is told 421 too
        result = self.result
        for proto in list(connections.sessions):
            if proto.shut_down():
                result.finishing += 1
            else:
                result.at_once += 1
        if result.at_once or result.finishing:
            log.info("stopping: {at_once} connection(s) closed with 421 4.3.2, {finishing} finishing "
                     "a message (grace {grace:g} s)", at_once=result.at_once, finishing=result.finishing,
                     grace=self.grace)
        self._done = connections.when_empty()
        self._done.addCallback(self._over)
        if connections.sessions:
            self._timer = self.clock.callLater(self.grace, self._grace_over)
        return self._done

    def hurry(self) -> None:
        """End the grace now (a second SIGTERM), or before it starts."""
        self.grace = 0.0
        if self._timer is not None and self._timer.active():
            self._timer.reset(0)  # in the linger (a third signal): abort now

    def _grace_over(self) -> None:
        for proto in list(self.connections.sessions):
            if getattr(proto, "closed", False):
                continue
            mid = proto.smtp is not None and proto.smtp.mode is DATA
            proto.shut_down(force=True)
            self.result.cut_short += mid
        if self.result.cut_short:
            log.warn("stopping: the grace is over: {n} message(s) cut short with 421 4.3.2 (not stored)",
                     n=self.result.cut_short)
        self._timer = self.clock.callLater(LINGER, self._abort)

    def _abort(self) -> None:
        self._timer = None
        left = list(self.connections.sessions)
        self.result.aborted = len(left)
        if left:
            log.warn("stopping: {n} connection(s) still open {s:g} s after the grace: aborted",
                     n=len(left), s=LINGER)
        for proto in left:
            proto.transport.abortConnection()

    def _over(self, _):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.result
