"""The ESMTP server protocol: bytes in, replies out; policy is asked, not made.

``MailguardESMTP`` subclasses ``twisted.mail.smtp.ESMTP`` but does its own
framing, because the line handling it inherits has the flaws
``../shared/STYLE.md`` lists: replies out of order while a check is pending
(twisted/twisted#8126), an over-long DATA line that drops back into command
mode, bare LF reaching the stored message, commands pipelined behind
STARTTLS running inside TLS, and DATA handed to Python one line at a time.

Here all input goes into one buffer that ``_process`` drains in order; while
a Deferred (a recipient check, a durable commit, an AUTH delay) is pending,
nothing more is read from the buffer, so replies always come in order.  DATA
is consumed in bulk: whole blocks are checked for bare CR/LF and long lines,
unstuffed and written with a few C-level bytes operations.

Every decision (greeting, recipient, VRFY, trust) is delegated to the policy
objects the factory holds; see ``mailguard.interfaces``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
import time
from dataclasses import replace

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp

from mailguard import replies as R
from mailguard.policy.addresses import AddressError, parse_mail_from, parse_rcpt_to
from mailguard.store.maildir import Envelope
from mailguard.policy.rules import auth_mechanisms, mail_refusal
from mailguard.policy.session import Session

log = Logger()

HELD, COMMAND, DATA, AUTH_WAIT, CLOSED = "HELD", "COMMAND", "DATA", "AUTH", "CLOSED"

# Input buffered while a check is pending, beyond which reading pauses.
INPUT_HOLD_MAX = 64 * 1024
COMMAND_LINE_MAX = 512  # RFC 5321 4.5.3.1.4, CRLF included
AUTH_LINE_MAX = 12288  # RFC 4954 section 4
TEXT_LINE_MAX = 1000  # RFC 5321 4.5.3.1.6, CRLF included
BIG_READ_SIZE = 1 << 18  # bytes per recv while a large DATA arrives
BIG_READ_AFTER = 1 << 18  # DATA bytes after which reads get that large
# Checked on unstuffed data: the dot added for transparency does not count
# (RFC 5321 4.5.3.1.6), so a 998-octet line whose stuffed form is 999 passes.
_AUTH_PREFIX = re.compile(rb"[ \t]*AUTH[ \t]", re.IGNORECASE)
JUNK_COMMAND_LIMIT = 100  # NOOP/RSET/HELP/EXPN before each counts as an error (Postfix smtpd_junk_command_limit)
# Failed AUTH attempts per session: the n-th is answered after n seconds,
# the last closes the session.  Not 3: smtplib and mail clients try every
# advertised mechanism with one wrong password before giving up.
AUTH_FAILURE_LIMIT = 5  # the default of SmtpMaxAuthFailures
_EMPTY = b""


class MailguardESMTP(smtp.ESMTP):
    """One SMTP session.  Created by L{mailguard.smtpd.factory.MailguardFactory}."""

    # Class-level defaults keep a connection that is only waiting for its
    # greeting small: the instance dict holds just what differs.
    mode = HELD
    session: Session | None = None
    _hold = None
    _held_since = 0.0
    _was_held = False
    _buffer = _EMPTY
    _busy = False
    _waits = 0  # Deferreds being waited for; _busy while non-zero
    _idle = None
    _session_timer = None
    _helo_done = False
    _esmtp = False  # the client said EHLO (not HELO): "ESMTP" in Received
    _junk = 0
    _rcpt_attempts = 0
    _mail_from = None
    _mail_params: dict = {}
    _recipients: list = []
    _errors = 0
    _vrfy_count = 0
    _auth_failures = 0
    _auth_state = None
    _message = None
    _data_failed = None
    _data_size = 0
    _normal_read_size = None  # the transport's recv size, while a large DATA reads more
    _data_at_line_start = True
    _discard_line = False
    _tls_active = False
    _in_process = False
    _paused = False  # reading paused while a check is pending (backpressure)
    _out = None  # replies held while pipelined commands wait (RFC 2920)
    _auth_delay = None

    def __init__(self, factory) -> None:
        # ESMTP.__init__ is not called: it sets the import-time DNSNAME and
        # per-connection state we keep on the class until it changes.
        self.factory = factory

    # -- connection ------------------------------------------------------------
    @property
    def ctx(self):
        return self.factory.context.tls

    @property
    def host(self) -> bytes:
        return self.factory.context.hostname.encode("ascii")

    def connectionMade(self) -> None:
        ctx = self.factory.context
        peer = self.transport.getPeer()
        self.session = Session(
            client_ip=_normalise_ip(getattr(peer, "host", "")),
            client_port=getattr(peer, "port", 0),
            listener=self.factory.listener,
            tls=self.factory.listener == "smtps",
        )
        if self.session.tls:  # else the class default: no dict entry while held
            self._tls_active = True
        refusal = ctx.connections.open(self)
        if refusal is not None:
            self.mode = CLOSED
            event = "too-many-from-ip" if refusal is R.TOO_MANY_FROM_IP else "too-many-connections"
            ctx.security_log.record(event, self.session.client_ip, self.session.client_port, 0.0, b"")
            self._send(refusal)
            self.transport.loseConnection()
            return
        decision = ctx.greeting.decide(self.session)
        if decision.delay > 0:
            # Held (Kerio's spam repellent): one delayed call, nothing is
            # read into a session; any byte before it fires is an early
            # talker.  The teaser sends the first line of a multi-line 220
            # now, so a bot that reacts to it talks before the last line.
            self._held_since = ctx.clock.seconds()
            if decision.teaser:
                self.transport.write(b"220-" + self.host + b" ESMTP\r\n")
            self._hold = ctx.clock.callLater(decision.delay, self._release)
        else:
            self._greet()

    def _release(self) -> None:
        """The client waited out the delay: greet it."""
        self._hold = None
        if self.mode == HELD:
            self._was_held = True
            self._greet()

    def _greet(self) -> None:
        ctx = self.factory.context
        self.mode = COMMAND
        self._send(R.SERVICE_READY.with_text(f"{ctx.hostname} ESMTP"))
        if ctx.config.idle_timeout > 0:  # 0: no limit
            self._idle = ctx.clock.callLater(ctx.config.idle_timeout, self._idle_timeout)
        if ctx.config.max_session_time > 0:
            self._session_timer = ctx.clock.callLater(ctx.config.max_session_time, self._session_too_long)
        if self._buffer:  # cannot happen while held, but keep the invariant
            self._process()

    def dataReceived(self, data: bytes) -> None:
        if self.mode == HELD:
            self._early_talker(data)
            return
        if self.mode == CLOSED:
            return
        self._buffer += data
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.context.config.idle_timeout)
        if not self._busy:
            self._process()
        elif len(self._buffer) > INPUT_HOLD_MAX and not self._paused:
            # A check is pending and the client keeps sending: stop reading
            # (TCP backpressure) instead of buffering without limit.
            self._paused = True
            self.transport.pauseProducing()

    def _early_talker(self, data: bytes) -> None:
        ctx = self.factory.context
        waited = ctx.clock.seconds() - self._held_since
        if self._hold is not None and self._hold.active():
            self._hold.cancel()
        self._hold = None
        self.mode = CLOSED
        if ctx.config.greeting_delay_log:
            ctx.security_log.record("early-talker", self.session.client_ip,
                                    self.session.client_port, waited, data)
        self._send(R.EARLY_TALKER)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        ctx = self.factory.context
        if self._hold is not None:
            # Closed while held: the client gave up waiting -- unless the
            # server itself is shutting down and closing everything.
            if self._hold.active():
                self._hold.cancel()
            self._hold = None
            if self.mode == HELD and ctx.config.greeting_delay_log and not ctx.connections.stopping:
                ctx.security_log.record("gave-up", self.session.client_ip, self.session.client_port,
                                        ctx.clock.seconds() - self._held_since, b"")
        for name in ("_idle", "_session_timer", "_auth_delay"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if self._message is not None:
            self._message.abort()
            self._message = None
        self.mode = CLOSED
        ctx.connections.close(self)

    def _idle_timeout(self) -> None:
        self._idle = None
        self._close_with(R.TIMEOUT)

    def _session_too_long(self) -> None:
        self._session_timer = None
        self._close_with(R.SESSION_TOO_LONG)

    def _close_with(self, reply: R.Reply) -> None:
        if self.mode == CLOSED:
            return
        self._buffer = _EMPTY  # nothing more is read; held replies go first
        self._send(reply)
        self.mode = CLOSED
        self.transport.loseConnection()

    # -- output ------------------------------------------------------------------
    def _send(self, reply: R.Reply, extra: tuple[str, ...] = ()) -> None:
        """Send a reply; while the client's pipelined commands are still
        waiting in the buffer, collect replies and send them together when
        the buffer is drained (RFC 2920 3.2).  One write per pipelined
        group, instead of a small packet per reply that Nagle and delayed
        ACKs would stall."""
        data = reply.to_bytes(extra)
        if self.mode == COMMAND and b"\n" in self._buffer:
            if self._out is None:
                self._out = [data]
            else:
                self._out.append(data)
            return
        if self._out is not None:
            data = b"".join(self._out) + data
            self._out = None
        self.transport.write(data)

    def _flush(self) -> None:
        if self._out is not None:
            data, self._out = b"".join(self._out), None
            self.transport.write(data)

    def sendCode(self, code, message=b""):  # twisted.mail API, kept for subclasses
        self.transport.write(b"%d %s\r\n" % (code, message))

    # -- the input loop ------------------------------------------------------------
    def _process(self) -> None:
        """Drain the buffer in order until it is empty or a Deferred is pending."""
        self._in_process = True
        try:
            self._drain()
        finally:
            self._in_process = False
            # Flush unless more pipelined commands wait, or a pending check
            # will answer (its reply then carries the held ones along).
            if self._out is not None and not self._busy and not (
                    self.mode == COMMAND and b"\n" in self._buffer):
                self._flush()
            if self._paused and not self._busy and self.mode != CLOSED:
                self._paused = False
                self.transport.resumeProducing()

    def _drain(self) -> None:
        while self._buffer and not self._busy and self.mode not in (CLOSED, HELD):
            if self.mode == DATA:
                if not self._data_chunk():
                    return
                continue
            limit = self._line_limit()
            i = self._buffer.find(b"\n")
            if i < 0:
                if len(self._buffer) > limit:
                    # Discard the over-long line up to its end.
                    self._buffer = _EMPTY
                    if not self._discard_line:
                        self._discard_line = True
                        self._line_too_long()
                return
            line, self._buffer = self._buffer[:i], self._buffer[i + 1:]
            if self._discard_line:
                self._discard_line = False
                continue
            if len(line) + 1 > limit:
                self._line_too_long()
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if self.mode == AUTH_WAIT:
                self._auth_line(line)
            else:
                self._command(line)

    def _line_limit(self) -> int:
        """512 octets for a command line (RFC 5321 4.5.3.1.4); 12288 for an
        AUTH command or response (RFC 4954 4: an initial response makes
        the AUTH line longer)."""
        if self.mode == AUTH_WAIT or _AUTH_PREFIX.match(self._buffer):
            return AUTH_LINE_MAX
        return COMMAND_LINE_MAX

    def _line_too_long(self) -> None:
        if self.mode == AUTH_WAIT:  # RFC 4954 4: the exchange is cancelled
            self.mode = COMMAND
            self._auth_state = None
        self._error(R.LINE_TOO_LONG)

    def _wait(self, d: defer.Deferred) -> None:
        """Stop reading input until C{d} has fired (pipelining order).

        Waits nest (an AUTH check whose callback starts the failure
        delay): input resumes only when every one has fired."""
        self._waits += 1
        self._busy = True

        def done(_):
            self._waits -= 1
            if self._waits:
                return
            self._busy = False
            # A Deferred that fired at once returns to the running loop;
            # only a later one restarts it (no recursion per command).
            if not self._in_process:
                if self._buffer and self.mode not in (CLOSED, HELD):
                    self._process()
                elif self._out is not None:
                    self._flush()

        d.addBoth(done)

    def _error(self, reply: R.Reply) -> None:
        """A client error: answer it, and close after too many."""
        self._errors += 1
        if self._errors > self.factory.context.config.max_errors:
            self._close_with(R.TOO_MANY_ERRORS)
        else:
            self._send(reply)

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.strip().partition(b" ")
        try:
            name = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            name = ""
        handler = getattr(self, "smtp_" + name, None) if name.isalpha() else None
        if handler is None:
            self._error(R.UNKNOWN_COMMAND)
            return
        try:
            arg = rest.strip().decode("utf-8")
        except UnicodeDecodeError:
            self._error(R.SYNTAX_ERROR)
            return
        try:
            handler(arg)
        except Exception as e:
            if name == "AUTH":
                # The traceback or the exception text may quote credentials.
                self._auth_internal_error(e)
            else:
                log.failure("error handling {verb}", verb=name)
                self._send(R.LOCAL_ERROR)

    # -- session commands ----------------------------------------------------------
    def _reset_transaction(self) -> None:
        self._mail_from = None
        self._mail_params = {}
        self._recipients = []
        self._rcpt_attempts = 0

    def _junk_command(self) -> bool:
        """NOOP, RSET, HELP, EXPN: free up to L{JUNK_COMMAND_LIMIT} per
        session, then each counts as an error.  True if that closed the
        session."""
        self._junk += 1
        if self._junk <= JUNK_COMMAND_LIMIT:
            return False
        self._errors += 1
        if self._errors > self.factory.context.config.max_errors:
            self._close_with(R.TOO_MANY_ERRORS)
            return True
        return False

    def smtp_HELO(self, arg: str) -> None:
        """RFC 5321 HELO: the hostname only, never the extensions."""
        if not arg:
            return self._error(R.SYNTAX_ERROR.with_text("HELO requires a domain"))
        self._reset_transaction()
        self._helo_done = True
        self._esmtp = False
        self.session = replace(self.session, helo=arg.split()[0])
        self._send(R.HELO_OK.with_text(self.factory.context.hostname))

    def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            return self._error(R.SYNTAX_ERROR.with_text("EHLO requires a domain"))
        self._reset_transaction()
        self._helo_done = True
        self._esmtp = True
        self.session = replace(self.session, helo=arg.split()[0])
        ctx = self.factory.context
        self._send(R.HELO_OK.with_text(ctx.hostname), tuple(self.ehlo_extensions()))

    def ehlo_extensions(self) -> list[str]:
        """The EHLO keywords, in the order of the Kerio server in the seed."""
        ctx = self.factory.context
        ext = []
        mechs = self.auth_mechanisms()
        if mechs and not self.session.authenticated:
            ext.append("AUTH " + " ".join(mechs))
        ext.append(f"SIZE {ctx.config.max_message_size}")
        if ctx.tls is not None and not self._tls_active:
            ext.append("STARTTLS")
        if ctx.config.vrfy_enabled:
            ext.append("VRFY")
        ext += ["ENHANCEDSTATUSCODES", "8BITMIME", "PIPELINING"]
        if ctx.queue is not None:
            ext.append("ETRN")
        if ctx.dsn:
            ext.append("DSN")
        ext.append("HELP")
        return ext

    def smtp_NOOP(self, arg: str) -> None:
        if not self._junk_command():
            self._send(R.NOOP_OK)

    def smtp_RSET(self, arg: str) -> None:
        if self._junk_command():
            return
        self._reset_transaction()
        self._send(R.RESET_OK)

    def smtp_QUIT(self, arg: str) -> None:
        self._buffer = _EMPTY  # nothing after QUIT is read; held replies go first
        self._send(R.CLOSING)
        self.mode = CLOSED
        self.transport.loseConnection()

    def smtp_HELP(self, arg: str) -> None:
        """214: the commands this session can use now (not a fixed list:
        STARTTLS, AUTH, VRFY and ETRN only where they work)."""
        if not self._junk_command():
            self._send(R.HELP.with_text("Commands: " + " ".join(self.help_commands())))

    def help_commands(self) -> list[str]:
        ctx = self.factory.context
        names = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP"]
        if ctx.config.vrfy_enabled:
            names.append("VRFY")
        if ctx.tls is not None and not self._tls_active:
            names.append("STARTTLS")
        if self.auth_mechanisms() and not self.session.authenticated:
            names.append("AUTH")
        if ctx.queue is not None:
            names.append("ETRN")
        return names

    def smtp_EXPN(self, arg: str) -> None:
        if not self._junk_command():
            self._send(R.EXPN_DISABLED)

    def smtp_VRFY(self, arg: str) -> None:
        ctx = self.factory.context
        if ctx.config.vrfy_enabled and not ctx.trust.is_trusted(self.session):
            self._vrfy_count += 1
            if self._vrfy_count > ctx.config.vrfy_limit:
                return self._close_with(R.TOO_MANY_ERRORS)
        d = defer.maybeDeferred(ctx.vrfy.answer, self.session, arg)
        d.addCallback(self._vrfy_reply)
        d.addErrback(self._internal_error, "VRFY")
        self._wait(d)

    def _vrfy_reply(self, reply: R.Reply) -> None:
        # VRFY while disabled, or with a malformed argument, is a client
        # error like any other (SmtpMaxErrors); answers about users are not.
        if reply.code in (501, 502):
            self._error(reply)
        else:
            self._send(reply)

    def _internal_error(self, failure, what: str) -> None:
        log.failure("internal error in {what}", failure, what=what)
        self._send(R.LOCAL_ERROR)

    # -- mail transaction ------------------------------------------------------------
    def smtp_MAIL(self, arg: str) -> None:
        if not self._helo_done:
            return self._error(R.NEED_EHLO)
        if self._mail_from is not None:
            return self._error(R.NESTED_MAIL)
        refusal = mail_refusal(self.session)
        if refusal is not None:
            return self._error(refusal.reply)
        try:
            sender, params = parse_mail_from(arg)
        except AddressError as e:
            return self._error(e.reply)
        bad = self.check_mail_params(params)
        if bad is not None:
            return self._error(bad) if bad.code < 550 else self._send(bad)
        self._mail_from = sender.address if sender is not None else ""
        self._mail_params = params
        self._recipients = []
        self._send(R.SENDER_OK)

    def check_mail_params(self, params: dict) -> R.Reply | None:
        ctx = self.factory.context
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return R.SYNTAX_ERROR.with_text("SIZE requires a number")
                if 0 < ctx.config.max_message_size < int(value):  # RFC 1870: SIZE 0 is no limit
                    return R.MESSAGE_TOO_BIG
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return R.BAD_PARAMETER.with_text("BODY must be 7BIT or 8BITMIME")
            elif key == "AUTH":  # RFC 4954 5: accepted, the value is not trusted
                pass
            elif key in ("RET", "ENVID") and ctx.dsn:  # RFC 3461; kept in the envelope
                from mailguard.store.dsn import check_mail_parameter

                why = check_mail_parameter(key, value)
                if why is not None:
                    return R.SYNTAX_ERROR.with_text(why)
            else:
                return R.BAD_PARAMETER.with_text(f"Unsupported MAIL parameter {key}")
        return None

    def smtp_RCPT(self, arg: str) -> None:
        ctx = self.factory.context
        if self._mail_from is None:
            return self._error(R.NEED_MAIL)
        try:
            mailbox, params = parse_rcpt_to(arg, postmaster_domain=self._postmaster_domain())
        except AddressError as e:
            return self._error(e.reply)
        for key, value in params.items():
            if not (ctx.dsn and key in ("NOTIFY", "ORCPT")):
                return self._error(R.BAD_PARAMETER.with_text(f"Unsupported RCPT parameter {key}"))
            from mailguard.store.dsn import check_rcpt_parameter  # RFC 3461; kept per recipient

            why = check_rcpt_parameter(key, value)
            if why is not None:
                return self._error(R.SYNTAX_ERROR.with_text(why))
        if len(self._recipients) >= ctx.config.max_recipients:
            return self._send(R.TOO_MANY_RECIPIENTS)
        self._rcpt_attempts += 1
        d = defer.maybeDeferred(ctx.recipients.check_recipient, self.session, mailbox)

        def decided(verdict):
            if verdict.accepted:
                self._recipients.append((verdict, params))
            else:
                log.info("RCPT refused: {ip} <{rcpt}>: {reason}", ip=self.session.client_ip,
                         rcpt=mailbox.address, reason=verdict.reason)
            self._send(verdict.reply)

        d.addCallback(decided)
        d.addErrback(self._internal_error, "RCPT")
        self._wait(d)

    def _postmaster_domain(self) -> str | None:
        """RFC 5321 4.5.1: RCPT TO:<Postmaster> means our postmaster."""
        domains = self.factory.context.config.domains
        return domains[0].name if domains else None

    def smtp_DATA(self, arg: str) -> None:
        ctx = self.factory.context
        if arg:
            return self._error(R.SYNTAX_ERROR)
        if self._mail_from is None:
            return self._error(R.NEED_MAIL)
        if not self._recipients:
            # RFC 2920 3.1: after pipelined RCPTs that all failed, 554.
            return self._error(R.NO_VALID_RECIPIENTS if self._rcpt_attempts else R.NEED_RCPT)
        mailboxes: list[str] = []
        relay: list[str] = []
        rcpt_params = {}
        for verdict, params in self._recipients:
            mailboxes.extend(verdict.mailboxes)
            relay.extend(verdict.relay_to)
            rcpt_params[verdict.address] = params
        envelope = Envelope(
            mail_from=self._mail_from,
            mailboxes=tuple(dict.fromkeys(mailboxes)),
            relay_recipients=tuple(dict.fromkeys(relay)),
            mail_params=self._mail_params,
            rcpt_params=rcpt_params,
            client_ip=self.session.client_ip,
            helo=self.session.helo or "",
        )
        try:
            self._message = ctx.store.begin(envelope)
            self._message.write(self.return_path(envelope) + self.received_header(envelope))
        except OSError:
            log.failure("cannot open message file")
            self._message = None
            return self._send(R.STORAGE_ERROR)
        self._envelope = envelope
        self._data_failed = None
        self._data_size = 0
        self._data_at_line_start = True
        self.mode = DATA
        self._send(R.START_DATA)

    @staticmethod
    def return_path(envelope: Envelope) -> bytes:
        """RFC 5321 4.4: final delivery records the envelope sender.  The
        stored file is shared by every destination, so it is written once;
        the relay queue leaves it out when it forwards (a relaying MTA must
        not send it on)."""
        return b"Return-Path: <" + envelope.mail_from.encode("utf-8", "replace") + b">\r\n"

    def received_header(self, envelope: Envelope) -> bytes:
        """RFC 5321 4.4 trace header; RFC 3848 protocol types; no software
        name or version."""
        ctx = self.factory.context
        proto = self._protocol_type()
        rcpt = ""
        all_rcpts = envelope.mailboxes + envelope.relay_recipients
        if len(all_rcpts) == 1:
            rcpt = f"\r\n\tfor <{all_rcpts[0]}>"
        helo = _header_safe(self.session.helo or "unknown")
        date = smtp.rfc822date(time.localtime(ctx.clock.seconds())).decode("ascii")
        header = (f"Received: from {helo} ([{self.session.client_ip}])\r\n"
                  f"\tby {ctx.hostname} with {proto} id {envelope.message_id.split('.')[1]}"
                  f"{rcpt};\r\n\t{date}\r\n")
        return header.encode("utf-8", "replace")

    def _protocol_type(self) -> str:
        """RFC 3848 / the IANA "Mail Transmission Types": SMTP after HELO,
        ESMTP after EHLO, plus S for TLS and A for AUTH.  STARTTLS and AUTH
        are SMTP service extensions, so a session using either is ESMTP
        even if the client said HELO (there is no "SMTPS" type)."""
        tls, auth = self._tls_active, bool(self.session.authenticated)
        if not (self._esmtp or tls or auth):
            return "SMTP"
        return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")

    def _data_chunk(self) -> bool:
        """Consume DATA from the buffer.  False: need more input."""
        buf = self._buffer
        end = buf.rfind(b"\n")
        if end < 0:
            # A partial line.  1000 octets without LF: too long, whatever
            # follows (one more for a dot added for transparency).
            stuffed = self._data_at_line_start and buf[:1] == b"."
            if len(buf) >= TEXT_LINE_MAX + stuffed:
                if b"\r" in buf[:-1]:  # bare CR, even in a line never stored
                    self._bare_line_ending()
                    return False
                self._data_fail(R.DATA_LINE_TOO_LONG)
                self._data_at_line_start = False
                self._buffer = buf[-1:] if buf.endswith(b"\r") else _EMPTY
            return False
        block = buf[: end + 1]
        rest = buf[end + 1:]
        # Find the terminating "." line; only CRLF.CRLF ends DATA.
        if self._data_at_line_start:
            virtual = b"\r\n" + block
            j = virtual.find(b"\r\n.\r\n")
            body_end = j if j >= 0 else -1
        else:
            j = block.find(b"\r\n.\r\n")
            body_end = j + 2 if j >= 0 else -1
        finished = body_end >= 0
        if finished:
            rest = block[body_end + 3:] + rest
            block = block[:body_end]
        self._buffer = rest
        if block:
            self._data_block(block)
            if self.mode == CLOSED:  # a smuggling attempt closed the session
                return False
        if finished:
            self._data_end()
            return True
        return True

    def _data_block(self, block: bytes) -> None:
        """A run of whole lines (each CRLF-terminated, unless a smuggling
        attempt): check, unstuff, store."""
        if self.mode == CLOSED:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self._bare_line_ending()
            return
        at_line_start, self._data_at_line_start = self._data_at_line_start, block.endswith(b"\n")
        if self._data_failed is not None:
            return  # keep reading to the final dot; the reply comes then
        if b"\n." not in block and not (at_line_start and block[:1] == b"."):
            data = block  # nothing to unstuff (most blocks): no copy
        elif at_line_start:
            data = (b"\n" + block).replace(b"\n.", b"\n")[1:]
        else:
            data = block.replace(b"\n.", b"\n")
        # C-level split and len: linear, unlike a regex search for a long
        # run, which rescans every line from each of its positions.  Every
        # LF here ends a CRLF (bare ones were refused above), so a piece
        # keeps its CR: a line is too long when its piece has TEXT_LINE_MAX
        # octets or more (TEXT_LINE_MAX - 2 of text, plus CRLF, is the limit).
        if len(data) >= TEXT_LINE_MAX and max(map(len, data.split(b"\n"))) >= TEXT_LINE_MAX:
            self._data_fail(R.DATA_LINE_TOO_LONG)
            return
        self._data_size += len(data)
        if self._data_size > BIG_READ_AFTER and self._normal_read_size is None:
            # 256 KiB per recv instead of Twisted's 64 KiB: a large message
            # costs a quarter of the reactor passes.  Only while it arrives:
            # a buffer that size is above malloc's mmap threshold, so for
            # small reads it would cost a map and an unmap each.
            self._normal_read_size = getattr(self.transport, "bufferSize", None) or 0
            self.transport.bufferSize = BIG_READ_SIZE
        limit = self.factory.context.config.max_message_size
        if 0 < limit < self._data_size:
            self._data_fail(R.MESSAGE_TOO_BIG)
            return
        try:
            self._message.write(data)
        except OSError:
            log.failure("cannot write message")
            self._data_fail(R.STORAGE_ERROR)

    def _bare_line_ending(self) -> None:
        """SMTP smuggling defence (Postfix smtpd_forbid_bare_newline): a
        bare CR or LF in DATA is refused and the session closed, so nothing
        after it is ever read as commands or as the end of the message."""
        log.info("bare CR/LF in DATA from {ip}: refused, closing", ip=self.session.client_ip)
        self._abort_message()
        self._close_with(R.BARE_LINE_ENDING)

    def _data_fail(self, reply: R.Reply) -> None:
        if self._data_failed is None:
            self._data_failed = reply
            self._abort_message()

    def _abort_message(self) -> None:
        if self._message is not None:
            self._message.abort()
            self._message = None

    def _data_end(self) -> None:
        ctx = self.factory.context
        self.mode = COMMAND
        if self._normal_read_size is not None:
            if self._normal_read_size:
                self.transport.bufferSize = self._normal_read_size
            self._normal_read_size = None
        self._reset_transaction()
        if self._data_failed is not None:
            reply, self._data_failed = self._data_failed, None
            self._send(reply)
            return
        message, self._message = self._message, None
        envelope = self._envelope
        d = message.commit()

        def stored(_):
            if self._was_held:  # it waited out the delay (pass cache)
                ctx.greeting.passed(self.session)
            log.info("accepted {id} from <{sender}> ({ip}) to {rcpts}", id=envelope.message_id,
                     sender=envelope.mail_from, ip=envelope.client_ip,
                     rcpts=list(envelope.mailboxes + envelope.relay_recipients))
            # The store has handed relayed recipients to the queue, which
            # tries them at once (no kick: that would end every deferred
            # entry's back-off too).
            if self.mode != CLOSED:
                self._send(R.MESSAGE_ACCEPTED.with_text(f"Ok: queued as {envelope.message_id.split('.')[1]}"))

        def failed(failure):
            log.failure("cannot store message {id}", failure, id=envelope.message_id)
            message.abort()
            if self.mode != CLOSED:
                self._send(R.STORAGE_ERROR)

        d.addCallbacks(stored, failed)
        self._wait(d)

    # -- STARTTLS --------------------------------------------------------------------
    def smtp_STARTTLS(self, arg: str) -> None:
        ctx = self.factory.context
        if self._tls_active:
            return self._error(R.TLS_ALREADY)
        if ctx.tls is None:
            return self._error(R.TLS_UNAVAILABLE)
        if arg:
            return self._error(R.SYNTAX_ERROR)
        if self._buffer:
            # Plain text pipelined behind STARTTLS (the command injection
            # flaw, CVE-2011-0411 and its kin): discard it, never run it
            # inside TLS.
            log.warn("discarded {n} bytes pipelined after STARTTLS from {ip}",
                     n=len(self._buffer), ip=self.session.client_ip)
            self._buffer = _EMPTY
        self._send(R.READY_TLS)
        self.transport.startTLS(ctx.tls)
        self._tls_active = True
        # RFC 3207 4.2: forget everything learnt before TLS; EHLO again.
        self._reset_transaction()
        self._helo_done = False
        self._esmtp = False
        self._auth_state = None
        self.session = replace(self.session, tls=True, helo=None, authenticated=None)

    # -- AUTH ------------------------------------------------------------------------
    def auth_mechanisms(self) -> list[str]:
        return auth_mechanisms(self.session, self.factory.context.passwords)

    def smtp_AUTH(self, arg: str) -> None:
        if not self._helo_done:
            return self._error(R.NEED_EHLO)
        if self.session.authenticated:
            return self._error(R.AUTH_ALREADY)
        if self._mail_from is not None:
            return self._error(R.BAD_SEQUENCE)
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if not mech:
            return self._error(R.SYNTAX_ERROR)
        if mech in ("PLAIN", "LOGIN") and not self._tls_active:
            return self._error(R.AUTH_NEEDS_TLS)
        if mech not in self.auth_mechanisms():
            return self._error(R.AUTH_MECHANISM_UNKNOWN)
        initial = initial.strip()
        if initial == "=":  # RFC 4954 4: an initial response of zero length
            return self._auth_malformed()
        if mech == "PLAIN":
            if initial:
                return self._auth_plain(initial.encode("ascii", "replace"))
            self._auth_state = ("PLAIN",)
            self._challenge(b"")
        elif mech == "LOGIN":
            if initial:
                self._auth_state = ("LOGIN-PASS", self._b64(initial.encode("ascii", "replace")))
                if self._auth_state[1] is None:
                    return self._auth_malformed()
                self._challenge(b"Password:")
            else:
                self._auth_state = ("LOGIN-USER",)
                self._challenge(b"Username:")
        elif mech == "CRAM-MD5":
            ctx = self.factory.context
            # RFC 2195: unique and unpredictable, in msg-id form.
            nonce = f"<{secrets.token_hex(12)}.{int(ctx.clock.seconds())}@{ctx.hostname}>".encode("ascii")
            self._auth_state = ("CRAM-MD5", nonce)
            self._challenge(nonce)

    def _challenge(self, data: bytes) -> None:
        self.mode = AUTH_WAIT
        self._send(R.Reply(334, "", base64.b64encode(data).decode("ascii")))

    @staticmethod
    def _b64(data: bytes) -> bytes | None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None

    def _auth_malformed(self) -> None:
        self.mode = COMMAND
        self._auth_state = None
        self._error(R.SYNTAX_ERROR.with_text("Invalid base64 data"))

    def _auth_line(self, line: bytes) -> None:
        try:
            self._auth_response(line)
        except Exception as e:
            self._auth_internal_error(e)

    def _auth_internal_error(self, e: BaseException) -> None:
        """Log the type only: the exception text or traceback could quote
        credentials.  Answer 454 4.7.0 (RFC 4954 6)."""
        log.error("internal error in AUTH: {exc}", exc=type(e).__name__)
        self._auth_state = None
        if self.mode != CLOSED:
            self.mode = COMMAND
            self._send(R.AUTH_TEMPORARY)

    def _auth_response(self, line: bytes) -> None:
        state, self._auth_state = self._auth_state, None
        self.mode = COMMAND
        if line.strip() == b"*":
            return self._send(R.AUTH_ABORTED)
        if state is None:
            return self._error(R.BAD_SEQUENCE)
        if state[0] == "PLAIN":
            return self._auth_plain(line.strip())
        decoded = self._b64(line.strip())
        if decoded is None:
            return self._auth_malformed()
        if state[0] == "LOGIN-USER":
            self._auth_state = ("LOGIN-PASS", decoded)
            return self._challenge(b"Password:")
        if state[0] == "LOGIN-PASS":
            return self._auth_check(state[1], decoded)
        if state[0] == "CRAM-MD5":
            user, _, digest = decoded.rpartition(b" ")
            return self._auth_cram(state[1], user, digest)

    def _auth_plain(self, encoded: bytes) -> None:
        decoded = self._b64(encoded)
        if decoded is None:
            return self._auth_malformed()
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return self._auth_malformed()
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            return self._auth_result(None)  # no proxy authorisation
        self._auth_check(authcid, password)

    def _auth_check(self, user: bytes, password: bytes) -> None:
        ctx = self.factory.context
        try:
            u, p = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return self._auth_result(None)
        # PBKDF2 is slow on purpose: keep it off the reactor thread.
        d = ctx.run_blocking(ctx.passwords.check_password, u, p)
        self._auth_finish(d)

    def _auth_finish(self, d: defer.Deferred) -> None:
        d.addCallbacks(self._auth_result, lambda f: self._auth_internal_error(f.value))
        self._wait(d)

    def _auth_cram(self, nonce: bytes, user: bytes, digest: bytes) -> None:
        """RFC 2195.  The HMAC is checked here; the canonical name then
        comes from C{check_password} with the plain-text secret (any
        IPasswordChecker has it), which also makes a CRAM-MD5 attempt cost
        what a PLAIN one does, known user or not."""
        ctx = self.factory.context
        try:
            name = user.decode("utf-8")
        except UnicodeDecodeError:
            return self._auth_result(None)
        secret = ctx.passwords.plaintext_password(name)
        ok = False
        if secret is not None:
            expected = hmac.new(secret.encode("utf-8"), nonce, "md5").hexdigest().encode("ascii")
            ok = hmac.compare_digest(expected, digest.lower())
        d = ctx.run_blocking(ctx.passwords.check_password, name, secret if ok else "")
        d.addCallback(lambda who: who if ok else None)
        self._auth_finish(d)

    def _auth_result(self, who) -> None:
        ctx = self.factory.context
        if who:
            self.session = replace(self.session, authenticated=who)
            log.info("AUTH ok: {who} from {ip}", who=who, ip=self.session.client_ip)
            return self._send(R.AUTH_OK)
        self._auth_failures += 1
        log.info("AUTH failed from {ip} ({n})", ip=self.session.client_ip, n=self._auth_failures)
        if self._auth_failures >= max(1, ctx.config.max_auth_failures):
            return self._close_with(R.TOO_MANY_ERRORS.with_text("Too many authentication failures, closing connection"))
        # Slow down guessing: answer after 1 s, 2 s, ...
        d = defer.Deferred()
        call = ctx.clock.callLater(float(self._auth_failures), d.callback, None)
        d.addCallback(lambda _: self.mode != CLOSED and self._send(R.AUTH_FAILED))
        self._auth_delay = call
        self._wait(d)

    # -- ETRN ------------------------------------------------------------------------
    def smtp_ETRN(self, arg: str) -> None:
        """RFC 1985: ``ETRN domain`` starts a queue run for that domain,
        ``ETRN @domain`` for it and its subdomains, ``ETRN #queue`` for the
        named queue (there is one: all of it).  After EHLO, outside a mail
        transaction (as Postfix).  Only trusted clients may ask: a run ends
        the queue's back-off, so an outsider could otherwise hammer the
        relay host and the disk (``458 4.5.0``, counted as junk)."""
        ctx = self.factory.context
        if ctx.queue is None:
            return self._error(R.NOT_IMPLEMENTED)
        if not self._helo_done:
            return self._error(R.NEED_EHLO)
        if self._mail_from is not None:
            return self._error(R.BAD_SEQUENCE)
        if self._junk_command():
            return
        if not ctx.trust.is_trusted(self.session):
            return self._send(R.ETRN_NOT_AVAILABLE)
        target = arg.strip()
        if target.startswith("#"):
            if len(target) < 2 or " " in target:
                return self._error(R.SYNTAX_ERROR)
            domain = None
        else:
            from mailguard.config.values import parse_hostname

            name = target[1:] if target.startswith("@") else target
            try:
                name = parse_hostname(name)
            except ValueError:
                return self._error(R.SYNTAX_ERROR)
            domain = ("@" if target.startswith("@") else "") + name
        ctx.queue.kick(domain)
        self._send(R.ETRN_STARTED)


def _normalise_ip(host: str) -> str:
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _header_safe(text: str) -> str:
    return "".join(c if 32 < ord(c) < 127 else "?" for c in text)[:255]
