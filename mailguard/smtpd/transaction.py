"""One mail transaction: its state from MAIL to the end of DATA, the
envelope the store is handed, and the trace headers written before the
message (pure functions of the session facts and the time).

The trace headers hold text the client chose (the HELO name, the envelope
addresses), so each is written in a form that cannot break them: a HELO
that is not a domain name or an address literal becomes a safe atom, and
an address goes in angle brackets only in its strict RFC 5321 form.
Whatever the client sends, the header is valid RFC 5322 (balanced
comments, printable ASCII, lines far below 998 octets).
"""

from __future__ import annotations

import ipaddress
import re
import time

from twisted.mail.smtp import rfc822date

from mailguard.policy.session import Session
from mailguard.store.envelope import Envelope

__all__ = ["Transaction", "envelope_of", "helo_token", "protocol_type", "trace_headers"]

HELO_MAX = 255  # RFC 5321 4.5.3.1.2: the longest domain name
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")  # no trailing dot: a dot-atom has none
_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-")
_DOTS = re.compile(r"\.{2,}")
_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])+"'
_PATH = re.compile(rf"(?:{_ATOMS}|{_QUOTED})@(?:{_LABEL}(?:\.{_LABEL})*|\[[A-Za-z0-9:.]+\])")


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
    return_path = f"Return-Path: <{_address(envelope.mail_from)}>\r\n".encode("ascii")
    rcpt = ""
    all_rcpts = envelope.mailboxes + envelope.relay_recipients
    if len(all_rcpts) == 1 and _address(all_rcpts[0]):
        rcpt = f"\r\n\tfor <{_address(all_rcpts[0])}>"
    helo = helo_token(facts.helo or "")
    date = rfc822date(time.localtime(now)).decode("ascii")
    received = (f"Received: from {helo} ([{facts.client_ip}])\r\n"
                f"\tby {hostname} with {protocol_type(facts)} id {envelope.message_id.split('.')[1]}"
                f"{rcpt};\r\n\t{date}\r\n")
    return return_path + received.encode("ascii", "replace")


def protocol_type(facts: Session) -> str:
    """RFC 3848 / the IANA "Mail Transmission Types": SMTP after HELO,
    ESMTP after EHLO, plus S for TLS and A for AUTH.  STARTTLS and AUTH
    are SMTP service extensions, so a session using either is ESMTP even
    if the client said HELO (there is no "SMTPS" type)."""
    tls, auth = facts.tls, bool(facts.authenticated)
    if not (facts.esmtp or tls or auth):
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")


def helo_token(helo: str) -> str:
    """The HELO name as it can stand in ``Received: from NAME``: as given
    when it is a domain name or an address literal (what RFC 5321 4.1.3
    allows there); otherwise a dot-atom of its characters, every one that
    could open a comment, a quoted string or a literal, or that is not
    printable ASCII, written ``?`` (as Postfix writes unprintable ones).
    At most 255 characters; ``unknown`` when nothing is left."""
    if len(helo) <= HELO_MAX and (_DOMAIN.fullmatch(helo) or _address_literal(helo)):
        return helo
    atom = "".join(c if c in _ATEXT or c == "." else "?" for c in helo[:HELO_MAX])
    return _DOTS.sub(".", atom).strip(".") or "unknown"


def _address_literal(text: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _address(address: str) -> str:
    """An envelope address for a trace header.  Addresses come from the
    strict parser of L{mailguard.policy.addresses} (printable ASCII, a
    quoted local part quoted and escaped), so this only guards: anything
    else is written as a dot-atom with ``?`` for each other character."""
    if not address or _PATH.fullmatch(address):
        return address
    local, _, domain = address.rpartition("@")
    return "@".join(_DOTS.sub(".", "".join(c if c in _ATEXT or c == "." else "?" for c in part)).strip(".")
                    or "?" for part in (local, domain))
