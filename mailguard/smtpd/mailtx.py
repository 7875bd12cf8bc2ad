"""The mail transaction of RFC 5321: MAIL, RCPT and DATA, to the stored
message's ``250``.

A mixin of L{mailguard.smtpd.session.ServerSession}, like
L{mailguard.smtpd.extensions.Extensions}: the same state, the same ways
out (replies through C{_send}, refusals through C{_error}/C{_refuse},
waits as requests: L{CheckRecipient}, L{BeginMessage}, L{CommitMessage}).
DATA arrives through the session's L{mailguard.smtpd.framing.DataReader};
its events come here (C{_data_event}).
"""

from __future__ import annotations

from mailguard import replies as R
from mailguard.policy.addresses import AddressError, parse_mail_from, parse_rcpt_to
from mailguard.policy.rules import (counts_as_error, hops_refusal, mail_parameters, mail_refusal,
                                    rcpt_parameters)
from mailguard.smtpd import events as E
from mailguard.smtpd import framing as F
from mailguard.smtpd import sessionlog
from mailguard.smtpd.events import COMMAND, DATA
from mailguard.smtpd.hops import ReceivedCounter
from mailguard.smtpd.transaction import Transaction, envelope_of, trace_headers
from mailguard.store.dsn import check_mail_parameter, check_rcpt_parameter

_DATA_FAILURES = {F.MESSAGE_TOO_BIG: R.MESSAGE_TOO_BIG, F.NUL_CHARACTER: R.NUL_IN_DATA}


class MailTransaction:
    """MAIL, RCPT and DATA for a L{ServerSession}."""

    __slots__ = ()

    def smtp_MAIL(self, arg: str) -> None:
        if self.facts.helo is None:
            return self._error(R.NEED_EHLO)
        if self.transaction is not None:
            return self._error(R.NESTED_MAIL)
        refusal = mail_refusal(self.facts)
        if refusal is not None:
            return self._refuse(refusal)
        if self._message_limited():
            return
        try:
            sender, params = parse_mail_from(arg)
        except AddressError as e:
            return self._error(e.reply)
        config = self.context.config
        refusal = mail_parameters(params, max_size=config.max_message_size,
                                  dsn=check_mail_parameter if self.context.dsn else None)
        if refusal is None and self.facts.authenticated:
            refusal = self._sender_login_refusal(sender)
        if refusal is not None:
            return self._refuse(refusal)
        self.transaction = Transaction(sender.address if sender is not None else "", params)
        self._send(R.SENDER_OK)

    def smtp_RCPT(self, arg: str) -> None:
        transaction = self.transaction
        if transaction is None:
            return self._error(R.NEED_MAIL)
        domains = self.context.config.domains  # RFC 5321 4.5.1: <Postmaster> is ours
        try:
            mailbox, params = parse_rcpt_to(arg, postmaster_domain=domains[0].name if domains else None)
        except AddressError as e:
            return self._error(e.reply)
        self._rcpt = mailbox.address
        refusal = rcpt_parameters(params, dsn=check_rcpt_parameter if self.context.dsn else None)
        if refusal is not None:
            return self._refuse(refusal)
        if len(transaction.recipients) >= self.context.config.max_recipients:
            return self._too_many_recipients(transaction)
        transaction.attempts += 1
        self._request(E.CheckRecipient(self.facts, mailbox, params))

    def _recipient_decided(self, request: E.CheckRecipient, verdict) -> None:
        if verdict.accepted:
            if self.transaction is not None:
                self.transaction.recipients.append((verdict, request.params))
        else:
            self._detail = verdict.reason
            if counts_as_error(verdict.reply):  # harvesting: unknown users, relay attempts
                return self._error(verdict.reply)
        self._send(verdict.reply)

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            return self._error(R.SYNTAX_ERROR)
        transaction = self.transaction
        if transaction is None:
            return self._error(R.NEED_MAIL_BEFORE_DATA)
        if not transaction.recipients:
            # RFC 2920 3.1: after pipelined RCPTs that all failed, 554.
            return self._error(R.NO_VALID_RECIPIENTS if transaction.attempts else R.NEED_RCPT)
        envelope = envelope_of(transaction, self.facts)
        header = trace_headers(envelope, self.facts, self.context.hostname, self.context.clock.seconds())
        self._request(E.BeginMessage(envelope, header))

    def _data_begun(self, envelope) -> None:
        self._envelope = envelope
        self._data = F.DataReader(self.context.config.max_message_size)
        self._hops = ReceivedCounter()
        self._data_failed = None
        self.mode = DATA
        self._send(R.START_DATA)

    def _data_event(self, event) -> None:
        if type(event) is bytes:
            if self._hops.in_header and self._loop(event):
                return
            return self._events.append(E.WriteMessage(event))
        if event is F.END_OF_DATA:
            self.progress += 1
            return self._data_end()
        if event is F.BARE_LINE_ENDING:
            # SMTP smuggling defence (Postfix smtpd_forbid_bare_newline): a
            # bare CR or LF in DATA is refused and the session closed, so
            # nothing after it is read as commands or as the end of DATA
            # (the reject line says so).
            self._events.append(E.AbortMessage())
            return self.close(R.BARE_LINE_ENDING)
        self._data_fail(_DATA_FAILURES[event])

    def _loop(self, data: bytes) -> bool:
        """Count the Received fields in C{data} (the header section only):
        True if the message is in a mail loop, and so failed."""
        hops = self._hops
        hops.feed(data)
        refusal = hops_refusal(hops.count, self.context.config.hop_count_limit)
        if refusal is None:
            return False
        # The reply goes at the final dot; its ``reject`` line says why.
        self._detail = (f"mail loop: at least {hops.count} Received header fields "
                        f"(SmtpHopCountLimit {self.context.config.hop_count_limit})")
        self._data_fail(refusal.reply)
        return True

    def _data_fail(self, reply: R.Reply) -> None:
        """The message fails: read on to the final dot, answer then."""
        if self._data_failed is None:
            self._data_failed = reply
            self._data.fail(reply)
            self._events.append(E.AbortMessage())

    def _data_end(self) -> None:
        failed, envelope = self._data_failed, self._envelope
        self.mode = COMMAND
        self._size = self._data.size
        self._data = self._data_failed = self._envelope = None
        if failed is not None:
            self._send(failed)  # logged with the transaction's sender
            self.transaction = None
            return
        self.transaction = None
        self._request(E.CommitMessage(envelope))

    def _stored(self, envelope) -> None:
        queued = envelope.message_id.split(".")[1]
        size = self._size
        self.messages += 1
        stats = self.context.stats
        stats.messages_accepted += 1
        stats.bytes_accepted += size
        sessionlog.accepted(self.sid, self.facts, queued, envelope, size)
        # The store has handed relayed recipients to the queue, which tries
        # them at once (no kick: that would end every entry's back-off too).
        self.errors = self.junk = 0  # as Postfix: the limits count errors "without delivering mail"
        self._send(R.MESSAGE_ACCEPTED.with_text(f"Ok: queued as {queued}"))
