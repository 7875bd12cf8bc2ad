"""Managing the relay queue by hand, as Postfix's ``postqueue``/``postsuper``
do: hold, release, delete and flush entries.

Two ways in, one set of rules:

- the running server owns its queue, so while it runs every change goes
  through it (L{QueueAdmin}, a mixin of L{mailguard.store.queue.RelayQueue},
  reached through the control socket of L{mailguard.store.control}): a
  deleted entry is forgotten at once and its files removed, with no retry
  and no DSN (as ``postsuper -d``); a held one is never tried until it is
  released; a flush makes entries due now;
- with the server stopped, L{offline} makes the same changes in the spool
  (the next start reads them); listing always reads the spool
  (L{read_entries}), which is consistent at every instant (each ``.env``
  is replaced by a rename).

An entry is named by its full id (the file name) or its short id (the
``queued as`` of its ``250`` and the ``queue=`` of its log lines);
``ALL`` names every entry.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.logger import Logger

from mailguard.logs import emit
from mailguard.store.entries import QueueEntry, domain_matcher
from mailguard.store.envelope import queue_id
from mailguard.store.queuedir import QueueDir

__all__ = ["QueueAdmin", "matches", "offline", "read_entries"]

log = Logger()

OPERATIONS = ("delete", "hold", "release", "flush")


def matches(entry_id: str, key: str) -> bool:
    return key == "ALL" or key == entry_id or key == queue_id(entry_id)


def _chosen(entries: list[QueueEntry], key: str | None) -> list[QueueEntry]:
    """What a flush names: every entry (no key, ``ALL``), the entry with
    that id, or else the entries with a pending recipient in that domain."""
    if not key:
        return entries
    by_id = [e for e in entries if matches(e.id, key)]
    if by_id:
        return by_id
    in_domain = domain_matcher(key)
    return [e for e in entries if any(in_domain(r.domain) for r in e.pending())]


class QueueAdmin:
    """The operations on a running queue.  Each returns a Deferred that
    fires with the ids it changed once the change is on disk."""

    __slots__ = ()

    def select(self, key: str) -> list[QueueEntry]:
        return [e for e in self.entries.values() if matches(e.id, key)]

    def delete(self, key: str) -> defer.Deferred:
        """Forget the entries and remove their files: no further attempt,
        no DSN.  One being delivered right now may still reach the next
        hop; its result is not recorded."""
        gone = self.select(key)
        work = []
        for entry in gone:
            del self.entries[entry.id]
            work.append(self._track(self.run(self.disk.remove, entry.id)))
            emit(log, "queue-deleted", {"queue": queue_id(entry.id), "from": entry.sender,
                                        "to": tuple(r.address for r in entry.pending())})
        if gone:
            self._pump()  # re-arm the timer without them
        return self._when(work, gone)

    def hold(self, key: str) -> defer.Deferred:
        changed = [e for e in self.select(key) if not e.held]
        for entry in changed:
            entry.held = True
            emit(log, "queue-held", {"queue": queue_id(entry.id)})
        return self._when([self._save(e) for e in changed], changed)

    def release(self, key: str) -> defer.Deferred:
        changed = [e for e in self.select(key) if e.held]
        now = self.clock.seconds()
        for entry in changed:
            entry.held = False
            entry.next_attempt = min(entry.next_attempt, now)
            emit(log, "queue-released", {"queue": queue_id(entry.id)})
        d = self._when([self._save(e) for e in changed], changed)
        if changed:
            self._pump()
        return d

    def flush(self, key: str | None = None) -> defer.Deferred:
        """Make entries due now (and end a suspension for an unreachable
        relay host): all of them (C{key} None or ``ALL``), one entry, or
        those with a recipient in a domain (``@domain``: and its
        subdomains), as ETRN.  Held entries stay held."""
        entries = self._due_now(_chosen(list(self.entries.values()), key))
        emit(log, "queue-flushed", {"what": key or "ALL", "count": len(entries)})
        return defer.succeed([e.id for e in entries])

    def _save(self, entry: QueueEntry):
        """Write the entry's state, unless an attempt is in flight: its
        result is written with the same entry (held flag included), and
        two writers could put an older state last."""
        if entry.in_flight:
            return defer.succeed(None)
        return self._track(self.run(self.disk.rewrite, entry.id, entry.to_json()))

    @staticmethod
    def _when(work: list, entries: list[QueueEntry]) -> defer.Deferred:
        d = defer.gatherResults(work, consumeErrors=True) if work else defer.succeed(None)
        return d.addCallback(lambda _: [e.id for e in entries])


# -- with the server stopped: the spool itself -----------------------------------------

def read_entries(spool: str) -> list[QueueEntry]:
    """The queue as the spool holds it, oldest first (read-only: safe while
    the server runs).  Unreadable envelopes are left out."""
    disk = QueueDir(spool)
    try:
        names = os.listdir(disk.active)
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        if not name.endswith(".env"):
            continue
        try:
            with open(os.path.join(disk.active, name), "rb") as f:
                entries.append(QueueEntry.from_json(f.read()))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # being removed, or corrupt (the server moves those aside)
    return sorted(entries, key=lambda e: (e.arrival, e.id))


def offline(spool: str, op: str, key: str | None) -> list[str]:
    """C{op} on the spool of a stopped server; the ids changed.  A flush
    changes nothing on disk: every entry is tried when the server starts."""
    disk = QueueDir(spool)
    chosen = [e for e in read_entries(spool) if key is None or matches(e.id, key)]
    if op == "delete":
        for entry in chosen:
            disk.remove(entry.id)
    elif op in ("hold", "release"):
        held = op == "hold"
        chosen = [e for e in chosen if e.held != held]
        for entry in chosen:
            entry.held = held
            disk.rewrite(entry.id, entry.to_json())
    elif op == "flush":
        chosen = [e for e in _chosen(read_entries(spool), key) if not e.held and e.pending()]
    else:
        raise ValueError(f"unknown operation {op!r}")
    return [e.id for e in chosen]
