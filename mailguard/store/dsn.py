"""Delivery Status Notifications: the SMTP DSN extension (RFC 3461) and the
reports mailguard writes (RFC 3464 ``multipart/report``).

Pure functions and values: parameters are checked and decoded here, and a
report is built here from plain data; nothing touches a reactor or the
disk (the queue reads the original message and hands its bytes in).

Parameters (RFC 3461 section 4):

- ``MAIL ... RET=FULL|HDRS`` -- return the whole message or its headers only;
- ``MAIL ... ENVID=xtext`` -- the sender's id for the transaction, copied
  into every report as ``Original-Envelope-Id`` (decoded);
- ``RCPT ... NOTIFY=NEVER`` or a list of ``SUCCESS``, ``FAILURE``,
  ``DELAY`` -- which reports the sender wants for that recipient.  Without
  NOTIFY, a failure is reported (RFC 3461 4.1: "FAILURE" or
  "FAILURE,DELAY" is the default);
- ``RCPT ... ORCPT=addr-type;xtext`` -- the original recipient, copied into
  the report as ``Original-Recipient`` (decoded).

mailguard honours SUCCESS (a ``delivered``/``expanded`` report for local
mailboxes, a ``relayed`` report when the next hop does not speak DSN) and
FAILURE; it accepts DELAY but sends no delay warnings (RFC 3461 leaves them
to the MTA's choice).
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "MAIL_PARAMETERS",
    "RCPT_PARAMETERS",
    "RecipientReport",
    "check_mail_parameter",
    "check_rcpt_parameter",
    "xtext_decode",
    "xtext_encode",
    "parse_notify",
    "wants",
    "build_report",
    "headers_of",
    "mta_name",
    "without_return_path",
]

MAIL_PARAMETERS = frozenset({"RET", "ENVID"})
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})

ENVID_MAX = 100  # RFC 3461 4.4
ORCPT_MAX = 500  # RFC 3461 4.2
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


# --- xtext (RFC 3461 section 4) ----------------------------------------------

def xtext_decode(text: str) -> str:
    """Decode C{xtext}; raise ValueError if C{text} is not xtext."""
    if not _XTEXT.fullmatch(text):
        raise ValueError(f"not xtext: {text!r}")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """Encode printable ASCII as xtext (``+``, ``=`` and anything outside
    ``!``..``~`` as ``+HH``)."""
    out = []
    for ch in text:
        o = ord(ch)
        if 0x21 <= o <= 0x7E and ch not in "+=":
            out.append(ch)
        else:
            out.append("+%02X" % (o & 0xFF))
    return "".join(out)


# --- parameter checks (the protocol asks these) ----------------------------------

def check_mail_parameter(key: str, value: str | None) -> str | None:
    """None if C{key=value} is a good DSN MAIL parameter, else why not."""
    if key == "RET":
        if value is None or value.upper() not in ("FULL", "HDRS"):
            return "RET must be FULL or HDRS"
        return None
    if key == "ENVID":
        if not value or len(value) > ENVID_MAX:
            return f"ENVID must be 1 to {ENVID_MAX} characters of xtext"
        try:
            xtext_decode(value)
        except ValueError:
            return "ENVID must be xtext"
        return None
    return f"Unsupported MAIL parameter {key}"


def check_rcpt_parameter(key: str, value: str | None) -> str | None:
    """None if C{key=value} is a good DSN RCPT parameter, else why not."""
    if key == "NOTIFY":
        if value is None:
            return "NOTIFY requires a value"
        try:
            parse_notify(value)
        except ValueError as e:
            return str(e)
        return None
    if key == "ORCPT":
        if not value or len(value) > ORCPT_MAX:
            return "ORCPT must be addr-type;xtext"
        addr_type, sep, rest = value.partition(";")
        if not sep or not _ATOM.fullmatch(addr_type) or not rest:
            return "ORCPT must be addr-type;xtext"
        try:
            xtext_decode(rest)
        except ValueError:
            return "ORCPT must be addr-type;xtext"
        return None
    return f"Unsupported RCPT parameter {key}"


def parse_notify(value: str | None) -> tuple[str, ...] | None:
    """``NEVER`` -> ``()``; ``SUCCESS,FAILURE`` -> ``("SUCCESS", "FAILURE")``;
    None (not given) -> None.  Raise ValueError for anything else."""
    if value is None:
        return None
    items = [v.strip().upper() for v in value.split(",")]
    if items == ["NEVER"]:
        return ()
    if not items or any(v not in NOTIFY_VALUES for v in items) or len(set(items)) != len(items):
        raise ValueError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return tuple(items)


def wants(notify: tuple[str, ...] | list[str] | None, what: str) -> bool:
    """Does a recipient with C{notify} (see L{parse_notify}) want a C{what}
    ("SUCCESS", "FAILURE", "DELAY") report?  Without NOTIFY: failures only."""
    if notify is None:
        return what == "FAILURE"
    return what in notify


# --- reports (RFC 3464) ----------------------------------------------------------

@dataclass(frozen=True)
class RecipientReport:
    """One per-recipient block of a delivery-status report."""

    final_recipient: str
    action: str  # "failed", "delivered", "relayed", "expanded", "delayed"
    status: str  # "5.1.1", "2.0.0", ...
    original_recipient: str | None = None  # the raw ORCPT value: "rfc822;xtext"
    diagnostic: str | None = None  # "smtp; 550 5.1.1 User unknown"
    remote_mta: str | None = None
    last_attempt: float | None = None


def headers_of(message: bytes) -> bytes:
    """The header section of C{message} (CRLF lines), without the blank line."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message if message.endswith(b"\r\n") else message + b"\r\n"
    return message[: end + 2]


def without_return_path(message: bytes) -> bytes:
    """C{message} without a leading ``Return-Path:`` field (and its folded
    lines): mailguard's own trace of final delivery, which a returned
    message must not carry (the report itself is the final delivery)."""
    if message[:12].lower() != b"return-path:":
        return message
    end = message.find(b"\n") + 1
    while end and message[end:end + 1] in (b" ", b"\t"):
        end = message.find(b"\n", end) + 1
    return message[end:] if end else b""


def mta_name(host: str) -> str:
    """A ``Remote-MTA`` value (RFC 3464 2.3.5: ``mta-name-type; mta-name``).
    The ``dns`` type takes a domain name, so a next hop given by address
    is written as an RFC 5321 address literal: ``dns; [192.0.2.1]``,
    ``dns; [IPv6:2001:db8::1]`` (as Sendmail writes it; Postfix writes the
    bare address)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"dns; {_safe(host)}"
    return f"dns; [{ip}]" if ip.version == 4 else f"dns; [IPv6:{ip.compressed}]"


def _safe(text: str, limit: int = 900) -> str:
    """One header-safe line of printable ASCII."""
    text = " ".join(text.split())
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


def _date(t: float) -> str:
    return email.utils.formatdate(t, localtime=True)


def _original_recipient(raw: str) -> str | None:
    addr_type, _, xtext = raw.partition(";")
    try:
        return f"{addr_type.strip()};{_safe(xtext_decode(xtext.strip()))}"
    except ValueError:
        return None


_EXPLAIN = {
    "failed": "could not be delivered",
    "delivered": "was delivered",
    "expanded": "was delivered (the address is an alias)",
    "relayed": "was relayed to a system that sends no further notifications",
    "delayed": "has not been delivered yet; delivery will be retried",
}


def build_report(*, hostname: str, to: str, recipients: list[RecipientReport],
                 original: bytes, headers_only: bool, now: float, message_id: str,
                 envid: str | None = None, arrival: float | None = None) -> bytes:
    """An RFC 3464 report (``multipart/report; report-type=delivery-status``)
    to C{to}, about C{recipients}, returning C{original} (the whole message,
    or with C{headers_only} its header section: RET=HDRS) in the third part.

    @param envid: the raw ENVID (xtext) of the original transaction.
    @param original: the message as stored; its leading ``Return-Path``
        (mailguard's own) is left out (L{without_return_path}).
    @param message_id: unique, used for the Message-ID and the MIME boundary.
    @return: the message as CRLF-terminated lines (each at most 998 octets
        except lines of C{original}, which arrived under the same limit).
    """
    failed = any(r.action == "failed" for r in recipients)
    subject = ("Undelivered Mail Returned to Sender" if failed
               else "Successful Mail Delivery Report")
    boundary = f"{message_id.replace('@', '.')}/{hostname}"
    original = without_return_path(original)
    returned = headers_of(original) if headers_only else original
    eight_bit = any(b > 127 for b in returned)

    text = [
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if failed:
        text += ["I'm sorry to have to inform you that your message could not",
                 "be delivered to one or more recipients. It's attached below.", ""]
    else:
        text += ["Your message was successfully delivered to the destination(s)",
                 "listed below.", ""]
    for r in recipients:
        text.append(f"<{_safe(r.final_recipient)}>: your message {_EXPLAIN.get(r.action, r.action)}")
        if r.diagnostic:
            text.append(f"    {_safe(r.diagnostic, 700)}")
    text.append("")

    status = [f"Reporting-MTA: dns; {hostname}"]
    if envid:
        try:
            status.append(f"Original-Envelope-Id: {_safe(xtext_decode(envid))}")
        except ValueError:
            pass
    if arrival is not None:
        status.append(f"Arrival-Date: {_date(arrival)}")
    for r in recipients:
        status.append("")
        if r.original_recipient:
            orig = _original_recipient(r.original_recipient)
            if orig:
                status.append(f"Original-Recipient: {orig}")
        status.append(f"Final-Recipient: rfc822; {_safe(r.final_recipient)}")
        status.append(f"Action: {r.action}")
        status.append(f"Status: {r.status}")
        if r.remote_mta:
            status.append(f"Remote-MTA: {mta_name(r.remote_mta)}")
        if r.diagnostic:
            status.append(f"Diagnostic-Code: {_safe(r.diagnostic)}")
        if r.last_attempt is not None:
            status.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{_safe(to)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{message_id}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if eight_bit:
        head.append("Content-Transfer-Encoding: 8bit")
    lines = head + [
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *text,
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        *status,
        "",
        f"--{boundary}",
    ]
    if headers_only:
        lines += ["Content-Description: Undelivered Message Headers"
                  if failed else "Content-Description: Message Headers",
                  "Content-Type: text/rfc822-headers"]
    else:
        lines += ["Content-Description: Undelivered Message" if failed
                  else "Content-Description: Delivered Message",
                  "Content-Type: message/rfc822"]
    if eight_bit:
        lines.append("Content-Transfer-Encoding: 8bit")
    lines.append("")
    out = "\r\n".join(lines).encode("ascii", "replace") + b"\r\n"
    out += returned
    if not returned.endswith(b"\r\n"):
        out += b"\r\n"
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return out
