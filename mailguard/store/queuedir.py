"""The relay queue on disk: how an entry is created, rewritten and removed
so that no crash loses or duplicates one.

Layout (``docs/delivery.md`` is the administrator's version)::

    SPOOL/queue/tmp/                 envelope files being written
    SPOOL/queue/active/<id>.eml      the message: a hard link to the file
                                     the SMTP session wrote (no copy)
    SPOOL/queue/active/<id>.env      its envelope, JSON: sender, DSN
                                     parameters, per-recipient state,
                                     attempts, next attempt
    SPOOL/queue/corrupt/             envelopes that could not be read

An entry exists when its ``.env`` does.  At acceptance the ``.eml`` link is
made first, then the ``.env`` (written and fsynced in ``tmp/``) is renamed
in, then ``active/`` is fsynced (shared with concurrent messages: see
L{mailguard.store.durable.DirSyncer}); only then does the client get its
``250``.  Every later change of state is written the same way (new file,
fsync, rename, directory fsync), and an entry is finished by unlinking
its ``.env`` then its ``.eml``.  At start-up (L{QueueDir.open}), ``tmp/``
is emptied and a ``.eml`` without ``.env`` (an acceptance that never got
its ``250``, or an interrupted removal) is removed.

Everything here is blocking: the queue runs it in its disk runner, and
acceptance runs L{QueueDir.add} in the store's commit thread.
"""

from __future__ import annotations

import os
from itertools import count

from twisted.logger import Logger

from mailguard.store.durable import DirSyncer, empty_dir, fsync_dir, makedirs_durable, write_all
from mailguard.store.entries import QueueEntry
from mailguard.store.envelope import Envelope

__all__ = ["QueueDir"]

log = Logger()

_tmp_counter = count()


class QueueDir:
    """``SPOOL/queue``: the entries' files.  The constructor only computes
    paths; L{open} creates the directories and recovers.

    @param syncer: the L{DirSyncer} shared with the Maildir store, so one
        directory fsync can serve both.
    """

    def __init__(self, spool: str, syncer: DirSyncer | None = None) -> None:
        self.dir = os.path.join(spool, "queue")
        self.active = os.path.join(self.dir, "active")
        self.tmp = os.path.join(self.dir, "tmp")
        self.syncer = syncer if syncer is not None else DirSyncer()

    def eml_path(self, id: str) -> str:
        return os.path.join(self.active, id + ".eml")

    def env_path(self, id: str) -> str:
        return os.path.join(self.active, id + ".env")

    # -- start-up --------------------------------------------------------------------
    def open(self) -> tuple[dict[str, QueueEntry], int]:
        """Create the directories (durably), remove what a crash left
        half-done, and load the entries: (entries by id, files removed)."""
        makedirs_durable(self.active)
        makedirs_durable(self.tmp)
        removed = empty_dir(self.tmp)
        names = set(os.listdir(self.active))
        entries: dict[str, QueueEntry] = {}
        for name in sorted(names):
            id, _, ext = name.rpartition(".")
            path = os.path.join(self.active, name)
            if ext == "eml" and id + ".env" not in names:
                os.unlink(path)
                removed += 1
            elif ext == "env":
                if id + ".eml" not in names:
                    log.error("queue entry {id} has no message file; removed", id=id)
                    os.unlink(path)
                    removed += 1
                    continue
                try:
                    with open(path, "rb") as f:
                        entry = QueueEntry.from_json(f.read())
                except (OSError, ValueError, TypeError, KeyError):
                    log.failure("unreadable queue entry {id}; moved to queue/corrupt", id=id)
                    corrupt = os.path.join(self.dir, "corrupt")
                    os.makedirs(corrupt, exist_ok=True)
                    os.rename(path, os.path.join(corrupt, name))
                    continue
                if not entry.pending():
                    os.unlink(path)
                    os.unlink(self.eml_path(id))
                    removed += 2
                    continue
                entries[entry.id] = entry
        if removed:
            fsync_dir(self.active)
        return entries, removed

    # -- acceptance (in the store's commit thread) ----------------------------------------
    def add(self, path: str, envelope: Envelope, arrival: float):
        """Make C{path} (fsynced) a queue entry for C{envelope.relay_recipients}.
        Returns (entry, names created, directories to fsync before the 250):
        the caller fsyncs the directories (group commit) and takes the names
        back if anything fails."""
        entry = QueueEntry.from_envelope(envelope, arrival, os.stat(path).st_size)
        tmp = self._write_tmp(entry.id, entry.to_json())
        eml, env = self.eml_path(entry.id), self.env_path(entry.id)
        os.link(path, eml)
        try:
            os.rename(tmp, env)
        except BaseException:
            os.unlink(eml)
            raise
        return entry, [env, eml], {self.active}

    def _write_tmp(self, id: str, data: bytes) -> str:
        """C{data} in a new, fsynced file in ``tmp/``."""
        tmp = os.path.join(self.tmp, f"{id}.{next(_tmp_counter)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    # -- later states ----------------------------------------------------------------------
    def rewrite(self, id: str, data: bytes) -> bool:
        """The entry's new state, durably.  False, and nothing written, if
        its message file is gone (the entry was removed from the spool
        meanwhile: the envelope must not come back without it)."""
        tmp = self._write_tmp(id, data)
        if not os.path.exists(self.eml_path(id)):
            os.unlink(tmp)
            return False
        os.rename(tmp, self.env_path(id))
        self.syncer.sync(self.active)
        return True

    def remove(self, id: str) -> None:
        """The entry is finished.  (The directory fsync keeps a crash from
        bringing it back to be sent twice.)"""
        for path in (self.env_path(id), self.eml_path(id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.syncer.sync(self.active)
