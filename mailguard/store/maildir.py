"""Durable acceptance: a ``250`` after the final dot means the message is on
disk, fsynced, in every destination.

How a message is stored (``docs/delivery.md`` explains it for
administrators):

1. It is written once to ``SPOOL/incoming/<id>`` (opened ``O_EXCL``;
   nothing else ever reads that directory): a message up to 512 KiB is
   kept in memory while it arrives and written by the commit thread at the
   final dot; a larger one is written as it arrives.
2. At the final dot the file is fsynced, then hard-linked into the
   ``new/`` directory of each local recipient's Maildir and, for relayed
   recipients, into the relay queue (through the store's C{relay}, an
   L{mailguard.interfaces.IRelayIntake}: ``SPOOL/queue/active/<id>.eml``
   beside its envelope ``<id>.env``, see L{mailguard.store.queuedir}).  A
   link appears atomically and complete: no reader ever sees half a
   message, and one inode serves every destination (Maildir files are never
   modified in place, so sharing is safe; a user who deletes their copy
   removes only their link).  This is the Maildir protocol's "write in
   ``tmp/``, then move into ``new/``" with the temporary directory shared
   by all Maildirs.
3. The directories that received a link are fsynced -- *group commit*:
   concurrent messages share a directory fsync, but each waits for one that
   *started after its own link* (see L{mailguard.store.durable.DirSyncer}).
   Steps 1 (for a message kept in memory) to 3 are one task in the disk
   thread pool.  Only then is the ``250`` sent.
4. The incoming name is unlinked as soon as the links exist; after a crash
   ``incoming/`` holds only messages that never got their ``250``, and
   L{MaildirStore.open} removes them at start-up.

A message is stored once whatever the number of recipients; an alias that
names the same mailbox twice still gives one copy.

The dependency runs one way: the store hands relayed recipients to the
queue through the narrow C{relay} seam; the queue knows nothing of the
store and stores its DSNs through a callable that the composition root
(L{mailguard.service}) wires to L{MaildirStore.inject}.

Blocking disk work runs in a thread pool (``run``); tests pass
L{mailguard.store.durable.run_inline} and everything happens at once, in
order.  The constructor touches nothing on disk: L{MaildirStore.open}
creates the directories and recovers, once, at start-up.

Layout::

    SPOOL/incoming/<id>                       being received
    SPOOL/mail/<domain>/<user>/Maildir/{tmp,new,cur}/
    SPOOL/queue/active/<id>.eml, <id>.env     the relay queue
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger
from zope.interface import implementer

from mailguard.interfaces import IIncomingMessage, IMessageStore
from mailguard.policy.directory import maildir_dirs
from mailguard.store.durable import DirSyncer, empty_dir, makedirs_durable, run_inline, write_all
from mailguard.store.envelope import Envelope

__all__ = ["Envelope", "IncomingMessage", "MaildirStore", "ensure_maildir", "maildir_path"]

log = Logger()


def maildir_path(spool: str, mailbox: str) -> str:
    return os.path.join(spool, "mail", *maildir_dirs(mailbox), "Maildir")


def ensure_maildir(path: str) -> None:
    """Create a Maildir (``tmp``, ``new``, ``cur``) durably."""
    for sub in ("tmp", "new", "cur"):
        makedirs_durable(os.path.join(path, sub))


@dataclass
class Committed:
    """What the commit thread hands back to the reactor."""

    message_id: str
    dirs: set = field(default_factory=set)  # directories that got a link (fsynced)
    links: list = field(default_factory=list)  # created names (undo on failure)
    entry: object = None  # what the relay intake returned (a queue entry), or None
    notices: list = field(default_factory=list)  # (Envelope, bytes): DSNs to inject


@implementer(IIncomingMessage)
class IncomingMessage:
    """One message being received.

    A message up to C{SPILL} bytes is kept in memory and written, fsynced
    and linked in one go by the commit thread: the reactor thread does no
    disk I/O for it (creating a file in a busy directory can wait on the
    file system's journal while other messages' fsyncs run).  A larger one
    goes to ``incoming/`` as it arrives, so memory stays bounded; every
    C{SYNC_EVERY} bytes a disk thread flushes what has arrived so far
    (``fdatasync``), so the fsync at the final dot, which is what the
    ``250`` waits for, finds little left to write.
    """

    SPILL = 512 * 1024
    SYNC_EVERY = 4 << 20

    def __init__(self, store: "MaildirStore", envelope: Envelope) -> None:
        self.store = store
        self.envelope = envelope
        self.path = os.path.join(store.incoming, envelope.message_id)
        self.fd: int | None = None
        self._chunks: list[bytes] | None = []
        self.size = 0
        self._unsynced = 0
        self._syncing: defer.Deferred | None = None  # a background fdatasync
        self._sync_error: Failure | None = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._chunks is not None:
            self._chunks.append(data)
            if self.size <= self.SPILL:
                return
            data = b"".join(self._chunks)
            self._chunks = None
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        write_all(self.fd, data)
        self._unsynced += len(data)
        if self._unsynced >= self.SYNC_EVERY and self._syncing is None:
            self._unsynced = 0
            self._syncing = self.store.run(os.fdatasync, self.fd)
            self._syncing.addBoth(self._synced)

    def _synced(self, result) -> None:
        # Only an early flush: the final fsync still makes the message
        # durable.  But a write-back error is reported once per file
        # description, so one seen here must fail the commit, or the final
        # fsync could succeed over lost data.
        self._syncing = None
        if isinstance(result, Failure) and self._sync_error is None:
            self._sync_error = result

    def _after_sync(self, f, *args) -> defer.Deferred:
        """Run C{f(*args)} once no background fdatasync is in flight (its
        file descriptor must not be closed, or reused, under it)."""
        if self._syncing is None:
            return defer.maybeDeferred(f, *args)
        d = defer.Deferred()
        self._syncing.addBoth(lambda _: d.callback(None))
        return d.addCallback(lambda _: f(*args))

    def commit(self):
        if self._chunks is not None:
            data, self._chunks = b"".join(self._chunks), None
            return self.store.inject(self.envelope, lambda: data)
        fd, self.fd = self.fd, None
        if self._syncing is None and self._sync_error is None:
            return self.store.commit(fd, self.path, self.envelope)
        return self._after_sync(self._commit_synced, fd)

    def _commit_synced(self, fd: int):
        if self._sync_error is not None:
            self._discard(fd)
            return self._sync_error
        return self.store.commit(fd, self.path, self.envelope)

    def abort(self) -> None:
        self._chunks = None
        fd, self.fd = self.fd, None
        if fd is not None:
            self._after_sync(self._discard, fd)

    def _discard(self, fd: int) -> None:
        os.close(fd)
        try:
            os.unlink(self.path)
        except OSError:
            pass


@implementer(IMessageStore)
class MaildirStore:
    """Maildirs for local mailboxes; relayed recipients go to C{relay}.

    @param run: runs blocking disk work (L{mailguard.store.durable.run_in_thread},
        L{mailguard.store.durable.disk_runner} or, in tests,
        L{mailguard.store.durable.run_inline}).
    @param relay: where relayed recipients go: an
        L{mailguard.interfaces.IRelayIntake} (the relay queue).  Without
        one, a message with relayed recipients fails its commit.
    @param notices: a L{mailguard.store.notices.Notifier} for success DSNs
        to local recipients; None: none are written.
    @param syncer: the L{DirSyncer} shared with the relay queue.
    """

    def __init__(self, spool: str, run=run_inline, *, relay=None, notices=None,
                 syncer: DirSyncer | None = None) -> None:
        self.spool = spool
        self.run = run
        self.relay = relay
        self.notices = notices
        self.incoming = os.path.join(spool, "incoming")
        self.mail = os.path.join(spool, "mail")
        self.syncer = syncer if syncer is not None else DirSyncer()
        self._known_maildirs: set[str] = set()
        self._mkdir_lock = threading.Lock()
        self._opened = False

    def open(self) -> int:
        """At start-up, before L{begin}: create the spool's directories
        (durably) and remove messages that never got their 250 (left by a
        crash).  Returns how many were removed."""
        makedirs_durable(self.incoming)
        makedirs_durable(self.mail)
        removed = empty_dir(self.incoming)
        self._opened = True
        return removed

    def begin(self, envelope: Envelope) -> IncomingMessage:
        if not self._opened:
            raise RuntimeError("MaildirStore.open() must be called before begin()")
        return IncomingMessage(self, envelope)

    # -- committing ------------------------------------------------------------------
    def commit(self, fd: int, path: str, envelope: Envelope) -> defer.Deferred:
        """Make a received message durable everywhere it goes; the Deferred
        fires with its id once it is (file and directories fsynced)."""
        d = self.run(self.commit_file, fd, path, envelope)
        return self._finish(d)

    def inject(self, envelope: Envelope, produce: Callable[[], bytes]) -> defer.Deferred:
        """Store a whole message at once: C{produce()}, called in a thread,
        returns its bytes (CRLF lines).  Used for received messages kept in
        memory and for those mailguard writes itself (DSNs); stored exactly
        like a received message."""
        d = self.run(self._inject_file, envelope, produce)
        return self._finish(d)

    def _inject_file(self, envelope: Envelope, produce) -> Committed:
        data = produce()
        path = os.path.join(self.incoming, envelope.message_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return self.commit_file(fd, path, envelope)

    def _finish(self, d: defer.Deferred) -> defer.Deferred:
        def durable(committed: Committed):
            if committed.entry is not None:
                self.relay.enqueued(committed.entry)
            for env, data in committed.notices:
                self.inject(env, lambda data=data: data).addErrback(
                    lambda f: log.failure("cannot store a delivery notification", f))
            return committed.message_id

        d.addCallback(durable)
        return d

    def _maildir(self, mailbox: str) -> str:
        md = maildir_path(self.spool, mailbox)
        if md not in self._known_maildirs:
            # Creation (with its parent fsyncs) is serialised, so no thread
            # links into a Maildir whose directory entry is not yet durable.
            with self._mkdir_lock:
                if md not in self._known_maildirs:
                    ensure_maildir(md)
                    self._known_maildirs.add(md)
        return md

    def commit_file(self, fd: int, path: str, envelope: Envelope) -> Committed:
        """Runs in a thread: fsync the file, link it everywhere it goes,
        fsync those directories (group commit).  When it returns, the
        message is durable and the 250 may go.  C{fd} is closed and the
        incoming name C{path} removed in every case.  On any failure the
        links are taken back (best effort: the client gets a 4xx and will
        send again, so a copy left behind would be a duplicate)."""
        name = envelope.message_id
        done = Committed(name)
        try:
            os.fsync(fd)
            fd, closing = None, fd
            os.close(closing)
            for md in dict.fromkeys(self._maildir(m) for m in envelope.mailboxes):
                new = os.path.join(md, "new")
                target = os.path.join(new, name)
                os.link(path, target)
                done.links.append(target)
                done.dirs.add(new)
            if envelope.relay_recipients:
                if self.relay is None:
                    raise RuntimeError("relay recipients but no relay queue")
                entry, links, dirs = self.relay.add_file(path, envelope)
                done.entry = entry
                done.links += links
                done.dirs.update(dirs)
            if self.notices is not None and envelope.mail_from:
                done.notices = self.notices.on_local_delivery(path, envelope)
            self.syncer.sync_all(done.dirs)
        except BaseException:
            for p in done.links:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        finally:
            if fd is not None:  # the fsync failed
                os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
        return done
