"""The Twisted adapter around the SMTP state machine.

Everything that decides is elsewhere: framing, sequencing, budgets and
replies in L{mailguard.smtpd.session.ServerSession} (sans-IO), the rules in
L{mailguard.policy}.  What is left here moves bytes, timers and Deferreds:
the greeting hold (Kerio's spam repellent), the deadline and session
timers, reading paused while input or output waits (L{mailguard.smtpd.flow}),
STARTTLS, the store, the policies that answer with Deferreds, the
slow-downs after a failed AUTH and after errors, and the security-log
lines the session asks for.  The idle deadline is one that bytes cannot
push back (L{mailguard.smtpd.flow.IdleDeadline}).

A connection held in the greeting delay is the cheap case thousands of
times over: it has no state machine yet (one is made when the greeting is
sent), only its facts, its session id, when it connected and one
delayed call; everything else is an immutable class default until it
changes.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from mailguard import replies as R
from mailguard.operational import report
from mailguard.policy.session import Session
from mailguard.smtpd import events as E
from mailguard.smtpd import sessionlog
from mailguard.smtpd.events import CLOSED, DATA
from mailguard.smtpd.flow import IdleDeadline, ReadGate
from mailguard.smtpd.session import ServerSession
from mailguard.smtpd.sasl import CramMD5Credentials
from mailguard.store.envelope import queue_id

log = Logger()

# Input buffered in the session (a request pending, replies waiting to be
# sent), beyond which reading pauses.
INPUT_HOLD_MAX = 64 * 1024
BIG_READ_SIZE = 1 << 18  # bytes per recv while a large DATA arrives
BIG_READ_AFTER = 1 << 18  # DATA bytes after which reads get that large
# What follows a store failure, for its log line.
_RETRY_NOW = f"{R.STORAGE_ERROR.code} {R.STORAGE_ERROR.status} sent; the client will retry"
_RETRY_AT_DOT = f"{R.STORAGE_ERROR.code} {R.STORAGE_ERROR.status} at the final dot; the client will retry"


class MailguardESMTP(Protocol):
    """One SMTP connection.  Made by L{mailguard.smtpd.factory.MailguardFactory}."""

    # Immutable defaults: while held, the instance dict holds only the
    # factory, the transport, the facts, the session id, the connect time
    # and the hold.
    smtp: ServerSession | None = None  # made when the greeting is sent
    opened: Session | None = None  # the facts at connect (IP, port, listener never change)
    closed = False
    sid = ""  # the session id of every log line (mailguard.smtpd.sessionlog)
    _hold = None
    _connected_at = 0.0
    _outcome = "greeted"  # for the log and metrics: greeted, early-talker, gave-up, limit
    _was_held = False
    _idle = None
    _session_timer = None
    _auth_delay = None
    _message = None
    _running = False
    _gate: ReadGate | None = None  # pauses reading while input or output waits
    _normal_read_size = None  # the transport's recv size, while a large DATA reads more

    def __init__(self, factory) -> None:
        self.factory = factory

    @property
    def session(self) -> Session:
        """The session facts now (they change with HELO, STARTTLS, AUTH)."""
        return self.smtp.facts if self.smtp is not None else self.opened

    # -- connection, greeting --------------------------------------------------------------
    def connectionMade(self) -> None:
        ctx = self.factory.context
        peer = self.transport.getPeer()
        listener = self.factory.listener
        self.opened = facts = Session(getattr(peer, "host", ""), getattr(peer, "port", 0), listener,
                                      tls=listener == "smtps")
        self.sid = sessionlog.new_session_id()
        self._connected_at = ctx.clock.seconds()
        limited = ctx.limits.at_connect(facts, ctx.config, ctx.exempt)
        if limited is not None:  # a per-address budget (rate, errors): as the connection limits
            sessionlog.connect(self.sid, facts, None)
            ctx.stats.connections["limit"] += 1
            self._outcome = "limit"
            return self._turn_away(limited.reply, limited.event, fields=limited.fields)
        refusal = ctx.connections.open(self, facts)
        if refusal is None and ctx.connections.stopping:  # accepted as the listeners closed
            sessionlog.connect(self.sid, facts, None)
            self._outcome = "shutdown"
            return self._turn_away(R.SHUTTING_DOWN, None)
        if refusal is not None:
            sessionlog.connect(self.sid, facts, None)
            ctx.stats.connections["limit"] += 1
            self._outcome = "limit"
            event = "too-many-from-ip" if refusal is R.TOO_MANY_FROM_IP else "too-many-connections"
            return self._turn_away(refusal, event)
        decision = ctx.greeting.decide(facts)
        sessionlog.connect(self.sid, facts, decision)
        if decision.delay > 0:
            # Held: one delayed call, nothing read into a session; any byte
            # before it fires is an early talker.  The teaser sends the
            # first line of a multi-line 220 now, so a bot that reacts to
            # it talks before the last line.
            if decision.teaser:
                self.transport.write(b"220-" + ctx.hostname.encode("ascii") + b" ESMTP\r\n")
            self._hold = ctx.clock.callLater(decision.delay, self._release)
        else:
            self._greet()

    def _release(self) -> None:
        """The client waited out the delay: greet it."""
        self._hold = None
        if not self.closed:
            self._was_held = True
            self._greet()

    def _greet(self) -> None:
        ctx = self.factory.context
        ctx.stats.connections["greeted"] += 1
        self.smtp = ServerSession(self.opened, ctx, sid=self.sid)
        self._gate = ReadGate(self.transport, self._run)
        self.smtp.greet()
        self._run()
        if ctx.config.idle_timeout > 0:  # 0: no limit
            self._idle = IdleDeadline(ctx.clock, ctx.config.idle_timeout, ctx.config.min_data_rate,
                                      self._timeout, "_idle", R.TIMEOUT)
        if ctx.config.max_session_time > 0:
            self._session_timer = ctx.clock.callLater(ctx.config.max_session_time, self._timeout,
                                                      "_session_timer", R.SESSION_TOO_LONG)

    def dataReceived(self, data: bytes) -> None:
        smtp = self.smtp
        if smtp is None:
            if not self.closed:
                self._early_talker(data)
            return
        smtp.receive_data(data)
        if smtp.mode is DATA and self._idle is not None:
            self._idle.received(len(data))  # only a message's bytes earn time
        if not smtp.waiting and not self._gate.output_waiting:
            self._run()
        elif smtp.buffered > INPUT_HOLD_MAX:  # sending on while a request or its replies wait
            self._gate.hold()

    def _early_talker(self, data: bytes) -> None:
        ctx = self.factory.context
        self._cancel("_hold")
        ctx.stats.connections["early_talker"] += 1
        self._outcome = "early-talker"
        self._turn_away(R.EARLY_TALKER, "early-talker" if ctx.config.greeting_delay_log else None,
                        ctx.clock.seconds() - self._connected_at, data)

    def _turn_away(self, reply: R.Reply, event: str | None, waited: float = 0.0, data: bytes = b"",
                   fields: dict | None = None) -> None:
        """Refuse a connection that has no session: the security-log entry
        (unless C{event} is None; with C{fields}, in their form), the
        reply, the close.  Every refusal before the greeting passes here;
        after it, the session says all."""
        self.closed = True
        ctx, facts = self.factory.context, self.opened
        if event is not None:
            if fields is not None:
                ctx.security_log.note(event, facts.client_ip, facts.client_port, **fields)
            else:
                ctx.security_log.record(event, facts.client_ip, facts.client_port, waited, data)
        ctx.stats.refused("CONNECT", reply.code, reply.status)
        sessionlog.reject(self.sid, facts, "CONNECT", reply, detail=f"waited {waited:.2f} s" if waited else None)
        self.transport.write(reply.to_bytes())
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        ctx = self.factory.context
        if self._hold is not None:
            # Closed while held: the client gave up waiting -- unless the
            # server itself is shutting down and closing everything.
            self._cancel("_hold")
            if not self.closed:
                stopping = ctx.connections.stopping
                self._outcome = "shutdown" if stopping else "gave-up"
                if not stopping:
                    ctx.stats.connections["gave_up"] += 1
                if ctx.config.greeting_delay_log and not stopping:
                    ctx.security_log.record("gave-up", self.opened.client_ip, self.opened.client_port,
                                            ctx.clock.seconds() - self._connected_at, b"")
        for name in ("_idle", "_session_timer", "_auth_delay"):
            self._cancel(name)
        self._abort_message()
        self.closed = True
        if self.smtp is not None:
            self.smtp.connection_lost()
        if self.opened is not None:
            sessionlog.disconnect(self.sid, self.opened, ctx.clock.seconds() - self._connected_at, self._outcome,
                                  self.smtp)
        ctx.connections.close(self, self.opened)

    def shut_down(self, force: bool = False) -> bool:
        """The server is stopping (L{mailguard.smtpd.drain}): a held client
        is told ``421 4.3.2`` at once; a session decides for itself
        (L{ServerSession.shut_down}).  True while the connection stays
        open to finish a message."""
        if self.closed:
            return False
        if self.smtp is None:
            self._cancel("_hold")
            self._outcome = "shutdown"
            self._turn_away(R.SHUTTING_DOWN, None)
            return False
        staying = self.smtp.shut_down(force)
        self._run()
        return staying

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None and call.active():
            call.cancel()
        setattr(self, name, None)

    def _timeout(self, timer: str, reply: R.Reply) -> None:
        setattr(self, timer, None)
        self.smtp.close(reply, "timeout")
        self._run()

    # -- the state machine's events ------------------------------------------------------------
    def _run(self) -> None:
        """Carry out the session's events until it needs more input, waits
        for a request, or is closed.  A Deferred that fires at once returns
        to this loop instead of recursing."""
        if self._running:
            return
        self._running = True
        smtp, gate = self.smtp, self._gate
        next_event, write, handle = smtp.next_event, self.transport.write, self._handle
        try:
            while True:
                event = next_event()
                kind = event.__class__
                if kind is E.Write:  # the common case, first
                    write(event.data)
                    if gate.output_waiting and smtp.mode is not CLOSED:
                        break  # the transport's buffer is full: no more replies for now
                elif kind is E.Signal:
                    break
                else:
                    handle(event)
        finally:
            self._running = False
        if self._normal_read_size is not None and smtp.mode is not DATA:
            if self._normal_read_size:
                self.transport.bufferSize = self._normal_read_size
            self._normal_read_size = None
        if self.closed:
            return
        if self._idle is not None:
            self._idle.read(smtp.progress)  # a whole command or message: it starts again
        if smtp.buffered > INPUT_HOLD_MAX:  # TCP backpressure, in any state
            gate.hold()
        else:
            gate.release()

    def _handle(self, event) -> None:
        ctx = self.smtp.context  # the one the session started with
        kind = type(event)
        if kind is E.WriteMessage:
            self._write_message(event.data)
        elif kind is E.CheckRecipient:
            self._wait(defer.maybeDeferred(ctx.recipients.check_recipient, event.session, event.mailbox), "RCPT")
        elif kind is E.AnswerVrfy:
            self._wait(defer.maybeDeferred(ctx.vrfy.answer, event.session, event.argument), "VRFY")
        elif kind is E.BeginMessage:
            self._begin_message(event)
        elif kind is E.CommitMessage:
            self._commit(event)
        elif kind is E.CheckCredentials:
            self._check_credentials(event.credentials)
        elif kind is E.AuthFailureDelay or kind is E.Delay:
            d = defer.Deferred()
            self._auth_delay = ctx.clock.callLater(event.seconds, d.callback, None)
            self._wait(d, "delay")
        elif kind is E.SecurityEvent:
            facts = self.smtp.facts
            ctx.security_log.note(event.event, facts.client_ip, facts.client_port, **event.fields)
        elif kind is E.AbortMessage:
            self._abort_message()
        elif kind is E.StartTLS:
            self.transport.startTLS(ctx.tls)
        elif kind is E.KickQueue:
            self._wait(defer.maybeDeferred(ctx.queue.kick, event.domain), "ETRN")
        elif kind is E.Close:
            self.closed = True
            blocked = self._gate.output_waiting
            self._gate.detach()
            if blocked:  # the client does not read: the close would wait for it forever
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
        else:
            raise TypeError(f"unknown session event {event!r}")

    def _wait(self, d: defer.Deferred, what: str, logged: bool = False) -> None:
        """Hand C{d}'s result to the session."""
        def failed(failure):
            if not logged:
                log.failure("internal error in {what} session={session}", failure, what=what, session=self.sid)
            self._failed()

        d.addCallbacks(self._answered, failed)

    def _answered(self, result) -> None:
        """A request's result, to the session; then go on reading (a result
        there at once is taken by the running loop, without recursing).
        A result the session cannot take is answered 451 4.3.0."""
        try:
            self.smtp.answer(result)
        except Exception:
            log.failure("internal error taking a result session={session}", session=self.sid)
            self.smtp.failed()
        self._run()

    def _failed(self) -> None:
        self.smtp.failed()
        self._run()

    # -- the message ------------------------------------------------------------------------------
    def _begin_message(self, event: E.BeginMessage) -> None:
        try:
            self._message = self.smtp.context.store.begin(event.envelope)
            self._message.write(event.header)
        except OSError:
            report(log, None, "store-failed", {"session": self.sid, "ip": self.smtp.facts.client_ip}, _RETRY_NOW)
            self._abort_message()
            self.smtp.failed()
        else:
            self.smtp.answer(None)

    def _write_message(self, data: bytes) -> None:
        try:
            self._message.write(data)
        except OSError:
            report(log, None, "store-failed", {"session": self.sid, "ip": self.smtp.facts.client_ip}, _RETRY_AT_DOT)
            self.smtp.message_failed()
            return
        if self._normal_read_size is None and self.smtp.message_size > BIG_READ_AFTER:
            # 256 KiB per recv instead of Twisted's 64 KiB: a large message
            # costs a quarter of the reactor passes.  Only while it arrives:
            # a buffer that size is above malloc's mmap threshold, so for
            # small reads it would cost a map and an unmap each.
            self._normal_read_size = getattr(self.transport, "bufferSize", None) or 0
            self.transport.bufferSize = BIG_READ_SIZE

    def _abort_message(self) -> None:
        message, self._message = self._message, None
        if message is not None:
            message.abort()

    def _commit(self, event: E.CommitMessage) -> None:
        ctx = self.smtp.context
        message, self._message = self._message, None
        facts = self.smtp.facts
        dot = ctx.clock.seconds()

        def stored(result):
            ctx.stats.commit_seconds.observe(ctx.clock.seconds() - dot)
            if self._was_held:  # it waited out the delay (pass cache)
                ctx.greeting.passed(facts)
            self._answered(result)

        def failed(failure):
            report(log, failure, "store-failed", {"session": self.sid, "ip": facts.client_ip,
                                                  "queue": queue_id(event.envelope.message_id)}, _RETRY_NOW)
            message.abort()
            self._failed()

        message.commit().addCallbacks(stored, failed)

    # -- AUTH ------------------------------------------------------------------------------------
    def _check_credentials(self, credentials) -> None:
        """PBKDF2 is slow on purpose: the check runs off the reactor thread.
        A CRAM-MD5 response is checked here with the plain-text secret;
        the canonical name then comes from C{check_password}, which also
        makes a CRAM-MD5 attempt cost what a PLAIN one does, known user or
        not.  A failure is logged by type only: it may quote credentials."""
        ctx = self.smtp.context
        passwords = ctx.passwords

        def check():
            if not isinstance(credentials, CramMD5Credentials):
                return ctx.run_blocking(passwords.check_password, credentials.username, credentials.password)
            name = credentials.username
            secret = passwords.plaintext_password(name)
            ok = secret is not None and credentials.check_password(secret)
            d = ctx.run_blocking(passwords.check_password, name, secret if ok else "")
            return d.addCallback(lambda who: who if ok else None)

        def typed(failure):
            log.error("internal error in AUTH: {exc} session={session}", exc=failure.type.__name__,
                      session=self.sid)
            return failure

        self._wait(defer.maybeDeferred(check).addErrback(typed), "AUTH", logged=True)
