"""Listeners behind a load balancer: the PROXY protocol (``haproxy:``).

Twisted's ``haproxy:`` endpoint connects the wrapped protocol as soon as the
TCP connection opens, before the PROXY header has arrived; a session that
asks ``transport.getPeer()`` in ``connectionMade`` then sees the load
balancer, not the client.  For mailguard that would decide the greeting
delay, and later trust, on the wrong address.  Here the SMTP session starts
only once the header has been read, so every decision sees the client the
header names (SPEC "Trust").  A connection that sends no valid header within
C{timeout} seconds is closed without a word.

``PROXY UNKNOWN`` (version 1; a health check, or a connection the load
balancer could not describe) and version 2's ``LOCAL`` carry no client:
the PROXY protocol says to use the connection's real addresses then (the
load balancer's), and the session starts as for any other header.
Twisted's version-1 parser refuses ``PROXY UNKNOWN`` with nothing after
it (it wants a space and more), so that line is read here.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, providedBy

HEADER_TIMEOUT = 10.0
_UNKNOWN = b"PROXY UNKNOWN"


class _V1Parser(V1Parser):
    """Twisted's version-1 parser, and ``PROXY UNKNOWN`` alone on its line
    (the PROXY protocol, section 2.1: "the receiver must ignore anything
    presented before the CRLF is found" after ``UNKNOWN``)."""

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        if line == _UNKNOWN or line.startswith(_UNKNOWN + b" "):
            return ProxyInfo(line, None, None)  # getPeer/getHost: the real addresses
        return super().parse(line)


class _Collector:
    """Stands in for the session while the header is parsed: keeps the
    bytes that followed the header in the same packet."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        pass


class ProxyHeaderProtocol(HAProxyProtocolWrapper):
    _session = None
    _timer = None

    def makeConnection(self, transport) -> None:
        # ProtocolWrapper.makeConnection without connecting the session yet.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._session, self.wrappedProtocol = self.wrappedProtocol, _Collector()
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._no_header)

    def _no_header(self) -> None:
        self._timer = None
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._session is None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None and data[:6] == b"PROXY " and len(data) >= 8:
            self._parser = _V1Parser()  # as the wrapper would choose V1Parser
        super().dataReceived(data)  # parses the header; keeps what follows
        if self._proxyInfo is not None and self._session is not None and not self.disconnecting:
            early = self.wrappedProtocol.data
            self._start()
            if early:
                self.wrappedProtocol.dataReceived(early)

    def _start(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        session, self._session = self._session, None
        self.wrappedProtocol = session
        session.makeConnection(self)

    def connectionLost(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._session = None  # never started: nothing to tell it
        super().connectionLost(reason)


class ProxyHeaderFactory(HAProxyWrappingFactory):
    protocol = ProxyHeaderProtocol

    def __init__(self, wrappedFactory, clock, timeout: float = HEADER_TIMEOUT) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.timeout = timeout
