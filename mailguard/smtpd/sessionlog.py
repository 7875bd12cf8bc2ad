"""The session's log lines, as Postfix's maillog has them: every line of a
session carries its session id, every line about a message its queue id.

One event each (L{mailguard.logs.emit}; the field names are stable, and
documented in ``docs/operations.md``):

- ``connect``: session, ip, port, listener, greeting (``delayed``,
  ``cached``, ``exempt`` or ``off``) and the delay;
- ``reject``: every 4xx/5xx mailguard sends -- session, ip, command,
  code, status (the enhanced code), reason (the reply's text), the HELO
  name, the sender and the recipient when there are some, and the
  policy's own reason (``detail``) when it gave one;
- ``auth``: session, ip, mechanism, result (``ok``, ``failed``,
  ``error``), user (the name tried; never a password);
- ``accepted``: session, queue id, sender, recipients, size, TLS, the
  authenticated user, HELO;
- ``disconnect``: session, ip, duration, outcome (``greeted``,
  ``early-talker``, ``gave-up``, ``limit``), counts of commands,
  refusals and messages.

The state machine (L{mailguard.smtpd.session}) calls L{reject},
L{auth} and L{accepted}; the adapter (L{mailguard.smtpd.protocol})
L{connect}, L{turned_away} and L{disconnect}.
"""

from __future__ import annotations

import secrets
from itertools import count
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mailguard.logs import emit

if TYPE_CHECKING:
    from mailguard.policy.greeting import GreetingDecision
    from mailguard.policy.session import Session
    from mailguard.replies import Reply

__all__ = ["accepted", "auth", "connect", "disconnect", "greeting_kind", "new_session_id", "reject"]

log = Logger(namespace="mailguard.smtpd")

_PREFIX = secrets.token_hex(3)  # per process: ids stay unique across restarts
_ids = count(1)


def new_session_id() -> str:
    """12 hex digits (more after 16 million sessions): a per-process
    random prefix and a counter."""
    return f"{_PREFIX}{next(_ids):06x}"


def greeting_kind(decision: GreetingDecision) -> str:
    """``delayed``, ``cached`` (the pass cache), ``exempt`` (the
    exceptions IP group) or ``off`` (no delay here)."""
    if decision.delay > 0:
        return "delayed"
    reason = decision.reason
    if reason == "in the pass cache":
        return "cached"
    if reason == "in the exceptions IP group":
        return "exempt"
    return "off"


def connect(sid: str, facts: Session, decision: GreetingDecision | None) -> None:
    emit(log, "connect", {"session": sid, "ip": facts.client_ip, "port": facts.client_port,
                          "listener": facts.listener,
                          "greeting": greeting_kind(decision) if decision is not None else None,
                          "delay": decision.delay if decision is not None and decision.delay > 0 else None})


def reject(sid: str, facts: Session, command: str | None, reply: Reply, *, sender: str | None = None,
           rcpt: str | None = None, detail: str | None = None) -> None:
    emit(log, "reject", {"session": sid, "ip": facts.client_ip, "command": command, "code": reply.code,
                         "status": reply.status or None, "reason": reply.text, "helo": facts.helo,
                         "from": sender, "to": rcpt, "detail": detail})


def auth(sid: str, facts: Session, mechanism: str | None, result: str, user: str | None,
         failures: int | None = None) -> None:
    emit(log, "auth", {"session": sid, "ip": facts.client_ip, "mechanism": mechanism, "result": result,
                       "user": user, "failures": failures})


def accepted(sid: str, facts: Session, queue_id: str, envelope, size: int) -> None:
    emit(log, "accepted", {"session": sid, "ip": facts.client_ip, "queue": queue_id,
                           "from": envelope.mail_from, "to": envelope.mailboxes + envelope.relay_recipients,
                           "size": size, "tls": facts.tls, "user": facts.authenticated, "helo": facts.helo})


def disconnect(sid: str, facts: Session, duration: float, outcome: str, smtp=None) -> None:
    """C{smtp}: the session's state machine (its counts), None if it
    never had one (held, refused)."""
    counts = (smtp.commands, smtp.refusals, smtp.messages) if smtp is not None else (0, 0, 0)
    emit(log, "disconnect", {"session": sid, "ip": facts.client_ip, "duration": duration,
                             "outcome": outcome, "commands": counts[0], "refusals": counts[1],
                             "messages": counts[2]})
