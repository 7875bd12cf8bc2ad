"""The SMTP session as a sans-IO state machine, in the manner of h11.

Bytes go in with L{ServerSession.receive_data}; the adapter then pulls
L{ServerSession.next_event} until it gets a signal (see
L{mailguard.smtpd.events}): replies to write, notices to carry out, and
requests whose results it hands back with L{ServerSession.answer} or
L{ServerSession.failed}.  While a request is outstanding the session is
L{PAUSED} and reads nothing more, so pipelined commands are answered in
order (twisted/twisted#8126) and nothing is asked before its turn.

Replies to a pipelined group are held until the group is drained and then
written together (RFC 2920 3.2): one write per group, not a small packet
per reply for Nagle and delayed ACKs to stall.  Every reply goes through
L{ServerSession._send}, every refusal through L{ServerSession._refuse}.

All state is per instance, made when the greeting is sent: nothing
mutable lives on the class.  The facts policies decide on (HELO, TLS, the
authenticated user) are one frozen L{Session} value, replaced as they
change.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from twisted.logger import Logger

from mailguard import replies as R
from mailguard.policy.rules import (Refusal, ehlo_keywords, help_commands, vrfy_budgeted, vrfy_refusal)
from mailguard.policy.session import Session
from mailguard.smtpd import events as E
from mailguard.smtpd import framing as F
from mailguard.smtpd import sessionlog
from mailguard.smtpd.budget import JUNK_COMMAND_LIMIT, Budgets  # noqa: F401  (JUNK_COMMAND_LIMIT: as before)
from mailguard.smtpd.events import AUTH, CLOSED, COMMAND, DATA
from mailguard.smtpd.extensions import Extensions
from mailguard.smtpd.mailtx import MailTransaction
from mailguard.smtpd.hops import ReceivedCounter
from mailguard.smtpd.transaction import Transaction

if TYPE_CHECKING:
    from mailguard.smtpd.context import ServerContext

log = Logger()

OUTPUT_BATCH_MAX = 16 * 1024  # replies held for a pipelined group, at most (then written: see flow.py)
_COMMANDS = frozenset({"HELO", "EHLO", "NOOP", "RSET", "QUIT", "HELP", "EXPN", "VRFY", "MAIL",
                       "RCPT", "DATA", "STARTTLS", "AUTH", "ETRN"})
_EMPTY = b""


class ServerSession(Budgets, MailTransaction, Extensions):
    """The server side of one SMTP session, from the greeting on: the
    session commands of RFC 5321 here, the mail transaction (MAIL, RCPT,
    DATA) in L{MailTransaction}, the service extensions' in L{Extensions},
    the error budget and the per-address limits in L{Budgets}.

    @param facts: the session facts at the greeting.
    @param context: what every session shares (the configuration, the
        clock, the trust policy and password checker); see
        L{mailguard.smtpd.context.ServerContext}.  Only plain decisions are
        made with it here; everything that waits is a request.
    @param token: randomness for the CRAM-MD5 nonce.
    @param sid: the session id every log line of the session carries
        (L{mailguard.smtpd.sessionlog}).
    """

    __slots__ = ("facts", "context", "mode", "transaction", "errors", "junk", "vrfy_asked", "auth_failures",
                 "_token", "_buffer", "_pos", "_events", "_out", "_out_size", "_pending", "_lines", "_data",
                 "_data_failed", "_envelope", "_sasl", "_stopping", "sid", "commands", "refusals", "messages",
                 "_verb", "_rcpt", "_detail", "_mech", "_auth_user", "_size", "progress", "_rested", "_hops")

    def __init__(self, facts: Session, context: ServerContext,
                 token: Callable[[int], str] = secrets.token_hex, sid: str = "") -> None:
        self.facts = facts
        self.sid = sid
        self.context = context
        self.mode = COMMAND
        self.transaction: Transaction | None = None
        self._token = token
        self._buffer = _EMPTY
        self._pos = 0  # where the unread input starts in _buffer
        self._events: list = []
        self._out: list[bytes] = []  # replies held while pipelined commands wait
        self._out_size = 0
        self._pending: E.Request | None = None
        self._lines = F.CommandReader()
        self._data: F.DataReader | None = None
        self._data_failed: R.Reply | None = None
        self._envelope = None
        self._sasl = None
        self._stopping = False
        self._hops: ReceivedCounter | None = None
        self.errors = 0
        self.junk = 0
        self.vrfy_asked = 0
        self.auth_failures = 0
        self.commands = self.refusals = self.messages = self._size = 0
        self._verb = self._rcpt = self._detail = self._mech = self._auth_user = None
        self.progress = 0  # command lines, AUTH responses and messages read (the deadline's restarts)
        self._rested = False  # the error sleep before the next command is done

    # -- the h11-style surface ----------------------------------------------------------
    def greet(self) -> None:
        """The server speaks first: ``220``."""
        self._send(R.SERVICE_READY.with_text(f"{self.context.hostname} ESMTP"))

    def receive_data(self, data: bytes) -> None:
        if self.mode is not CLOSED:
            self._buffer, self._pos = self._buffer[self._pos:] + data, 0  # [0:] is no copy

    def next_event(self):
        """The next event, or a signal: L{E.PAUSED}, L{E.NEED_DATA}, L{E.CLOSED}."""
        events = self._events
        while not events:
            if self._pending is not None:
                return E.CLOSED if self.mode is CLOSED else E.PAUSED
            if self.mode is CLOSED:
                return E.CLOSED
            if self._stopping and self.mode is COMMAND:
                self.close(R.SHUTTING_DOWN)  # the message in progress is answered: now go
                continue
            if not (self._pos < len(self._buffer) and self._step()):
                if not self._out:
                    return E.NEED_DATA
                self._flush()  # the pipelined group is drained
        return events.pop(0)

    @property
    def waiting(self) -> bool:
        """A request is outstanding."""
        return self._pending is not None

    @property
    def buffered(self) -> int:
        """Octets received and not yet read."""
        return len(self._buffer) - self._pos

    @property
    def message_size(self) -> int:
        """Unstuffed octets of the message being received."""
        return self._data.size if self._data is not None else 0

    def answer(self, value) -> None:
        """The result of the outstanding request."""
        request, self._pending = self._pending, None
        kind = type(request)
        if kind is E.CommitMessage:
            return self._stored(request.envelope)  # logged even if closed meanwhile
        if self.mode is CLOSED:
            return
        if kind is E.Delay:
            self._rested = True
        elif kind is E.CheckRecipient:
            self._recipient_decided(request, value)
        elif kind is E.BeginMessage:
            self._data_begun(request.envelope)
        elif kind is E.AnswerVrfy:
            self._send(value)
        elif kind is E.CheckCredentials:
            self._auth_result(value)
        elif kind is E.AuthFailureDelay:
            self._send(R.AUTH_FAILED)
        elif kind is E.KickQueue:
            self._send(R.ETRN_STARTED)

    def failed(self) -> None:
        """The outstanding request failed (the adapter has logged why)."""
        request, self._pending = self._pending, None
        if self.mode is CLOSED:
            return
        if isinstance(request, E.CheckCredentials):
            self._auth_internal_error()
        elif isinstance(request, (E.BeginMessage, E.CommitMessage)):
            self._send(R.STORAGE_ERROR)
        else:
            self._send(R.LOCAL_ERROR)

    def message_failed(self) -> None:
        """The message could not be written (after a L{E.WriteMessage}):
        it is aborted, and refused at the final dot."""
        if self.mode is DATA:
            self._data_fail(R.STORAGE_ERROR)

    def close(self, reply: R.Reply, cause: str | None = None) -> None:
        """Say C{reply} after the replies held, then close (a timeout, or
        too many errors).  Nothing more is read.  C{cause}: what the log
        names as the command answered, when it is not the last command
        (``timeout``)."""
        if self.mode is CLOSED:
            return
        if cause is not None:
            self._verb = cause
        self._discard_input()
        self._send(reply)
        self.mode = CLOSED
        self._events.append(E.Close())

    def shut_down(self, force: bool = False) -> bool:
        """The server is stopping: say ``421 4.3.2`` and close -- at once,
        unless a message is on its way.  A message being received (DATA,
        or its file being opened) may finish within the adapter's grace
        period: its final dot is answered as ever (a ``250`` still means
        fsynced), then the ``421``.  C{force} (the grace is over) cuts a
        message short, discarded; never one being committed, whose answer
        is the store's to give.  True while the session stays open."""
        if self.mode is CLOSED:
            return False
        self._stopping = True
        if isinstance(self._pending, E.CommitMessage):
            return True
        if not force and (self.mode is DATA or isinstance(self._pending, E.BeginMessage)):
            return True
        if self.mode is DATA:
            self._events.append(E.AbortMessage())
        self.close(R.SHUTTING_DOWN)
        return False

    def connection_lost(self) -> None:
        self.mode = CLOSED
        self._discard_input()

    def _discard_input(self) -> int:
        """Forget the input not yet read; how many octets that was."""
        n = len(self._buffer) - self._pos
        self._buffer, self._pos = _EMPTY, 0
        return n

    # -- output ---------------------------------------------------------------------------
    def _send(self, reply: R.Reply, extra: tuple[str, ...] = ()) -> None:
        if self.mode is CLOSED:
            return
        if reply.code >= 400:
            self._refused(reply)
        self._write(reply.to_bytes(extra))

    def _write(self, data: bytes) -> None:
        mode = self.mode
        if mode is CLOSED:
            return
        if mode is COMMAND and self._out_size < OUTPUT_BATCH_MAX and self._buffer.find(b"\n", self._pos) >= 0:
            self._out.append(data)  # more pipelined commands wait: answer them together
            self._out_size += len(data)
        elif self._out:
            self._out.append(data)
            self._flush()
        else:
            self._events.append(E.Write(data))

    def _flush(self) -> None:
        if self._out:
            self._events.append(E.Write(b"".join(self._out)))
            self._out = []
            self._out_size = 0

    def _refused(self, reply: R.Reply) -> None:
        """Every 4xx/5xx sent: one log line and the counters."""
        self.refusals += 1
        verb, transaction = self._verb, self.transaction
        self.context.stats.refused(verb or "-", reply.code, reply.status)
        sessionlog.reject(self.sid, self.facts, verb, reply,
                          sender=transaction.mail_from if transaction is not None else None,
                          rcpt=self._rcpt if verb == "RCPT" else None, detail=self._detail)
        self._detail = None

    def _request(self, request: E.Request) -> None:
        self._pending = request
        self._events.append(request)

    def _refuse(self, refusal: Refusal) -> None:
        if refusal.error:
            self._error(refusal.reply)
        else:
            self._send(refusal.reply)

    # -- input ----------------------------------------------------------------------------
    def _step(self) -> bool:
        """Read one command line, AUTH response or DATA event.  False:
        more input is needed."""
        if self.mode is DATA:
            buf = self._buffer[self._pos:] if self._pos else self._buffer
            event, self._buffer = self._data.read(buf)
            self._pos = 0
            if event is None:
                return False
            self._data_event(event)
            return True
        if self.errors and not self._rested and self._sleep():
            return True
        line, self._pos = self._lines.read_at(self._buffer, self._pos, self.mode is AUTH)
        if line is None:
            return False
        self.progress += 1
        self._rested = False
        if line is F.LINE_TOO_LONG:
            if self.mode is AUTH:  # RFC 4954 4: the exchange is cancelled
                self.mode, self._sasl = COMMAND, None
            self._error(R.LINE_TOO_LONG)
        elif self.mode is AUTH:
            self.mode = COMMAND
            self._guarded_auth(self._auth_response, line)
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.strip().partition(b" ")
        try:
            name = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            name = ""
        self.commands += 1
        if name not in _COMMANDS:
            self._verb = "UNKNOWN"
            return self._error(R.UNKNOWN_COMMAND)
        self._verb = name
        try:
            arg = rest.strip().decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R.SYNTAX_ERROR)
        if name == "AUTH":  # an exception's text may quote credentials
            return self._guarded_auth(self.smtp_AUTH, arg)
        try:
            getattr(self, "smtp_" + name)(arg)
        except Exception:
            log.failure("error handling {verb} session={session}", verb=name, session=self.sid)
            self._send(R.LOCAL_ERROR)

    # -- session commands -----------------------------------------------------------------
    def smtp_HELO(self, arg: str) -> None:
        """RFC 5321 HELO: the hostname only, never the extensions."""
        self._hello(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def _hello(self, arg: str, esmtp: bool) -> None:
        if not arg:
            verb = "EHLO" if esmtp else "HELO"
            return self._error(R.SYNTAX_ERROR.with_text(f"{verb} requires a domain"))
        self.transaction = None
        helo, facts = arg.split()[0], self.facts
        if facts.helo != helo or facts.esmtp is not esmtp:  # a repeated HELO changes nothing
            self.facts = replace(facts, helo=helo, esmtp=esmtp)
        self._write(R.hello_reply(self.context.hostname, tuple(self.ehlo_extensions()) if esmtp else ()))

    def ehlo_extensions(self) -> list[str]:
        ctx = self.context
        return ehlo_keywords(self.facts, mechanisms=self._mechanisms(), max_size=ctx.config.max_message_size,
                             starttls=ctx.tls is not None, vrfy=ctx.config.vrfy_enabled,
                             etrn=ctx.queue is not None, dsn=ctx.dsn)

    def help_commands(self) -> list[str]:
        ctx = self.context
        return help_commands(self.facts, mechanisms=self._mechanisms(), starttls=ctx.tls is not None,
                             vrfy=ctx.config.vrfy_enabled, etrn=ctx.queue is not None)

    def smtp_NOOP(self, arg: str) -> None:
        if not self._junk_command():
            self._send(R.NOOP_OK)

    def smtp_RSET(self, arg: str) -> None:
        if not self._junk_command():
            self.transaction = None
            self._send(R.RESET_OK)

    def smtp_HELP(self, arg: str) -> None:
        if not self._junk_command():
            self._send(R.HELP.with_text("Commands: " + " ".join(self.help_commands())))

    def smtp_EXPN(self, arg: str) -> None:
        if not self._junk_command():
            self._send(R.EXPN_DISABLED)

    def smtp_QUIT(self, arg: str) -> None:
        self.close(R.CLOSING)  # nothing after QUIT is read

    def smtp_VRFY(self, arg: str) -> None:
        config = self.context.config
        if vrfy_budgeted(self.facts, enabled=config.vrfy_enabled, trust=self.context.trust):
            self.vrfy_asked += 1
            if self.vrfy_asked > config.vrfy_limit:
                return self.close(R.TOO_MANY_ERRORS)
        refusal = vrfy_refusal(config.vrfy_enabled, arg)
        if refusal is not None:
            return self._refuse(refusal)
        self._request(E.AnswerVrfy(self.facts, arg))
