"""The commands of the SMTP service extensions: STARTTLS (RFC 3207),
AUTH (RFC 4954) and ETRN (RFC 1985).

A mixin of L{mailguard.smtpd.session.ServerSession}, as ``twisted.mail``'s
ESMTP extends its SMTP: the same state, the same way out (replies through
C{_send}, refusals through C{_error}/C{_refuse}, waits as requests).
"""

from __future__ import annotations

import base64
from dataclasses import replace

from twisted.logger import Logger

from mailguard import replies as R
from mailguard.policy.addresses import parse_etrn_argument
from mailguard.policy.rules import auth_mechanisms, etrn_refusal
from mailguard.smtpd import events as E
from mailguard.smtpd import sasl, sessionlog
from mailguard.smtpd.events import AUTH, CLOSED, COMMAND

log = Logger()

# Failed AUTH attempts per session: the n-th is answered after n seconds,
# the last closes the session.  Not 3: smtplib and mail clients try every
# advertised mechanism with one wrong password before giving up.
AUTH_FAILURE_LIMIT = 5  # the default of SmtpMaxAuthFailures


class Extensions:
    """STARTTLS, AUTH and ETRN for a L{ServerSession}."""

    __slots__ = ()

    # -- STARTTLS -------------------------------------------------------------------------
    def smtp_STARTTLS(self, arg: str) -> None:
        if self.facts.tls:
            return self._error(R.TLS_ALREADY)
        if self.context.tls is None:
            return self._error(R.TLS_UNAVAILABLE)
        if arg:
            return self._error(R.SYNTAX_ERROR)
        discarded = self._discard_input()
        if discarded:
            # Plain text pipelined behind STARTTLS (the command injection
            # flaw, CVE-2011-0411 and its kin): never run it inside TLS.
            log.warn("discarded {n} bytes pipelined after STARTTLS session={session} ip={ip}", session=self.sid,
                     n=discarded, ip=self.facts.client_ip)
        self._send(R.READY_TLS)
        self._events.append(E.StartTLS())
        # RFC 3207 4.2: forget everything learnt before TLS; EHLO again.
        self.transaction = self._sasl = None
        self.facts = replace(self.facts, tls=True, helo=None, authenticated=None, esmtp=False)

    # -- AUTH -----------------------------------------------------------------------------
    def _mechanisms(self) -> list[str]:
        return auth_mechanisms(self.facts, self.context.passwords,
                               cram_md5=self.context.config.cram_md5_enabled)

    def smtp_AUTH(self, arg: str) -> None:
        if self.facts.helo is None:
            return self._error(R.NEED_EHLO)
        if self.facts.authenticated:
            return self._error(R.AUTH_ALREADY)
        if self.transaction is not None:
            return self._error(R.BAD_SEQUENCE)
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if not mech:
            return self._error(R.SYNTAX_ERROR)
        if mech in ("PLAIN", "LOGIN") and not self.facts.tls:
            return self._error(R.AUTH_NEEDS_TLS)
        if mech not in self._mechanisms():
            return self._error(R.AUTH_MECHANISM_UNKNOWN)
        ctx = self.context
        limited = ctx.limits.at_auth(self.facts, ctx.exempt)
        if limited is not None:  # locked out for failed AUTH: no password is checked
            return self._error(limited.reply)
        initial = initial.strip()
        self._mech, self._auth_user = mech, None
        self._sasl = sasl.start(mech, hostname=self.context.hostname,
                                now=self.context.clock.seconds(), token=self._token)
        self._auth_step(self._sasl.first(initial.encode("ascii", "replace") if initial else None))

    def _auth_response(self, line: bytes) -> None:
        self._auth_step(self._sasl.respond(line))

    def _guarded_auth(self, step, arg) -> None:
        """Run an AUTH step; an exception is logged by type only (its text
        or traceback could quote credentials) and answered 454 4.7.0."""
        try:
            step(arg)
        except Exception as e:
            log.error("internal error in AUTH: {exc} session={session}", exc=type(e).__name__, session=self.sid)
            self._auth_internal_error()

    def _auth_step(self, step) -> None:
        if isinstance(step, sasl.Challenge):
            self.mode = AUTH
            return self._send(R.Reply(334, "", base64.b64encode(step.data).decode("ascii")))
        self._sasl = None
        if step is sasl.ABORTED:
            self._send(R.AUTH_ABORTED)
        elif step is sasl.MALFORMED:
            self._error(R.SYNTAX_ERROR.with_text("Invalid base64 data"))
        elif step is sasl.DENIED:
            self._auth_result(None)
        else:
            self._auth_user = step.username
            self._request(E.CheckCredentials(step))

    def _auth_result(self, who: str | None) -> None:
        ctx = self.context
        withheld = ctx.limits.at_auth(self.facts, ctx.exempt)
        if withheld is not None:
            # Parallel guesses from the address locked it out while this one
            # was checked: its answer is withheld, so no more than
            # SmtpMaxAuthFailuresPerIp guesses are ever answered per window.
            return self._error(withheld.reply)
        stats = ctx.stats.auth
        if who:
            self.facts = replace(self.facts, authenticated=who)
            stats["success"] += 1
            sessionlog.auth(self.sid, self.facts, self._mech, "ok", who)
            return self._send(R.AUTH_OK)
        self.auth_failures += 1
        stats["failure"] += 1
        sessionlog.auth(self.sid, self.facts, self._mech, "failed", self._auth_user, self.auth_failures)
        fields = {"mechanism": self._mech or "", "user": self._auth_user or ""}  # never the password
        self._report("auth-failed", fields)
        limited = ctx.limits.auth_failed(self.facts, ctx.config, ctx.exempt)
        if limited is not None:  # this failure began a lock-out
            self._report(limited.event, {**limited.fields, **fields})
        if self.auth_failures >= max(1, self.context.config.max_auth_failures):
            return self.close(R.TOO_MANY_ERRORS.with_text("Too many authentication failures, closing connection"))
        self._request(E.AuthFailureDelay(float(self.auth_failures)))  # 1 s, 2 s, ...

    def _auth_internal_error(self) -> None:
        """Answer 454 4.7.0 (RFC 4954 6); the cause was logged by type only."""
        self._sasl = None
        self.context.stats.auth["error"] += 1
        sessionlog.auth(self.sid, self.facts, self._mech, "error", self._auth_user)
        if self.mode is not CLOSED:
            self.mode = COMMAND
            self._send(R.AUTH_TEMPORARY)

    # -- ETRN -----------------------------------------------------------------------------
    def smtp_ETRN(self, arg: str) -> None:
        """RFC 1985: ``ETRN domain`` starts a queue run for that domain,
        ``ETRN @domain`` for it and its subdomains, ``ETRN #queue`` for the
        named queue (there is one: all of it).  After EHLO, outside a mail
        transaction (as Postfix), counted as junk, trusted clients only."""
        if self.context.queue is None:
            return self._error(R.NOT_IMPLEMENTED)
        if self.facts.helo is None:
            return self._error(R.NEED_EHLO)
        if self.transaction is not None:
            return self._error(R.BAD_SEQUENCE)
        if self._junk_command():
            return
        refusal = etrn_refusal(self.facts, self.context.trust)
        if refusal is not None:
            return self._refuse(refusal)
        try:
            domain = parse_etrn_argument(arg)
        except ValueError:
            return self._error(R.SYNTAX_ERROR)
        self._request(E.KickQueue(domain))

