"""Gateway mode's client side: one ESMTP connection to the back-end that
answers "is this address deliverable?".

The question on the wire::

    VRFY john@example.com        250/251 -> known       550/551/553 -> unknown
                                 252, 500, 502, 504 -> ask with a probe:
    MAIL FROM:<>  RCPT TO:<john@example.com>  RSET
                                 250/251 -> known       550/551/553 -> unknown

(A 550/551/553 whose enhanced code is not about the address or the
mailbox, 5.1.x/5.2.x (or 5.0.x), such as ``550 5.7.1``, and any other 5xx
to the probe's RCPT, such as ``554 5.7.1`` relay denied, say the back-end
refuses for a reason that is not the recipient: a configuration or policy
problem, so it is L{Outcome.TEMPFAIL}, never L{Outcome.UNKNOWN}.)

L{VrfyClient}: one command on the wire at a time, later ones wait in a
queue of Deferreds; replies are parsed (multi-line too); every command has
a timeout; an idle connection says QUIT.  The clock is a constructor
argument; the pool (L{mailguard.gateway.pool}) opens and reuses these
connections.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailguard.policy.addresses import command_injection

__all__ = ["BackendAnswer", "BackendReply", "BackendUnavailable", "Outcome", "VrfyClient", "as_unavailable"]

log = Logger()


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
            self.ready.errback(as_unavailable(failure))
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
        if command_injection(line):
            log.warn("not sent to the back-end: CR, LF or NUL in {line!r}", line=line[:80])
            return defer.fail(BackendUnavailable("a command holding CR, LF or NUL was not sent"))
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
        _cancel(self._timer)
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
        _cancel(self._idle_timer)
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


def _cancel(call) -> None:
    """Cancel a pending C{IDelayedCall} (None, or one that ran: nothing)."""
    if call is not None and call.active():
        call.cancel()


def as_unavailable(failure: Failure) -> Failure:
    if failure.check(BackendUnavailable):
        return failure
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return Failure(BackendUnavailable("timed out connecting to the back-end"))
    text = failure.getErrorMessage() or failure.type.__name__
    return Failure(BackendUnavailable(f"cannot connect to the back-end: {text}"))
