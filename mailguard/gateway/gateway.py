"""Gateway mode: decide ``RCPT TO`` for a back-end's domains by asking it.

This is the anti-spam gateway of the seed document: mailguard stands in
front of a back-end mail server (Kerio Connect, or another mailguard) and
must not accept mail that the back-end would refuse, or it would have to
bounce it later (backscatter).  For each recipient in a gateway domain it
asks the back-end, over a pooled, persistent ESMTP connection::

    VRFY john@example.com        250/251 -> known       550/551/553 -> unknown
                                 252, 500, 502, 504 -> ask with a probe:
    MAIL FROM:<>  RCPT TO:<john@example.com>  RSET
                                 250/251 -> known       550/551/553 -> unknown

and answers the client from that (L{Gateway.check}):

    known                        250 2.1.5, relayed to the back-end
    unknown                      550 5.1.1 (cached)
    back-end 4xx, other answers  450 4.4.3 (never cached)
    back-end unreachable, slow   450 4.4.1 (never cached)

(A 550/551/553 whose enhanced code is not about the address or the
mailbox, 5.1.x/5.2.x (or 5.0.x), such as ``550 5.7.1``, and any other 5xx
to the probe's RCPT, such as ``554 5.7.1`` relay denied, say the back-end
refuses for a reason that is not the recipient: a configuration or policy
problem, so it is a 450 and a log line, never a 550.)

Never accept-then-bounce: when the back-end cannot say, the client is told
to try later.  Definitive answers are cached (L{TtlCache}: positive and
negative TTLs, LRU-bounded); concurrent lookups of one address share one
query.

The layers, each testable alone:

- L{VrfyClient}: the ESMTP client protocol.  One command on the wire at a
  time, later ones wait in a queue of Deferreds; replies are parsed (multi-
  line too); every command has a timeout; an idle connection says QUIT.
- L{BackendPool}: up to N persistent L{VrfyClient}s over an injected
  endpoint; lookups wait for a free connection, new connections are opened
  on demand, a lost one is replaced, a lookup cut off by a lost connection
  is retried once, every lookup has a deadline.  After a failed connect the
  back-end is held down for a moment, and lookups fail at once instead of
  each trying to connect.
- L{Gateway}: the cache, the in-flight sharing and the verdicts; what
  L{mailguard.policy.decide.RecipientPolicy} calls.  It is a Twisted service, so
  stopping mailguard says QUIT on every pooled connection.
(VRFY about a gateway domain is answered through the same L{Gateway} by
L{mailguard.policy.gatewayvrfy.GatewayVrfyPolicy}.)

The clock and the endpoint are constructor arguments: the unit tests run
everything on C{task.Clock} and an in-memory back-end; nothing here imports
the global reactor.  L{build_gateway} builds the real thing from the
configuration (see ``docs/gateway.md`` for the settings).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterable

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from zope.interface import implementer

from mailguard import replies
from mailguard.config.values import parse_host_port
from mailguard.interfaces import IRecipientGateway
from mailguard.policy.decide import RecipientVerdict
from mailguard.replies import BACKEND_NO_ANSWER

__all__ = [
    "BACKEND_NO_ANSWER",
    "BackendAnswer",
    "BackendPool",
    "BackendReply",
    "BackendUnavailable",
    "Gateway",
    "Outcome",
    "TtlCache",
    "VrfyClient",
    "backend_endpoint",
    "build_gateway",
]

log = Logger()


# --- values -------------------------------------------------------------------


class Outcome(enum.Enum):
    KNOWN = "known"  # the back-end takes mail for the address
    UNKNOWN = "unknown"  # it refuses it for good
    TEMPFAIL = "tempfail"  # it cannot say now (4xx, or an answer we cannot use)


@dataclass(frozen=True)
class BackendReply:
    """One reply of the back-end: the code and the text (lines joined)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class BackendAnswer:
    """What the back-end said about one address, and how it was asked."""

    outcome: Outcome
    reply: BackendReply
    via: str  # "VRFY", "RCPT" or "MAIL"


class BackendUnavailable(Exception):
    """The back-end could not be asked.

    @ivar retry: the question may be asked again on another connection (the
        connection was lost, or the back-end said 421, while it was asked).
    """

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.retry = retry


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)")
_KNOWN_CODES = frozenset((250, 251))
_UNKNOWN_CODES = frozenset((550, 551, 553))
_NO_VRFY_CODES = frozenset((252, 500, 502, 504))
_ENHANCED = re.compile(r"5\.(\d{1,3})\.\d{1,3}(?:\s|$)")


def _classify(reply: BackendReply, via: str) -> BackendAnswer:
    if reply.code in _KNOWN_CODES:
        return BackendAnswer(Outcome.KNOWN, reply, via)
    if reply.code in _UNKNOWN_CODES:
        m = _ENHANCED.match(reply.text)
        if m is None or m.group(1) in "012":
            return BackendAnswer(Outcome.UNKNOWN, reply, via)
        # 550 5.7.1 and the like: a policy refusal (of the gateway, of the
        # null sender), not "no such user": not a reason to refuse the mail.
        return BackendAnswer(Outcome.TEMPFAIL, reply, via)
    if reply.code == 421:
        raise BackendUnavailable(f"back-end closing ({reply})", retry=True)
    # 4xx: try later.  Any other 5xx to RCPT (554 relay denied, 552...)
    # means the back-end refuses for a reason that is not the recipient
    # (usually the gateway's own configuration): never a reason to bounce
    # the sender's mail, so try later, and the log says why.
    return BackendAnswer(Outcome.TEMPFAIL, reply, via)


def _vrfy_argument(address: str) -> str:
    # Kerio and most servers take the bare form; a quoted local part that
    # holds spaces needs the angle brackets to stay one argument.
    return f"<{address}>" if (" " in address or '"' in address) else address


# --- the client protocol ---------------------------------------------------------


class VrfyClient(LineReceiver):
    """An ESMTP client connection to the back-end that answers "is this
    address deliverable?" (L{verify}).

    C{ready} fires with the client once the greeting and EHLO (or HELO)
    are done, or fails with L{BackendUnavailable}.  Commands go out one at
    a time (L{command}); a reply not received within C{timeout} seconds
    aborts the connection.  After C{idle_timeout} seconds with nothing to
    do the client says QUIT.  C{on_lost}, if set, is called with the client
    when the connection is gone.
    """

    delimiter = b"\n"
    MAX_LENGTH = 4096
    MAX_REPLY_LINES = 100

    def __init__(self, clock, timeout: float = 10.0, idle_timeout: float = 60.0,
                 helo: str = "localhost") -> None:
        self.clock = clock
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.helo = helo
        self.ready: defer.Deferred = defer.Deferred(self._cancel_ready)
        self.extensions: dict[str, str] = {}
        self.use_vrfy = True  # cleared when VRFY tells nothing (252, 502...)
        self.closing = False  # QUIT sent, 421 seen, or lost
        self.lost = False
        self.on_lost = None
        self._queue: deque[tuple[str, defer.Deferred]] = deque()
        self._current: defer.Deferred | None = None
        self._lines: list[bytes] = []
        self._timer = None
        self._idle_timer = None
        self._lost_reason = "connection to the back-end lost"
        self._retry_on_loss = True
        self._lost_waiters: list[defer.Deferred] = []

    @property
    def usable(self) -> bool:
        return self.ready.called and not self.closing and not self.lost

    # -- connection --------------------------------------------------------------
    def connectionMade(self) -> None:
        # One small command, then wait for its reply: never let Nagle's
        # algorithm hold a command back.
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except OSError:
                pass
        # The greeting is the reply to the connection itself.
        self._current = d = defer.Deferred()
        self._start_timer()
        d.addCallback(self._greeted)
        d.addErrback(self._setup_failed)

    def _greeted(self, reply: BackendReply):
        if reply.code != 220:
            raise BackendUnavailable(f"back-end greeting: {reply}")
        return self.command(f"EHLO {self.helo}").addCallback(self._ehlo_done)

    def _ehlo_done(self, reply: BackendReply):
        if reply.code == 250:
            for line in reply.text.split("\n")[1:]:
                key, _, value = line.strip().partition(" ")
                if key:
                    self.extensions[key.upper()] = value
            return self._set_ready()
        if 500 <= reply.code < 600:
            return self.command(f"HELO {self.helo}").addCallback(self._helo_done)
        raise BackendUnavailable(f"back-end refused EHLO: {reply}")

    def _helo_done(self, reply: BackendReply):
        if reply.code != 250:
            raise BackendUnavailable(f"back-end refused HELO: {reply}")
        return self._set_ready()

    def _set_ready(self) -> None:
        if not self.ready.called:
            self.ready.callback(self)
        if self._current is None and not self._queue:
            self._start_idle()

    def _setup_failed(self, failure: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(_as_unavailable(failure))
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _cancel_ready(self, d: defer.Deferred) -> None:
        # Cancelled (the pool's connect deadline): give up the connection.
        self._lost_reason = "no greeting from the back-end in time"
        self.closing = True
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        self.closing = True
        self._stop_timer()
        self._stop_idle()
        err = BackendUnavailable(self._lost_reason, retry=self._retry_on_loss)
        pending = [d for d in [self._current, *(d for _, d in self._queue)] if d is not None]
        self._current = None
        self._queue.clear()
        if not self.ready.called:
            self.ready.errback(Failure(err))
        for d in pending:
            d.errback(Failure(err))
        waiters, self._lost_waiters = self._lost_waiters, []
        for w in waiters:
            w.callback(None)
        if self.on_lost is not None:
            self.on_lost(self)

    def when_lost(self) -> defer.Deferred:
        """A Deferred that fires once the connection is gone."""
        if self.lost:
            return defer.succeed(None)
        d = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    def quit(self) -> defer.Deferred:
        """Say QUIT and close; fires once the connection is gone."""
        done = self.when_lost()
        if not self.lost and not self.closing:
            self.closing = True
            self._retry_on_loss = False
            self._lost_reason = "connection to the back-end closed"
            d = self._enqueue("QUIT")
            d.addBoth(lambda _: self.transport.loseConnection())
        elif not self.lost and self.transport is not None:
            self.transport.loseConnection()
        return done

    # -- commands ------------------------------------------------------------------
    def command(self, line: str) -> defer.Deferred:
        """Send one command line; a Deferred firing with its L{BackendReply}
        (or failing with L{BackendUnavailable})."""
        if self.closing:
            return defer.fail(BackendUnavailable(self._lost_reason, retry=True))
        return self._enqueue(line)

    def _enqueue(self, line: str) -> defer.Deferred:
        d = defer.Deferred()
        self._queue.append((line, d))
        if self._current is None:
            self._send_next()
        return d

    def _send_next(self) -> None:
        if self._current is not None or not self._queue or self.lost:
            return
        line, d = self._queue.popleft()
        self._current = d
        self._stop_idle()
        self.transport.write(line.encode("utf-8") + b"\r\n")
        self._start_timer()

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        m = _REPLY_LINE.fullmatch(line)
        if m is None or (m.group(2) == b"" and m.group(3)):
            return self._protocol_error(f"malformed reply line {line[:80]!r}")
        self._lines.append(m.group(3))
        if m.group(2) == b"-":
            if len(self._lines) > self.MAX_REPLY_LINES:
                self._protocol_error("reply too long")
            return
        text = "\n".join(x.decode("utf-8", "replace") for x in self._lines)
        self._lines = []
        reply = BackendReply(int(m.group(1)), text)
        d, self._current = self._current, None
        self._stop_timer()
        if reply.code == 421:
            self.closing = True
            self._lost_reason = f"back-end closing ({reply})"
        if d is None:
            # Unsolicited: a 421 before the back-end hangs up (idle timeout,
            # session limit), or garbage.  Either way this connection is done.
            if reply.code != 421:
                log.warn("back-end sent an unsolicited reply: {reply}", reply=str(reply))
            self.closing = True
            self.transport.loseConnection()
            return
        d.callback(reply)
        if self.closing and reply.code == 421:
            self.transport.loseConnection()
            return
        self._send_next()
        if self._current is None and not self._queue and self.ready.called:
            self._start_idle()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error("reply line too long")

    def _protocol_error(self, why: str) -> None:
        log.warn("back-end protocol error: {why}", why=why)
        self._lost_reason = f"back-end protocol error: {why}"
        self.closing = True
        self.transport.abortConnection()

    # -- timers --------------------------------------------------------------------
    def _start_timer(self) -> None:
        self._stop_timer()
        self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._lost_reason = f"no answer from the back-end within {self.timeout:g} s"
        self._retry_on_loss = False
        self.closing = True
        self.transport.abortConnection()

    def _start_idle(self) -> None:
        self._stop_idle()
        if self.idle_timeout > 0 and not self.closing:
            self._idle_timer = self.clock.callLater(self.idle_timeout, self._idle)

    def _stop_idle(self) -> None:
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        self.quit()

    # -- the question ----------------------------------------------------------------
    def verify(self, address: str) -> defer.Deferred:
        """Ask about C{address} ("local@domain", quoted local part if
        needed): a Deferred firing with a L{BackendAnswer}, or failing with
        L{BackendUnavailable}.

        VRFY first; when VRFY tells nothing (252 "cannot verify", or 500/502/
        504 "no VRFY here") this connection stops asking it and probes with
        MAIL FROM:<>, RCPT TO, RSET, which the back-end must answer
        truthfully.  The answer fires at the RCPT reply; the RSET follows on
        the wire before anything else.
        """
        if not self.use_vrfy:
            return self._probe(address)
        d = self.command(f"VRFY {_vrfy_argument(address)}")
        d.addCallback(self._vrfy_answered, address)
        return d

    def _vrfy_answered(self, reply: BackendReply, address: str):
        if reply.code in _NO_VRFY_CODES:
            self.use_vrfy = False
            return self._probe(address)
        if 500 <= reply.code < 600 and reply.code not in _UNKNOWN_CODES:
            return self._probe(address)  # e.g. 501: let RCPT judge the address
        return _classify(reply, "VRFY")

    def _probe(self, address: str) -> defer.Deferred:
        d = self.command("MAIL FROM:<>")
        d.addCallback(self._mail_answered, address)
        return d

    def _mail_answered(self, reply: BackendReply, address: str):
        if reply.code != 250:
            if reply.code == 421:
                raise BackendUnavailable(f"back-end closing ({reply})", retry=True)
            self._reset()
            return BackendAnswer(Outcome.TEMPFAIL, reply, "MAIL")
        d = self.command(f"RCPT TO:<{address}>")
        d.addCallback(self._rcpt_answered)
        return d

    def _rcpt_answered(self, reply: BackendReply) -> BackendAnswer:
        answer = _classify(reply, "RCPT")
        self._reset()
        return answer

    def _reset(self) -> None:
        d = self.command("RSET")

        def done(reply):
            if isinstance(reply, BackendReply) and reply.code != 250 and not self.closing:
                # The transaction state is unknown: start afresh elsewhere.
                self._protocol_error(f"RSET answered {reply}")

        d.addCallbacks(done, lambda f: None)


def _as_unavailable(failure: Failure) -> Failure:
    if failure.check(BackendUnavailable):
        return failure
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return Failure(BackendUnavailable("timed out connecting to the back-end"))
    text = failure.getErrorMessage() or failure.type.__name__
    return Failure(BackendUnavailable(f"cannot connect to the back-end: {text}"))


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: "BackendPool") -> None:
        self.pool = pool

    def buildProtocol(self, addr):
        p = VrfyClient(self.pool.clock, self.pool.timeout, self.pool.idle_timeout, self.pool.helo)
        p.factory = self
        return p


# --- the pool -------------------------------------------------------------------


class _Job:
    __slots__ = ("address", "d", "retries", "timer")

    def __init__(self, address: str, d: defer.Deferred) -> None:
        self.address = address
        self.d = d
        self.retries = 1
        self.timer = None


class BackendPool:
    """Up to C{size} persistent L{VrfyClient} connections to one back-end.

    @param endpoint: an C{IStreamClientEndpoint} to the back-end (with the
        source address bound, if configured).
    @param clock: an C{IReactorTime}.
    @param timeout: seconds for a connection to be ready (connect, greeting,
        EHLO), for each reply, and for each lookup from start to answer.
    @param idle_timeout: seconds after which an unused connection says QUIT.
    @param helo: the name to send in EHLO.
    @param retry_interval: after a failed connect, seconds during which
        lookups fail at once (when no connection is left) instead of each
        trying to connect again.
    """

    def __init__(self, endpoint, clock, *, size: int = 4, timeout: float = 10.0,
                 idle_timeout: float = 60.0, helo: str = "localhost",
                 retry_interval: float = 1.0) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        self.endpoint = endpoint
        self.clock = clock
        self.size = size
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.helo = helo
        self.retry_interval = retry_interval
        self._clients: list[VrfyClient] = []
        self._free: list[VrfyClient] = []  # a stack: the warmest first
        self._connecting: set[defer.Deferred] = set()
        self._waiting: deque[_Job] = deque()
        self._down_until = 0.0
        self._down_reason = ""
        self._down = False
        self._closed = False
        self.connects = 0  # successful connections so far
        self.connect_failures = 0
        self.lookups = 0

    @property
    def connections(self) -> int:
        """Connections open now (ready)."""
        return len(self._clients)

    # -- lookups -------------------------------------------------------------------
    def lookup(self, address: str) -> defer.Deferred:
        """Ask the back-end about C{address}: a Deferred firing with a
        L{BackendAnswer} or failing with L{BackendUnavailable}."""
        self.lookups += 1
        job = _Job(address, defer.Deferred())
        if self._closed:
            job.d.errback(BackendUnavailable("gateway stopping"))
            return job.d
        job.timer = self.clock.callLater(self.timeout, self._expire, job)
        self._submit(job)
        return job.d

    def _submit(self, job: _Job) -> None:
        client = self._take_free()
        if client is not None:
            self._run(client, job)
            return
        self._waiting.append(job)
        self._grow()

    def _take_free(self) -> VrfyClient | None:
        while self._free:
            client = self._free.pop()
            if client.usable:
                return client
        return None

    def _run(self, client: VrfyClient, job: _Job) -> None:
        d = client.verify(job.address)
        d.addBoth(self._finished, client, job)

    def _finished(self, result, client: VrfyClient, job: _Job) -> None:
        if client.usable:
            self._free.append(client)
        if isinstance(result, Failure) and result.check(BackendUnavailable) \
                and result.value.retry and job.retries > 0 and not job.d.called:
            job.retries -= 1
            self._submit(job)
        else:
            self._resolve(job, result)
        self._pump()

    def _resolve(self, job: _Job, result) -> None:
        if job.timer is not None:
            if job.timer.active():
                job.timer.cancel()
            job.timer = None
        if job.d.called:
            return  # expired already; a late answer is dropped
        if isinstance(result, Failure):
            if not result.check(BackendUnavailable):
                log.failure("unexpected error asking the back-end", result)
                result = Failure(BackendUnavailable("internal error"))
            job.d.errback(result)
        else:
            job.d.callback(result)

    def _expire(self, job: _Job) -> None:
        job.timer = None
        try:
            self._waiting.remove(job)
        except ValueError:
            pass
        if not job.d.called:
            job.d.errback(BackendUnavailable(f"no answer from the back-end within {self.timeout:g} s"))

    def _pump(self) -> None:
        while self._waiting:
            client = self._take_free()
            if client is None:
                break
            self._run(client, self._waiting.popleft())
        self._grow()

    # -- connections -----------------------------------------------------------------
    def _grow(self) -> None:
        """Open connections for waiting lookups, up to C{size} (a connection
        on its way out, saying QUIT or after a 421, does not count)."""
        while (not self._closed and len(self._waiting) > len(self._connecting)
               and sum(1 for c in self._clients if not c.closing) + len(self._connecting) < self.size):
            if self.clock.seconds() < self._down_until:
                if not self._clients and not self._connecting:
                    self._fail_waiting(self._down_reason)
                return
            self._connect()

    def _connect(self) -> None:
        d = self.endpoint.connect(_ClientFactory(self))
        d.addCallback(lambda client: client.ready)
        d.addTimeout(self.timeout, self.clock)
        self._connecting.add(d)
        d.addBoth(self._connect_done, d)

    def _connect_done(self, result, d: defer.Deferred) -> None:
        self._connecting.discard(d)
        if self._closed:
            if not isinstance(result, Failure):
                result.quit()
            return None
        if isinstance(result, Failure):
            reason = str(_as_unavailable(result).value)
            self.connect_failures += 1
            self._down_until = self.clock.seconds() + self.retry_interval
            self._down_reason = reason
            if not self._down:
                self._down = True
                log.warn("gateway back-end unreachable: {reason}", reason=reason)
            if not self._clients and not self._connecting:
                self._fail_waiting(reason)
            return
        client: VrfyClient = result
        self.connects += 1
        self._down_until = 0.0
        if self._down:
            self._down = False
            log.info("gateway back-end reachable again")
        if client.lost:
            return
        client.on_lost = self._lost
        self._clients.append(client)
        self._free.append(client)
        self._pump()

    def _lost(self, client: VrfyClient) -> None:
        if client in self._clients:
            self._clients.remove(client)
        if client in self._free:
            self._free.remove(client)
        self._grow()

    def _fail_waiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, deque()
        for job in waiting:
            self._resolve(job, Failure(BackendUnavailable(reason)))

    def close(self) -> defer.Deferred:
        """Stop: fail waiting lookups, QUIT every connection; fires once
        they are closed (or after C{timeout})."""
        self._closed = True
        self._fail_waiting("gateway stopping")
        for d in list(self._connecting):
            d.cancel()
        done = [c.quit() for c in list(self._clients)]
        d = defer.DeferredList(done, consumeErrors=True)
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=lambda *_: None)
        return d


# --- the cache ------------------------------------------------------------------


class TtlCache:
    """A bounded map with an expiry time per entry, least recently used
    evicted first.  Times come from C{clock.seconds()}."""

    def __init__(self, clock, size: int) -> None:
        self.clock = clock
        self.size = size
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: Any, ttl: float) -> None:
        if ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (self.clock.seconds() + ttl, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


# --- the gateway ------------------------------------------------------------------


@implementer(IRecipientGateway)
class Gateway(service.Service):
    """The back-end's verdict on recipients of its domains, for
    L{mailguard.policy.decide.RecipientPolicy} (its C{gateway} hook).

    @param domains: the domains the back-end holds (any case).
    @param pool: a L{BackendPool} (or anything with C{lookup(address)} and
        C{close()}).
    @param clock: an C{IReactorTime}, for the cache.
    @param positive_ttl: seconds a "known" answer is remembered; 0: never.
    @param negative_ttl: seconds an "unknown" answer is remembered; 0: never.
    @param cache_size: most addresses remembered; 0: no cache.
    """

    name = "gateway"

    def __init__(self, domains: Iterable[str], pool, clock, *, positive_ttl: float = 3600.0,
                 negative_ttl: float = 300.0, cache_size: int = 100000) -> None:
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self.pool = pool
        self.clock = clock
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.cache = TtlCache(clock, cache_size)
        self._inflight: dict[str, list[tuple[Any, defer.Deferred]]] = {}
        self.hits = 0
        self.misses = 0
        self.shared = 0  # lookups that joined one already in flight

    def handles(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains

    def check(self, mailbox) -> defer.Deferred:
        """The verdict on C{mailbox} (a L{mailguard.policy.addresses.Mailbox} in a
        gateway domain): a Deferred that always fires with a
        L{RecipientVerdict}, never fails."""
        key = mailbox.address
        cached = self.cache.get(key)
        if cached is not None:
            self.hits += 1
            outcome, code, via = cached
            return defer.succeed(_verdict(mailbox, outcome, f"back-end {via} {code} (cached)"))
        self.misses += 1
        d = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            self.shared += 1
            waiters.append((mailbox, d))
            return d
        self._inflight[key] = [(mailbox, d)]
        self.pool.lookup(key).addBoth(self._answered, key)
        return d

    def _answered(self, result, key: str) -> None:
        waiters = self._inflight.pop(key, [])
        if isinstance(result, Failure):
            if not result.check(BackendUnavailable):
                log.failure("gateway lookup of {address} failed", result, address=key)
            reason = f"back-end not answering: {result.getErrorMessage()}"
            for mailbox, d in waiters:
                d.callback(RecipientVerdict(BACKEND_NO_ANSWER, reason, address=mailbox.address))
            return
        answer: BackendAnswer = result
        outcome, code, via = answer.outcome, answer.reply.code, answer.via
        if outcome is Outcome.KNOWN:
            self.cache.put(key, (outcome, code, via), self.positive_ttl)
        elif outcome is Outcome.UNKNOWN:
            self.cache.put(key, (outcome, code, via), self.negative_ttl)
        else:
            log.warn("back-end cannot verify {address} now: {via} {reply}",
                     address=key, via=via, reply=str(answer.reply))
        reason = f"back-end {via} {code}"
        for mailbox, d in waiters:
            d.callback(_verdict(mailbox, outcome, reason))

    def stopService(self):
        super().stopService()
        return self.pool.close()


def _verdict(mailbox, outcome: Outcome, reason: str) -> RecipientVerdict:
    if outcome is Outcome.KNOWN:
        return RecipientVerdict(replies.RECIPIENT_OK, f"gateway: known ({reason})",
                                relay=True, address=mailbox.address)
    if outcome is Outcome.UNKNOWN:
        return RecipientVerdict(replies.UNKNOWN_USER, f"gateway: unknown ({reason})",
                                address=mailbox.address)
    return RecipientVerdict(replies.RECIPIENT_TRY_LATER, f"gateway: cannot verify now ({reason})",
                            address=mailbox.address)


# --- VRFY on the gateway ----------------------------------------------------------


# --- wiring ------------------------------------------------------------------------


def backend_endpoint(reactor, host: str, port: int, *, timeout: float, bind_address: str = ""):
    """A client endpoint to the back-end, from C{bind_address} if given."""
    from twisted.internet import endpoints

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    bind = (bind_address, 0) if bind_address else None
    if ip is None:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, host, port, timeout=timeout, bindAddress=bind)


def gateway_domains(config) -> tuple[str, ...]:
    """GatewayDomains, or else every name of the Domain table (aliases too)."""
    if config.gateway_domains:
        return tuple(config.gateway_domains)
    out: list[str] = []
    for d in config.domains:
        out.append(d.name)
        out.extend(d.aliases)
    return tuple(dict.fromkeys(out))


def build_gateway(config, options, reactor) -> Gateway | None:
    """The L{Gateway} the configuration asks for, or None (GatewayEnabled=0).

    @param options: the service options.  ``relay-host`` is required: it is
        where the relay queue forwards the mail the gateway accepts (without
        it, accepted mail would wait in the queue and bounce: accept-then-
        bounce, which gateway mode exists to prevent).  It is also the
        back-end that is asked, unless GatewayBackend names another.
    @raise ValueError: gateway mode without --relay-host or without domains.
    """
    if not config.gateway_enabled:
        return None
    relay_host = options.get("relay-host")
    if not relay_host:
        raise ValueError("GatewayEnabled is 1 but there is no --relay-host: "
                         "accepted mail could not be forwarded to the back-end")
    backend = config.gateway_backend or parse_host_port(relay_host)
    domains = gateway_domains(config)
    if not domains:
        raise ValueError("GatewayEnabled is 1 but no domain is listed (GatewayDomains or the Domain table)")
    host, port = backend
    endpoint = backend_endpoint(reactor, host, port, timeout=config.gateway_timeout,
                                bind_address=config.gateway_bind_address)
    pool = BackendPool(endpoint, reactor, size=config.gateway_connections,
                       timeout=config.gateway_timeout, idle_timeout=config.gateway_idle_timeout,
                       helo=config.hostname)
    log.info("gateway mode: recipients of {domains} verified with {host}:{port}",
             domains=",".join(domains), host=host, port=port)
    return Gateway(domains, pool, reactor, positive_ttl=config.gateway_positive_ttl,
                   negative_ttl=config.gateway_negative_ttl, cache_size=config.gateway_cache_size)
