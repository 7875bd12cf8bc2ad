"""When to stop reading from one client, and when to stop waiting for it:
the Twisted side of bounded memory and of deadlines.

A client that pipelines commands and never reads the replies makes every
command it sends a reply that waits in the server's memory; a client that
keeps sending while a check is pending makes input wait there.  Neither
may grow without bound.  While replies wait to be sent the session makes
no more (its input waits unread); while too much input waits, reading
from the client stops, and TCP holds the client back (its sends block),
not mailguard's memory.

L{ReadGate} is registered with the transport as a streaming producer
(Twisted's producer/consumer API): the transport calls
C{pauseProducing} when its unsent output passes its high-water mark (its
C{bufferSize}, 64 KiB) and C{resumeProducing} when that output has been
sent; the adapter (L{mailguard.smtpd.protocol}) stops pulling events
from the session in between.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from mailguard.policy.budgets import DataDeadline

__all__ = ["IdleDeadline", "ReadGate"]


@implementer(IPushProducer)
class ReadGate:
    """Reading from one transport, paused while too much input waits; and
    the transport's word that its output waits.

    The two are apart on purpose: a full output buffer stops the session
    making replies (L{output_waiting}), not the transport reading -- a TLS
    handshake buffers the greeting the same way, and needs to read to
    finish.  Input then waits in the session, and past the adapter's
    bound L{hold} stops the reading.

    @param drained: called when the transport has sent what waited (the
        adapter then goes on with the session).
    """

    __slots__ = ("transport", "output_waiting", "holding", "_drained")

    def __init__(self, transport, drained: Callable[[], None]) -> None:
        self.transport = transport
        self.output_waiting = False
        self.holding = False
        self._drained = drained
        transport.registerProducer(self, True)

    def hold(self) -> None:
        """Stop reading (too much input waits)."""
        if not self.holding and self.transport is not None:
            self.holding = True
            self.transport.pauseProducing()

    def release(self) -> None:
        if self.holding and self.transport is not None:
            self.holding = False
            self.transport.resumeProducing()

    def detach(self) -> None:
        """Before closing: a transport does not close while a producer is
        registered."""
        if self.transport is not None:
            self.transport.unregisterProducer()
            self.transport = None

    # -- IPushProducer: the transport's word about its output -------------------------
    def pauseProducing(self) -> None:
        self.output_waiting = True

    def resumeProducing(self) -> None:
        if self.output_waiting and self.transport is not None:
            self.output_waiting = False
            self._drained()

    def stopProducing(self) -> None:
        """The connection is gone."""
        self.output_waiting = self.holding = False
        self.transport = None


class IdleDeadline:
    """The idle timer, as one deadline that bytes cannot push back.

    It starts again only when the session has read a whole command (or
    message): its C{progress} count moved (L{read}).  While a message
    arrives each read earns time at ``SmtpMinDataRate`` octets per second
    (L{received}; L{mailguard.policy.budgets.DataDeadline}).  A client
    that trickles a command line or a message one byte at a time is cut
    off (C{expired(*args)}: ``421 4.4.2``) as one that sends nothing.
    Stands in for the delayed call (C{active}, C{cancel}).
    """

    __slots__ = ("clock", "timeout", "budget", "call", "progress")

    def __init__(self, clock, timeout: float, min_rate: int, expired: Callable, *args) -> None:
        self.clock, self.timeout, self.progress = clock, timeout, 0
        self.budget = DataDeadline(timeout, min_rate)
        self.budget.start(clock.seconds())
        self.call = clock.callLater(timeout, expired, *args)

    def read(self, progress: int) -> None:
        if progress != self.progress and self.call.active():
            self.progress = progress
            self.call.reset(self.timeout)
            self.budget.start(self.clock.seconds())

    def received(self, octets: int) -> None:
        if self.call.active():
            now = self.clock.seconds()
            self.call.reset(max(0.0, self.budget.received(octets, now) - now))

    def active(self) -> bool:
        return self.call.active()

    def cancel(self) -> None:
        self.call.cancel()
