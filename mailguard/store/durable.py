"""Disk primitives shared by the Maildir store and the relay queue: fsync of
files and directories, durable directory creation, group commit of
directory fsyncs, and the runners that move this blocking work off the
reactor.

Why one module: the store and the queue make the same promise (a ``250``
rests on a file fsync and on a directory fsync that *started after* the
link), and they share one L{DirSyncer} (the composition root,
L{mailguard.service}, creates it and hands it to both), so a message that
goes to Maildirs and to the queue waits for one round of directory fsyncs,
not two.  Nothing here knows what a message or a queue entry is.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from twisted.internet import defer

__all__ = [
    "DirSyncer",
    "disk_runner",
    "empty_dir",
    "fsync_dir",
    "makedirs_durable",
    "missing_dirs",
    "run_in_thread",
    "run_inline",
    "write_all",
]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def missing_dirs(path: str) -> list[str]:
    """C{path} and those of its parents that are not directories, top
    first: what ``os.makedirs`` would create."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return missing[::-1]


def makedirs_durable(path: str) -> bool:
    """``os.makedirs(path, exist_ok=True)``, and fsync the parent of every
    directory it creates, so that a directory a ``250`` depends on cannot
    vanish in a crash.  True if anything was created."""
    created = False
    for d in missing_dirs(path):
        try:
            os.mkdir(d, 0o700)
            created = True
        except FileExistsError:
            pass
        fsync_dir(os.path.dirname(d))
    return created


def empty_dir(path: str) -> int:
    """Remove every file in C{path} (crash leftovers at start-up); returns
    how many were removed."""
    n = 0
    for name in os.listdir(path):
        try:
            os.unlink(os.path.join(path, name))
            n += 1
        except OSError:
            pass
    return n


def write_all(fd: int, data: bytes) -> None:
    """C{os.write} until every byte is written (it may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- runners: where blocking disk work runs -----------------------------------------

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


# --- group commit --------------------------------------------------------------------

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
