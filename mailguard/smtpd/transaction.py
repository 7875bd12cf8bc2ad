"""One mail transaction: its state from MAIL to the end of DATA, the
envelope the store is handed, and the trace headers written before the
message (pure functions of the session facts and the time)."""

from __future__ import annotations

import time

from twisted.mail.smtp import rfc822date

from mailguard.policy.session import Session
from mailguard.store.envelope import Envelope

__all__ = ["Transaction", "envelope_of", "protocol_type", "trace_headers"]


class Transaction:
    """From MAIL to the end of DATA (or RSET, HELO, STARTTLS)."""

    __slots__ = ("mail_from", "params", "recipients", "attempts", "overshoot")

    def __init__(self, mail_from: str, params: dict) -> None:
        self.mail_from = mail_from
        self.params = params
        self.recipients: list = []  # (RecipientVerdict, RCPT parameters) of each accepted RCPT
        self.attempts = 0  # RCPT commands checked, accepted or not (RFC 2920 3.1)
        self.overshoot = 0  # RCPT commands refused past SmtpMaxRecipients


def envelope_of(transaction: Transaction, facts: Session) -> Envelope:
    """What the store is handed at DATA: the local mailboxes and the relay
    recipients of every accepted RCPT (each once, in order), with their
    parameters (DSN)."""
    mailboxes: list[str] = []
    relay: list[str] = []
    rcpt_params = {}
    for verdict, params in transaction.recipients:
        mailboxes.extend(verdict.mailboxes)
        relay.extend(verdict.relay_to)
        rcpt_params[verdict.address] = params
    return Envelope(
        mail_from=transaction.mail_from,
        mailboxes=tuple(dict.fromkeys(mailboxes)),
        relay_recipients=tuple(dict.fromkeys(relay)),
        mail_params=transaction.params,
        rcpt_params=rcpt_params,
        client_ip=facts.client_ip,
        helo=facts.helo or "",
    )


def trace_headers(envelope: Envelope, facts: Session, hostname: str, now: float) -> bytes:
    """``Return-Path`` and ``Received`` (RFC 5321 4.4).

    Final delivery records the envelope sender; the stored file is shared
    by every destination, so it is written once, and the relay queue
    leaves it out when it forwards (a relaying MTA must not send it on).
    The Received header names no software and no version (STYLE: leaks)."""
    return_path = b"Return-Path: <" + envelope.mail_from.encode("utf-8", "replace") + b">\r\n"
    rcpt = ""
    all_rcpts = envelope.mailboxes + envelope.relay_recipients
    if len(all_rcpts) == 1:
        rcpt = f"\r\n\tfor <{all_rcpts[0]}>"
    helo = _header_safe(facts.helo or "unknown")
    date = rfc822date(time.localtime(now)).decode("ascii")
    received = (f"Received: from {helo} ([{facts.client_ip}])\r\n"
                f"\tby {hostname} with {protocol_type(facts)} id {envelope.message_id.split('.')[1]}"
                f"{rcpt};\r\n\t{date}\r\n")
    return return_path + received.encode("utf-8", "replace")


def protocol_type(facts: Session) -> str:
    """RFC 3848 / the IANA "Mail Transmission Types": SMTP after HELO,
    ESMTP after EHLO, plus S for TLS and A for AUTH.  STARTTLS and AUTH
    are SMTP service extensions, so a session using either is ESMTP even
    if the client said HELO (there is no "SMTPS" type)."""
    tls, auth = facts.tls, bool(facts.authenticated)
    if not (facts.esmtp or tls or auth):
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")


def _header_safe(text: str) -> str:
    return "".join(c if 32 < ord(c) < 127 else "?" for c in text)[:255]
