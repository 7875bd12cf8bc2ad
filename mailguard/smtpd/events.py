"""What the SMTP state machine hands its adapter: small frozen values.

Three kinds, in the manner of h11:

- signals (L{NEED_DATA}, L{PAUSED}, L{CLOSED}): nothing to do until more
  bytes arrive, until the outstanding request is answered, or ever;
- notices (L{Write}, L{WriteMessage}, L{StartTLS}, L{AbortMessage},
  L{Close}, L{SecurityEvent}): do this, no answer expected;
- requests (every L{Request}): do this and hand the result back with
  C{session.answer(value)} or C{session.failed()}; the session is
  L{PAUSED} meanwhile, so pipelined commands wait their turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailguard.smtpd.framing import Marker

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mailguard.policy.addresses import Mailbox
    from mailguard.policy.session import Session
    from mailguard.smtpd.sasl import CramMD5Credentials, PlainCredentials
    from mailguard.store.envelope import Envelope


class Signal(Marker):
    __slots__ = ()


# The session's modes (C{session.mode}), compared by identity.
COMMAND, AUTH, DATA, CLOSED = "COMMAND", "AUTH", "DATA", "CLOSED"

NEED_DATA = Signal("NEED_DATA")
PAUSED = Signal("PAUSED")
CLOSED = Signal("CLOSED")


# --- notices ------------------------------------------------------------------


@dataclass(slots=True)
class Write:
    """Bytes for the client: one or more replies (a pipelined group's).
    Not frozen: one is made per reply, and a frozen dataclass costs twice
    as much to make."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start TLS now (the ``220`` went out just before)."""


@dataclass(slots=True)
class WriteMessage:
    """Append message bytes.  If that fails, say C{session.message_failed()}
    before pulling the next event.  Not frozen, as L{Write}."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AbortMessage:
    """Discard the message being received."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once what was written has been sent."""


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """Write a line to the security log: C{event} (``auth-failed``,
    ``auth-lockout``, ``error-limit``...) for this client, with C{fields}
    (name -> value; the log escapes them)."""

    event: str
    fields: dict


# --- requests -----------------------------------------------------------------


class Request:
    """Answer with C{session.answer(value)} or C{session.failed()}."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class CheckRecipient(Request):
    """Answer: the L{mailguard.policy.decide.RecipientVerdict}.  The RCPT
    parameters ride along, to be kept with an accepted recipient."""

    session: Session
    mailbox: Mailbox
    params: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AnswerVrfy(Request):
    """Answer: the L{mailguard.replies.Reply} the VRFY policy gives."""

    session: Session
    argument: str


@dataclass(frozen=True, slots=True)
class CheckCredentials(Request):
    """Answer: the canonical user the credentials prove, or None.  A
    failure is logged by type only: its text could quote a password."""

    credentials: PlainCredentials | CramMD5Credentials = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthFailureDelay(Request):
    """Answer (None) after C{seconds}: a failed AUTH is answered slowly."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Delay(Request):
    """Answer (None) after C{seconds}: past ``SmtpSoftErrorLimit`` errors the
    next command is read only then."""

    seconds: float


@dataclass(frozen=True, slots=True)
class BeginMessage(Request):
    """Open the message for C{envelope} and write C{header} (the trace
    headers) first.  Answer: None."""

    envelope: Envelope
    header: bytes




@dataclass(frozen=True, slots=True)
class CommitMessage(Request):
    """Store the message durably (fsynced) before answering None."""

    envelope: Envelope


@dataclass(frozen=True, slots=True)
class KickQueue(Request):
    """ETRN: start a queue run for C{domain} (``@domain``: with its
    subdomains; None: the whole queue).  Answer: anything, once started."""

    domain: str | None
