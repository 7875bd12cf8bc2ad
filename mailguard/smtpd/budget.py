"""The session's budgets: a mixin of L{mailguard.smtpd.session.ServerSession}.

Client errors (unknown commands, syntax and sequence errors, refused
recipients, junk commands past L{JUNK_COMMAND_LIMIT}) count against
``SmtpMaxErrors`` -- as Postfix's ``smtpd_hard_error_limit``, forgiven
once a message is delivered -- and against the client address's
``SmtpMaxErrorsPerIp`` over all its sessions
(L{mailguard.policy.budgets.ClientLimits}); past ``SmtpSoftErrorLimit``
each command is read ``SmtpErrorSleepTime`` late (the session's C{_step}).
The per-address limits the commands ask (messages per minute, the
sender an authenticated user may use) and the recipient overshoot are
here too.  The same state and way out as the session: replies through
C{_send}, closes through C{close}, security-log lines as
L{E.SecurityEvent} notices.
"""

from __future__ import annotations

from mailguard import replies as R
from mailguard.policy.rules import Refusal, sender_login_refusal
from mailguard.smtpd import events as E

__all__ = ["JUNK_COMMAND_LIMIT", "Budgets"]

JUNK_COMMAND_LIMIT = 100  # NOOP/RSET/HELP/EXPN/ETRN before each counts as an error (Postfix smtpd_junk_command_limit)


class Budgets:
    """Counting a session's errors, what comes of too many, and the
    limits a command meets."""

    __slots__ = ()

    def _error(self, reply: R.Reply) -> None:
        """A client error: answer it, and close after too many."""
        if not self._count_error():
            self._send(reply)

    def _count_error(self) -> bool:
        """One more client error; past ``SmtpMaxErrors``, or past the
        address's ``SmtpMaxErrorsPerIp`` over its recent sessions, the
        session is closed (True).  Past ``SmtpSoftErrorLimit`` each
        command is read only after ``SmtpErrorSleepTime`` (L{_step})."""
        self.errors += 1
        ctx = self.context
        limited = ctx.limits.error(self.facts, ctx.config, ctx.exempt)
        if limited is not None:
            self._report(limited.event, limited.fields)
            self.close(limited.reply)
            return True
        if self.errors > ctx.config.max_errors:
            self.close(R.TOO_MANY_ERRORS)
            return True
        return False

    def _sleep(self) -> bool:
        """Past ``SmtpSoftErrorLimit`` errors (without mail delivered since),
        sleep before reading the next command (Postfix's
        ``smtpd_error_sleep_time``): the replies so far go out, then a
        L{E.Delay}.  True if so."""
        config = self.context.config
        if self.errors <= config.soft_error_limit or config.error_sleep_time <= 0:
            return False
        self._flush()
        self._request(E.Delay(config.error_sleep_time))
        return True

    def _message_limited(self) -> bool:
        """MAIL past ``SmtpMessageRateLimit`` from the address: logged, and
        ``421 4.7.0`` closes the session (True)."""
        ctx = self.context
        limited = ctx.limits.at_mail(self.facts, ctx.config, ctx.exempt)
        if limited is None:
            return False
        self._report(limited.event, limited.fields)
        self.close(limited.reply)
        return True

    def _sender_login_refusal(self, sender) -> Refusal | None:
        """An authenticated user's MAIL FROM (a L{Mailbox} or None for
        ``<>``): theirs, or ``553 5.7.1`` (``SmtpSenderLoginMatch``)."""
        ctx = self.context
        return sender_login_refusal(self.facts, sender.address if sender is not None else None,
                                    enabled=ctx.config.sender_login_match, directory=ctx.policies.directory,
                                    trust=ctx.trust)

    def _too_many_recipients(self, transaction) -> None:
        """RCPT past ``SmtpMaxRecipients``: ``452 4.5.3``; as Postfix, past
        ``SmtpRecipientOvershootLimit`` more each also counts as an error."""
        transaction.overshoot += 1
        if transaction.overshoot > self.context.config.recipient_overshoot_limit:
            return self._error(R.TOO_MANY_RECIPIENTS)
        self._send(R.TOO_MANY_RECIPIENTS)

    def _report(self, event: str, fields: dict) -> None:
        """A line for the security log."""
        self._events.append(E.SecurityEvent(event, fields))

    def _junk_command(self) -> bool:
        """NOOP, RSET, HELP, EXPN, ETRN: free up to L{JUNK_COMMAND_LIMIT} per
        session, then each counts as an error.  True if that closed it."""
        self.junk += 1
        return self.junk > JUNK_COMMAND_LIMIT and self._count_error()
