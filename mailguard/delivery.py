"""Durable acceptance: a ``250`` after the final dot means the message is on
disk, fsynced, in every destination.

A message is written once, as it arrives, to ``SPOOL/incoming/``.  At the
final dot it is fsynced, then hard-linked into the ``new/`` directory of each
recipient's Maildir (and, for relayed recipients, into the relay queue by
``mailguard.queue``).  A link appears atomically and complete, so no reader
ever sees half a message, and one copy on disk serves every local recipient.
The ``new/`` directories are fsynced before the ``250`` is sent; only then is
the incoming file unlinked.  After a crash, ``incoming/`` holds only messages
that never got their ``250``; ``MaildirStore.recover()`` removes them.

Layout::

    SPOOL/incoming/<id>                 being received
    SPOOL/mail/<domain>/<user>/Maildir/{tmp,new,cur}/
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from itertools import count

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailguard.interfaces import IIncomingMessage, IMessageStore

log = Logger()

_counter = count()
_HOST = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"


def new_message_id() -> str:
    """A unique, sortable id (also the Maildir file name's unique part)."""
    t = time.time()
    return f"{int(t)}.M{int((t % 1) * 1e6):06d}P{os.getpid()}Q{next(_counter)}.{_HOST}"


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


def maildir_path(spool: str, mailbox: str) -> str:
    local, _, domain = mailbox.rpartition("@")
    safe = lambda s: s.replace("/", "_").replace("\0", "_") or "_"  # noqa: E731
    if local in (".", ".."):
        local = "_" + local
    return os.path.join(spool, "mail", safe(domain), safe(local), "Maildir")


def ensure_maildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_in_thread(reactor):
    """A runner that moves blocking disk work off the reactor thread."""
    from twisted.internet.threads import deferToThreadPool

    def run(f, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def run_inline(f, *args):
    """A runner for tests: the blocking work runs at once."""
    return defer.maybeDeferred(f, *args)


@implementer(IIncomingMessage)
class IncomingMessage:
    def __init__(self, store: "MaildirStore", envelope: Envelope) -> None:
        self.store = store
        self.envelope = envelope
        self.path = os.path.join(store.incoming, envelope.message_id)
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def commit(self):
        fd, self.fd = self.fd, None
        return self.store.run(self.store.commit_file, fd, self.path, self.envelope)

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


@implementer(IMessageStore)
class MaildirStore:
    def __init__(self, spool: str, run=run_inline, queue=None) -> None:
        self.spool = spool
        self.run = run
        self.queue = queue
        self.incoming = os.path.join(spool, "incoming")
        os.makedirs(self.incoming, exist_ok=True)
        self._known_maildirs: set[str] = set()

    def recover(self) -> int:
        """Remove messages that never got their 250 (left by a crash)."""
        n = 0
        for name in os.listdir(self.incoming):
            try:
                os.unlink(os.path.join(self.incoming, name))
                n += 1
            except OSError:
                pass
        return n

    def begin(self, envelope: Envelope) -> IncomingMessage:
        return IncomingMessage(self, envelope)

    def commit_file(self, fd: int, path: str, envelope: Envelope) -> str:
        """Runs in a thread: make the message durable everywhere it goes."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs = set()
        name = envelope.message_id
        for mailbox in dict.fromkeys(envelope.mailboxes):
            md = maildir_path(self.spool, mailbox)
            if md not in self._known_maildirs:
                ensure_maildir(md)
                self._known_maildirs.add(md)
            new = os.path.join(md, "new")
            os.link(path, os.path.join(new, name))
            dirs.add(new)
        if envelope.relay_recipients:
            if self.queue is None:
                raise RuntimeError("relay recipients but no relay queue")
            dirs.update(self.queue.store(path, envelope))
        for d in dirs:
            fsync_dir(d)
        os.unlink(path)
        return name
