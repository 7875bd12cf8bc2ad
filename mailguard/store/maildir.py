"""Durable acceptance: a ``250`` after the final dot means the message is on
disk, fsynced, in every destination.

How a message is stored (``docs/delivery.md`` explains it for
administrators):

1. It is written once to ``SPOOL/incoming/<id>`` (opened ``O_EXCL``;
   nothing else ever reads that directory): a message up to 512 KiB is
   kept in memory while it arrives and written by the commit thread at the
   final dot; a larger one is written as it arrives.
2. At the final dot the file is fsynced, then hard-linked into the ``new/``
   directory of each local recipient's Maildir and, for relayed recipients,
   into the relay queue (``mailguard.store.queue``: ``SPOOL/queue/active/<id>.eml``
   beside its envelope ``<id>.env``).  A link appears atomically and
   complete: no reader ever sees half a message, and one inode serves every
   destination (Maildir files are never modified in place, so sharing is
   safe; a user who deletes their copy removes only their link).  This is
   the Maildir protocol's "write in ``tmp/``, then move into ``new/``"
   with the temporary directory shared by all Maildirs.
3. The directories that received a link are fsynced -- *group commit*:
   concurrent messages share a directory fsync, but each waits for one that
   *started after its own link* (see L{DirSyncer}).  Steps 1 (for a
   message kept in memory) to 3 are one task in the disk thread pool.
   Only then is the ``250`` sent.
4. The incoming name is unlinked as soon as the links exist; after a crash
   ``incoming/`` holds only messages that never got their ``250``, and
   L{MaildirStore.recover} removes them at start-up.

A message is stored once whatever the number of recipients; an alias that
names the same mailbox twice still gives one copy.

Blocking disk work runs in a thread pool (``run``); tests pass
L{run_inline} and everything happens at once, in order.

Layout::

    SPOOL/incoming/<id>                       being received
    SPOOL/mail/<domain>/<user>/Maildir/{tmp,new,cur}/
    SPOOL/queue/active/<id>.eml, <id>.env     the relay queue
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger
from zope.interface import implementer

from mailguard.interfaces import IIncomingMessage, IMessageStore
from mailguard.policy.directory import maildir_dirs

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
    return os.path.join(spool, "mail", *maildir_dirs(mailbox), "Maildir")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> bool:
    """``os.makedirs(path, exist_ok=True)``, and fsync the parent of every
    directory it creates, so that a directory a ``250`` depends on cannot
    vanish in a crash.  True if anything was created."""
    path = os.path.abspath(path)
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created = False
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
            created = True
        except FileExistsError:
            pass
        fsync_dir(os.path.dirname(d))
    return created


def ensure_maildir(path: str) -> None:
    """Create a Maildir (``tmp``, ``new``, ``cur``) durably."""
    for sub in ("tmp", "new", "cur"):
        makedirs_durable(os.path.join(path, sub))


def run_in_thread(reactor, pool=None):
    """A runner that moves blocking disk work off the reactor thread (into
    C{pool}, by default the reactor's)."""
    from twisted.internet.threads import deferToThreadPool

    def run(f, *args):
        return deferToThreadPool(reactor, pool if pool is not None else reactor.getThreadPool(), f, *args)

    return run


def disk_runner(reactor, threads: int = 32):
    """A runner with its own thread pool for fsync work, started with the
    reactor and stopped at shutdown.  fsync calls mostly wait: with 20
    sessions committing at once, 10 threads (the reactor pool's default,
    shared with PBKDF2) would queue them; more threads let the file system
    merge their journal commits."""
    from twisted.python.threadpool import ThreadPool

    pool = ThreadPool(minthreads=0, maxthreads=threads, name="mailguard-disk")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    return run_in_thread(reactor, pool)


def run_inline(f, *args):
    """A runner for tests: the blocking work runs at once."""
    return defer.maybeDeferred(f, *args)


class DirSyncer:
    """Group commit of directory fsyncs, for the threads that do disk work.

    ``sync(path)`` is called by a thread after its link or rename into
    C{path} has completed, and returns once an fsync of C{path} that
    *started after that call* has finished (raising its error if it
    failed).  If no fsync of C{path} is running, the caller runs one now;
    if one is running, the caller waits for the next one, which the first
    waiter starts as soon as the running one ends and which serves every
    thread that asked meanwhile.  So N concurrent messages cost about two
    directory fsyncs, not N, and no message's ``250`` rests on an fsync
    that may have missed its link.

    Each request takes a ticket under the lock; an fsync records the last
    ticket issued before it started, and serves every ticket up to it.
    """

    def __init__(self, fsync: Callable[[str], None] | None = None) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._dirs: dict[str, _DirState] = {}
        self.requests = 0  # statistics, for tests and benchmarks
        self.fsyncs = 0

    def sync(self, path: str) -> None:
        fsync = self._fsync or fsync_dir
        with self._lock:
            st = self._dirs.get(path)
            if st is None:
                st = self._dirs[path] = _DirState(self._lock)
            self.requests += 1
            st.issued += 1
            ticket = st.issued
            while st.done < ticket:
                if st.failed and st.failed[0] >= ticket:
                    raise st.failed[1]
                if st.running:
                    st.cond.wait()
                    continue
                st.running = True
                target = st.issued
                self.fsyncs += 1
                self._lock.release()
                try:
                    fsync(path)
                except OSError as e:
                    error = e
                else:
                    error = None
                finally:
                    self._lock.acquire()
                st.running = False
                if error is None:
                    st.done = target
                else:
                    st.failed = (target, error)
                st.cond.notify_all()

    def sync_all(self, paths) -> None:
        for p in sorted(set(paths)):
            self.sync(p)


class _DirState:
    __slots__ = ("issued", "done", "running", "failed", "cond")

    def __init__(self, lock) -> None:
        self.issued = 0  # the last ticket handed out
        self.done = 0  # every ticket up to this one is durable
        self.running = False
        self.failed = None  # (last ticket of a failed fsync, its error)
        self.cond = threading.Condition(lock)


@dataclass
class Committed:
    """What the commit thread hands back to the reactor."""

    message_id: str
    dirs: set = field(default_factory=set)  # directories that got a link (fsynced)
    links: list = field(default_factory=list)  # created names (undo on failure)
    entry: object = None  # a mailguard.store.queue.QueueEntry, or None
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
        _write_all(self.fd, data)
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@implementer(IMessageStore)
class MaildirStore:
    """Maildirs for local mailboxes; the relay queue for the rest.

    @param run: runs blocking disk work (L{run_in_thread}, L{disk_runner}
        or, in tests, L{run_inline}).
    @param queue: a L{mailguard.store.queue.RelayQueue}; the store attaches
        itself to it (bounces are stored through the store).
    """

    def __init__(self, spool: str, run=run_inline, queue=None) -> None:
        self.spool = spool
        self.run = run
        self.queue = queue
        self.incoming = os.path.join(spool, "incoming")
        makedirs_durable(self.incoming)
        makedirs_durable(os.path.join(spool, "mail"))
        self._known_maildirs: set[str] = set()
        self._mkdir_lock = threading.Lock()
        self.syncer = DirSyncer()
        if queue is not None:
            queue.attach(self)

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
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return self.commit_file(fd, path, envelope)

    def _finish(self, d: defer.Deferred) -> defer.Deferred:
        def durable(committed: Committed):
            if committed.entry is not None:
                self.queue.enqueued(committed.entry)
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
                if self.queue is None:
                    raise RuntimeError("relay recipients but no relay queue")
                entry, links, dirs = self.queue.add_file(path, envelope)
                done.entry = entry
                done.links += links
                done.dirs.update(dirs)
            if self.queue is not None and envelope.mail_from:
                done.notices = self.queue.local_notices(path, envelope)
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
