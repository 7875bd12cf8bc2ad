"""The envelope: what the SMTP session hands the store at DATA, and what a
DSN mailguard writes travels with.

A leaf module, so that the Maildir store, the relay queue and the DSN
notices can all speak of envelopes without importing one another.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from itertools import count

__all__ = ["Envelope", "new_message_id", "queue_id"]

_counter = count()
_HOST = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"


def new_message_id() -> str:
    """A unique, sortable id (also the Maildir file name's unique part)."""
    t = time.time()
    return f"{int(t)}.M{int((t % 1) * 1e6):06d}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def queue_id(message_id: str) -> str:
    """The short id of a message: the ``queued as`` of its ``250``, and the
    ``queue=`` of its log lines (``M123456P789Q4``)."""
    parts = message_id.split(".")
    return parts[1] if len(parts) > 2 else message_id


@dataclass
class Envelope:
    """What the protocol hands the store at DATA."""

    mail_from: str  # "" for the null sender
    mailboxes: tuple[str, ...]  # local accounts "user@domain"
    relay_recipients: tuple[str, ...] = ()  # non-local addresses (queue)
    mail_params: dict = field(default_factory=dict)
    rcpt_params: dict = field(default_factory=dict)  # address -> params
    client_ip: str = ""
    helo: str = ""
    message_id: str = field(default_factory=new_message_id)
