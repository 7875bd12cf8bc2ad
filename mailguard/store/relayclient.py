"""The relay queue's SMTP client: connections to the next hop
(``--relay-host``) and the ESMTP transactions that deliver queue entries.

A L{Worker} is one connection: it asks its queue for the next due entry,
delivers it with a L{RelayClient} (a ``twisted.mail.smtp.ESMTPClient``),
hands the L{mailguard.store.entries.Outcome} back, and asks again until
nothing is due.  STARTTLS is used when the next hop offers it
(opportunistic: no certificate check, and a refused or failed TLS
handshake falls back to plain text), unless ``RelayHostTlsVerify=1``:
then TLS is required and the certificate is checked (L{client_tls}).  DSN
parameters are passed on when the next hop offers ``DSN``.

Why a module of its own: the queue decides *what* to send and *when*
(L{mailguard.store.queue}); this module only moves bytes.  It does not
import the queue: a worker talks to it through the few methods listed in
L{Worker}'s docstring, so it can be driven by anything that provides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic

from mailguard.logs import emit
from mailguard.policy.addresses import command_injection
from mailguard.store.entries import Outcome, QueueEntry
from mailguard.store.envelope import queue_id
from mailguard.store.folding import LINE_LIMIT, LineFolder

__all__ = ["RelayClient", "RelayHop", "Worker", "client_tls", "describe", "endpoint_connector",
           "skip_return_path"]

log = Logger()


@dataclass(frozen=True)
class RelayHop:
    """How to reach and greet the next hop.

    @ivar name: the relay host's name (logs, ``Remote-MTA``).
    @ivar identity: the name sent in EHLO (C{InternetHostname}).
    @ivar tls: TLS client settings for STARTTLS, or None for none.
    @ivar tls_required: no delivery without TLS (``RelayHostTlsVerify=1``).
    @ivar timeout: seconds to wait for each reply.
    @ivar connect: C{factory -> Deferred[protocol]}.
    @ivar clock: the C{IReactorTime} the reply timeout runs on (the
        queue's); None: the global reactor.
    """

    name: str | None
    identity: str
    tls: Any
    tls_required: bool
    timeout: float | None
    connect: Callable
    clock: Any = None


def endpoint_connector(clock, host: str, port: int, timeout: float, bind_address: str = "") -> Callable:
    """A C{connect} for L{RelayHop}: a C{HostnameEndpoint} on C{clock},
    from C{bind_address} when one is given (RelayHostBindAddress, or the
    gateway's address)."""
    bind = (bind_address, 0) if bind_address else None

    def connect(factory):
        from twisted.internet.endpoints import HostnameEndpoint

        return HostnameEndpoint(clock, host, port, timeout=timeout, bindAddress=bind).connect(factory)

    return connect


def client_tls(host: str, verify: bool = False, ca_file: str = ""):
    """The TLS client settings for STARTTLS to the relay host: no
    certificate check (opportunistic), or with C{verify} a check against
    C{ca_file} (or the platform's trust store) for C{host}."""
    from twisted.internet import ssl

    if not verify:
        return ssl.CertificateOptions()
    if ca_file:
        with open(ca_file, "rb") as f:
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(host, trustRoot=trust)


def describe(value) -> str:
    """A short, one-line description of an error (an SMTPClientError's
    reply, or the exception text)."""
    resp = getattr(value, "resp", None)
    if isinstance(resp, bytes):
        code = getattr(value, "code", -1)
        text = resp.decode("utf-8", "replace")
        if code and code > 0:
            text = f"{code} {text}"
    else:
        text = str(value) or value.__class__.__name__
    return " ".join(text.split())[:300]


class Worker:
    """One connection to the relay host, delivering ready entries in turn.

    C{queue} is the scheduling side; it provides C{running},
    C{take_ready()} (the next due entry, marked in flight, or None),
    C{eml_path(id)}, C{attempted(entry, outcome)} and
    C{worker_ended(worker, host_error)} (C{host_error}: why the relay host
    could not be used, or None).
    """

    def __init__(self, queue, hop: RelayHop, use_tls: bool) -> None:
        self.queue = queue
        self.hop = hop
        self.use_tls = use_tls
        self.proto: RelayClient | None = None
        self._ended = False
        self._aborted = False
        self.fresh = True  # has not asked for an entry yet

    @property
    def aborted(self) -> bool:
        return self._aborted

    def start(self) -> None:
        d = defer.maybeDeferred(self.hop.connect, _RelayClientFactory(self))
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, proto) -> None:
        self.proto = proto
        if self._aborted:
            proto.transport.abortConnection()

    def _connect_failed(self, failure) -> None:
        self._end(f"connect to {self.hop.name}: {describe(failure.value)}")

    def abort(self) -> None:
        self._aborted = True
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()

    def next_entry(self) -> QueueEntry | None:
        self.fresh = False
        if self._aborted:
            return None
        return self.queue.take_ready()

    def done(self, entry: QueueEntry, outcome: Outcome) -> None:
        if self._aborted and not self.queue.running:
            entry.in_flight = False  # shutting down: the disk keeps the old state
            return
        self.queue.attempted(entry, outcome)

    def closed(self, proto: "RelayClient") -> None:
        if proto.tls_failed and not self.hop.tls_required and self.use_tls and not self._aborted:
            # Opportunistic TLS failed in the handshake: once more in clear.
            log.warn("STARTTLS to {host} failed ({why}); retrying without TLS",
                     host=self.hop.name, why=proto.error)
            self.use_tls = False
            self.proto = None
            self.start()
            return
        if not proto.session_ready and not self._aborted:
            self._end(proto.error or "connection closed before the first transaction")
        else:
            self._end(None)

    def _end(self, host_error: str | None) -> None:
        if self._ended:
            return
        self._ended = True
        self.fresh = False
        self.queue.worker_ended(self, host_error)


class _RelayClientFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def buildProtocol(self, addr):
        hop = self.worker.hop
        p = RelayClient(self.worker, hop.identity, hop.tls if self.worker.use_tls else None,
                        hop.tls_required, hop.timeout)
        if hop.clock is not None:
            p.callLater = hop.clock.callLater  # the reply timeout (TimeoutMixin) on the queue's clock
        p.factory = self
        return p


# The reply recorded for a command never sent because it would have broken
# the line (L{command_injection}): permanent, as the address is.
_NOT_SENT = b"5.5.4 Not sent: CR, LF or NUL in the command's argument"


def skip_return_path(f) -> None:
    """Position C{f} after a leading ``Return-Path:`` line: it records final
    delivery here and must not travel to the next hop (RFC 5321 4.4)."""
    first = f.readline()
    if not first.lower().startswith(b"return-path:"):
        f.seek(0)


class RelayClient(smtp.ESMTPClient):
    """An ESMTP client that delivers queue entries, one transaction each,
    until its worker has no more; records every reply per recipient.

    Subclasses ``twisted.mail.smtp.ESMTPClient`` for the greeting, EHLO
    (HELO fallback), STARTTLS and timeouts; the transaction itself is its
    own, because the inherited one loses per-recipient replies, cannot send
    ESMTP parameters (SIZE, BODY, DSN) and converts LF to CRLF in a message
    that is already CRLF.
    """

    debug = True
    heloFallback = True
    requireAuthentication = False

    def __init__(self, worker: Worker, identity: str, context, require_tls: bool,
                 timeout: float | None) -> None:
        smtp.ESMTPClient.__init__(self, None, context, identity, logsize=20)
        self.worker = worker
        self.requireTransportSecurity = require_tls
        self.timeout = timeout
        self.extensions: dict[bytes, bytes | None] = {}
        self.entry: QueueEntry | None = None
        self.outcome: Outcome | None = None
        self.error: str | None = None
        self.transactions = 0
        self.session_ready = False  # greeting, EHLO (and STARTTLS) done
        self.tls_started = False
        self.tls_failed = False
        self._items: dict = {}
        self._file = None
        self._folder: LineFolder | None = None
        self._closed = False

    # -- session set-up (inherited states, a few corrections) ------------------------
    def connectionMade(self):
        # The end of DATA is a small write right after the message: with
        # Nagle's algorithm it waits for the peer's delayed ACK (40 ms).
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)
        smtp.ESMTPClient.connectionMade(self)

    def esmtpState_serverConfig(self, code, resp):
        items = {}
        for line in resp.splitlines():
            e = line.split(None, 1)
            if e:
                items[e[0].upper()] = e[1] if len(e) > 1 else None
        self._items = items
        self.extensions = items
        self.tryTLS(code, resp, items)

    def smtpState_helo(self, code, resp):
        # EHLO refused: plain SMTP.  (The inherited state would send HELO
        # again and again if HELO were refused too.)
        self.extensions = {}
        self.sendLine(b"HELO " + self.identity)
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = self.smtpConnectionFailed

    def esmtpState_starttls(self, code, resp):
        try:
            self.transport.startTLS(self.context)
        except Exception as e:  # a broken context: no plain-text retry here
            self.tls_failed = True
            self._fail(f"STARTTLS: {e}")
            return
        self.tls_started = True
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def esmtpTLSFailed(self, code=-1, resp=None):
        # The server refused STARTTLS (after offering it).
        if self.requireTransportSecurity:
            return smtp.ESMTPClient.esmtpTLSFailed(self, code, resp)
        log.info("relay host refused STARTTLS ({code}); continuing without TLS", code=code)
        self.authenticate(code, resp, self._items)

    def esmtpTLSRequired(self, code=-1, resp=None):
        self._fail("relay host does not offer STARTTLS and RelayHostTlsVerify=1")

    def sendError(self, exc):
        self._fail(describe(exc))

    def timeoutConnection(self):
        self._fail("timeout waiting for the relay host")

    # -- transactions -------------------------------------------------------------------
    def smtpState_from(self, code, resp):
        self.session_ready = True
        entry = self.worker.next_entry()
        if entry is None:
            self._disconnectFromServer()
            return
        self.transactions += 1
        self.entry = entry
        ext = self.extensions
        self.outcome = Outcome(dsn=b"DSN" in ext, remote=self.worker.hop.name)
        try:
            self._file = open(self.worker.queue.eml_path(entry.id), "rb")
            skip_return_path(self._file)
        except OSError as e:
            self.outcome.error = f"cannot read the queued message: {e.strerror}"
            self.outcome.missing = isinstance(e, FileNotFoundError)
            self._entry_done()
            self._next_transaction()
            return
        params = []
        if b"SIZE" in ext:
            params.append(f"SIZE={entry.size}")
        if entry.body == "8BITMIME" and b"8BITMIME" in ext:
            params.append("BODY=8BITMIME")
        if self.outcome.dsn:
            if entry.ret:
                params.append(f"RET={entry.ret}")
            if entry.envid:
                params.append(f"ENVID={entry.envid}")
        self._rcpts = iter(entry.pending())
        self._accepted = 0
        self._last_rcpt = None
        line = " ".join([f"MAIL FROM:<{entry.sender}>", *params])
        if command_injection(line):
            log.warn("queue entry {id}: not sent: CR, LF or NUL in the sender or its parameters", id=entry.id)
            return self._mail_reply(501, _NOT_SENT)
        self._send_command(line, [], self._mail_reply)

    def _send_command(self, command: str, params, handler) -> None:
        line = " ".join([command, *params])
        self._expected = range(0, 1000)  # every reply goes to the handler
        self._okresponse = handler
        self._failresponse = handler
        self.sendLine(line.encode("utf-8"))

    @staticmethod
    def _text(resp) -> str:
        if isinstance(resp, bytes):
            resp = resp.decode("utf-8", "replace")
        return " ".join(str(resp).split())

    def _mail_reply(self, code, resp):
        if code >= 300:
            self.outcome.mail = (code, self._text(resp))
            self._entry_done()
            return self._reset()
        self._next_rcpt()

    def _next_rcpt(self) -> None:
        while True:
            r = next(self._rcpts, None)
            if r is None:
                if self._accepted:
                    self._send_command("DATA", [], self._data_reply)
                else:
                    self._entry_done()
                    self._reset()
                return
            self._last_rcpt = r
            params = []
            if self.outcome.dsn:
                if r.notify is not None:
                    params.append("NOTIFY=" + (",".join(r.notify) if r.notify else "NEVER"))
                if r.orcpt:
                    params.append(f"ORCPT={r.orcpt}")
            line = " ".join([f"RCPT TO:<{r.address}>", *params])
            if not command_injection(line):
                return self._send_command(line, [], self._rcpt_reply)
            log.warn("queue entry {id}: a recipient not sent: CR, LF or NUL in it or its parameters",
                     id=self.entry.id)
            self.outcome.rcpts[r.address] = (501, _NOT_SENT.decode())

    def _rcpt_reply(self, code, resp):
        self.outcome.rcpts[self._last_rcpt.address] = (code, self._text(resp))
        if code < 300:
            self._accepted += 1
        self._next_rcpt()

    def _data_reply(self, code, resp):
        if code != 354:
            self.outcome.data = (code if code >= 400 else 451, self._text(resp))
            self._entry_done()
            return self._reset()
        self._folder = LineFolder()
        sender = basic.FileSender()
        d = sender.beginFileTransfer(self._file, self.transport, self.transformChunk)
        d.addCallbacks(self.finishedFileTransfer,
                       lambda f: self._fail(f"sending the message: {describe(f.value)}"))
        self._expected = range(0, 1000)
        self._okresponse = self._end_of_data
        self._failresponse = self._end_of_data

    def transformChunk(self, chunk: bytes) -> bytes:
        """A chunk of the stored CRLF message, dot-stuffed, with lines
        over 998 octets folded as Postfix's SMTP client folds them
        (L{mailguard.store.folding})."""
        self.resetTimeout()
        return self._folder.feed(chunk)

    def finishedFileTransfer(self, lastsent):
        folder, self._folder = self._folder, None
        if folder is not None:
            tail = folder.end()
            if tail:  # a final CR without its LF (never in a stored message)
                self.transport.write(tail)
            if folder.folds and self.entry is not None:
                emit(log, "relay-folded", {"queue": queue_id(self.entry.id), "relay": self.worker.hop.name,
                                           "limit": LINE_LIMIT, "folds": folder.folds})
        smtp.ESMTPClient.finishedFileTransfer(self, lastsent)

    def _end_of_data(self, code, resp):
        self.outcome.data = (code, self._text(resp))
        self._entry_done()
        self._next_transaction()

    def _entry_done(self) -> None:
        entry, outcome = self.entry, self.outcome
        self.entry = self.outcome = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if entry is not None:
            self.worker.done(entry, outcome)

    def _reset(self) -> None:
        """After an aborted transaction: RSET, then the next one."""
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = lambda code, resp: self._fail(f"RSET refused: {code}")
        self.sendLine(b"RSET")

    def _next_transaction(self) -> None:
        self.smtpState_from(250, b"")

    # -- failures -----------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self.entry is not None:
            self.outcome.error = reason
            self._entry_done()
        if self.transport is not None and not self._closed:
            self.transport.abortConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        smtp.ESMTPClient.connectionLost(self, reason)
        self._closed = True
        if self.tls_started and not self._tls_ehlo_done and self.error is None:
            self.tls_failed = True
            self.error = f"TLS handshake failed: {describe(reason.value)}"
        if self.entry is not None:
            self.outcome.error = self.error or f"connection lost: {describe(reason.value)}"
            self._entry_done()
        if self.error is None and not self.session_ready:
            self.error = f"connection closed: {describe(reason.value)}"
        self.worker.closed(self)

    _tls_ehlo_done = False

    def tryTLS(self, code, resp, items):
        if self.tls_started:
            self._tls_ehlo_done = True
        smtp.ESMTPClient.tryTLS(self, code, resp, items)
