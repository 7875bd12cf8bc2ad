"""The relay queue: messages for non-local recipients (relayed for trusted
clients, and gateway mail) wait here, on disk, for the next hop
(``--relay-host``).

This module is the scheduler: which entries are due, how many connections
run, what an attempt's outcome does to each recipient, which DSNs it
causes.  The files are L{mailguard.store.queuedir}'s, the values
L{mailguard.store.entries}', the wire L{mailguard.store.relayclient}'s.

Delivery: a L{mailguard.store.relayclient.Worker} per connection to the
relay host, at most C{concurrency} connections, each delivering due entries
one after another.

Outcome per recipient: ``2xx`` after DATA: sent.  ``5xx`` (to MAIL, RCPT or
the end of DATA): failed at once, a DSN goes to the sender.  ``4xx``, a
lost connection, a timeout: retried after C{retry_min} * 2**(attempts-1)
seconds, at most C{retry_max}; once C{lifetime} has passed since arrival
(the last attempt is made at that moment), failed with status ``4.4.7``.
A connection that fails before the first transaction marks the relay host
down for C{retry_min} seconds: due entries are deferred without a
connection each (Postfix's "delivery temporarily suspended").  ``ETRN``
(L{RelayQueue.kick}) makes entries due at once.

Without a relay host the queue still runs: bounces for local senders are
delivered to their Maildirs, and relayed mail is *held* (deferred with
``4.4.1 no relay host configured``) until mailguard is restarted with
``--relay-host`` or the lifetime expires.

The queue never calls the Maildir store: it takes messages through
L{RelayQueue.add_file}/L{RelayQueue.enqueued} (its
L{mailguard.interfaces.IRelayIntake} side), and stores the DSNs it writes
through C{deliver}, a callable the composition root wires to
L{mailguard.store.maildir.MaildirStore.inject}.  The clock is a
constructor argument: tests drive a ``twisted.internet.task.Clock``.  The
constructor touches nothing on disk; L{RelayQueue.open} (or
C{startService}) creates the directories and loads the queue.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from collections import deque
from typing import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailguard.interfaces import IRelayIntake, IRelayQueue
from mailguard.logs import emit
from mailguard.store import dsn
from mailguard.store.durable import DirSyncer, run_inline
from mailguard.store.entries import FAILED, PENDING, SENT, Outcome, QueueEntry, backoff, classify, domain_matcher
from mailguard.store.envelope import Envelope, queue_id
from mailguard.store.notices import Notifier
from mailguard.store.queueadmin import QueueAdmin
from mailguard.store.queuedir import QueueDir
from mailguard.store.relayclient import RelayHop, Worker, endpoint_connector

__all__ = ["RelayQueue"]

log = Logger()


@implementer(IRelayQueue, IRelayIntake)
class RelayQueue(QueueAdmin, service.Service):
    """The durable relay queue and its runner.

    @param spool: the spool directory (the queue is ``SPOOL/queue``).
    @param clock: an C{IReactorTime} (the reactor; a C{Clock} in tests).
    @param run: runs blocking disk work (see L{mailguard.store.durable}).
    @param relay_host: (host, port) of the next hop, or None.
    @param hostname: the name sent in EHLO.
    @param notices: the L{Notifier} that builds and addresses DSNs; by
        default one that relays every notice.
    @param deliver: C{deliver(envelope, produce) -> Deferred}: stores a DSN
        like received mail (L{mailguard.store.maildir.MaildirStore.inject});
        None: DSNs are dropped.  May be set after construction, before the
        queue starts (the store that provides it takes the queue itself).
    @param syncer: the L{DirSyncer} shared with the Maildir store.
    @param tls: TLS client settings for STARTTLS, or None for none.
    @param connect: C{factory -> Deferred[protocol]}; by default a
        C{HostnameEndpoint} to C{relay_host} on C{clock}, from
        C{bind_address} if not empty.
    """

    name = "relay-queue"

    def __init__(self, spool: str, clock, *, run=run_inline, relay_host=None,
                 hostname: str = "localhost", lifetime: float = 432000.0,
                 retry_min: float = 300.0, retry_max: float = 14400.0,
                 concurrency: int = 10, notices: Notifier | None = None,
                 deliver: Callable | None = None, syncer: DirSyncer | None = None,
                 tls=None, tls_required: bool = False,
                 connect: Callable | None = None, timeout: float = 300.0,
                 connect_timeout: float = 30.0, bind_address: str = "") -> None:
        self.spool = spool
        self.disk = QueueDir(spool, syncer)
        self.clock = clock
        self.run = run
        self.relay_host = relay_host
        self.hostname = hostname
        self._set_limits(lifetime, retry_min, retry_max, concurrency)
        self.notices = notices if notices is not None else Notifier(hostname, clock)
        self.deliver = deliver
        self.tls = tls
        self.tls_required = bool(tls_required)
        self.timeout = timeout
        self.bind_address = bind_address
        if connect is None and relay_host is not None:
            connect = endpoint_connector(clock, relay_host[0], relay_host[1], connect_timeout, bind_address)
        self._hop = RelayHop(self.relay_name, hostname, tls, self.tls_required, timeout, connect)
        self.entries: dict[str, QueueEntry] = {}
        self._ready: deque[QueueEntry] = deque()
        self._workers: set[Worker] = set()
        self._timer = None
        self._down_until = 0.0
        self._down_reason = ""
        self._busy: set[defer.Deferred] = set()
        self._loaded = False
        self._pumping = False
        self._pump_again = False
        # Recipients by outcome of their attempts (the metrics read it).
        self.deliveries = dict.fromkeys(("sent", "deferred", "bounced"), 0)

    def _set_limits(self, lifetime: float, retry_min: float, retry_max: float, concurrency: int) -> None:
        self.lifetime = float(lifetime)
        self.retry_min = max(float(retry_min), 1.0)
        self.retry_max = max(float(retry_max), self.retry_min)
        self.concurrency = max(int(concurrency), 1)

    def reconfigure(self, *, hostname: str, lifetime: float, retry_min: float, retry_max: float,
                    concurrency: int, router: Callable | None = None) -> None:
        """A configuration reload: the new name (EHLO, DSNs), lifetime,
        retry bounds and concurrency apply from the next attempt, and DSNs
        are addressed with the new C{router}
        (L{mailguard.store.notices.directory_router}); the entries, their
        schedule and the connections open carry on."""
        self.hostname = hostname
        self._set_limits(lifetime, retry_min, retry_max, concurrency)
        self._hop = replace(self._hop, identity=hostname)
        self.notices.hostname = hostname
        if router is not None:
            self.notices.router = router
        self._pump()  # a higher concurrency may start connections now

    @property
    def relay_name(self) -> str | None:
        return self.relay_host[0] if self.relay_host else None

    def eml_path(self, id: str) -> str:
        return self.disk.eml_path(id)

    # -- start-up ----------------------------------------------------------------------
    def open(self) -> int:
        """Create the queue's directories and load it from disk (blocking;
        at start-up).  Removes what a crash left half-done; returns how many
        files were removed."""
        self.entries, removed = self.disk.open()
        self._loaded = True
        return removed

    def startService(self) -> None:
        super().startService()
        if not self._loaded:
            self.open()
        now = self.clock.seconds()
        for entry in self.entries.values():  # a queue run at start
            entry.next_attempt = min(entry.next_attempt, now)
        if self.entries:
            log.info("relay queue: {n} message(s) waiting", n=len(self.entries))
        if self.relay_host is None:
            log.warn("no --relay-host: relayed mail is held in the queue and bounced "
                     "after QueueLifetime ({s:.0f} s)", s=self.lifetime)
        self._pump()

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for w in list(self._workers):
            w.abort()
        busy = list(self._busy)
        return defer.DeferredList(busy) if busy else None

    # -- acceptance (IRelayIntake: called by the store) -----------------------------------
    def add_file(self, path: str, envelope: Envelope):
        """Runs in the commit thread: see L{QueueDir.add}."""
        return self.disk.add(path, envelope, self.clock.seconds())

    def enqueued(self, entry: QueueEntry) -> None:
        """The entry is durable: schedule its first attempt now."""
        entry.next_attempt = self.clock.seconds()
        self.entries[entry.id] = entry
        self._pump()

    # -- ETRN ------------------------------------------------------------------------------
    def kick(self, domain: str | None = None) -> int:
        """Start a queue run now (ETRN): entries with a pending recipient in
        C{domain} ("@domain": that domain and its subdomains; None: all)
        become due.  Returns how many."""
        matches = domain_matcher(domain)
        return len(self._due_now([e for e in self.entries.values()
                                  if any(matches(r.domain) for r in e.pending())]))

    def _due_now(self, entries: list[QueueEntry]) -> list[QueueEntry]:
        """Make C{entries} (those not held) due now, ending a suspension."""
        now = self.clock.seconds()
        entries = [e for e in entries if not e.held and e.pending()]
        for entry in entries:
            entry.next_attempt = min(entry.next_attempt, now)
        if entries:
            self._down_until = 0.0
            self._pump()
        return entries

    # -- the runner ------------------------------------------------------------------------
    def _pump(self) -> None:
        """Start what is due, within the concurrency limit; set the timer
        for what is not."""
        if not self.running:
            return
        if self._pumping:  # re-entered from a result that fired at once
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        now = self.clock.seconds()
        due = sorted((e for e in self.entries.values()
                      if not e.in_flight and not e.queued and not e.held and e.next_attempt <= now
                      and e.pending()),
                     key=lambda e: (e.next_attempt, e.arrival))
        if self.relay_host is None:
            for e in due:
                e.in_flight = True
                self.attempted(e, Outcome(error="no relay host configured (--relay-host)"))
        elif due and now < self._down_until:
            for e in due:
                e.in_flight = True
                self.attempted(e, Outcome(error=f"delivery temporarily suspended: {self._down_reason}"))
        else:
            for e in due:
                e.queued = True
                self._ready.append(e)
        # One more connection per ready entry that no connection being set
        # up will take (busy connections take more when they finish).
        while len(self._workers) < self.concurrency and \
                len(self._ready) > sum(1 for w in self._workers if w.fresh):
            worker = Worker(self, self._hop, use_tls=self.tls is not None)
            self._workers.add(worker)
            worker.start()
        self._arm()

    def _arm(self) -> None:
        waiting = [e.next_attempt for e in self.entries.values()
                   if not e.in_flight and not e.queued and not e.held and e.pending()]
        if waiting and self.running:
            delay = max(min(waiting) - self.clock.seconds(), 0.0)
            self._timer = self.clock.callLater(delay, self._pump)

    def _host_down(self, reason: str) -> None:
        """The relay host cannot be reached: defer what is ready."""
        self._down_until = self.clock.seconds() + self.retry_min
        self._down_reason = reason
        emit(log, "relay-suspended", {"relay": self.relay_name, "reason": reason, "seconds": self.retry_min},
             LogLevel.warn)
        while (e := self.take_ready()) is not None:
            self.attempted(e, Outcome(error=reason))

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._busy.add(d)
        d.addBoth(lambda r: (self._busy.discard(d), r)[1])
        return d

    # -- what workers ask (see mailguard.store.relayclient.Worker) -------------------------
    def take_ready(self) -> QueueEntry | None:
        """The next ready entry, marked in flight, or None."""
        if not self.running:
            return None
        ready = self._ready
        while ready:
            entry = ready.popleft()
            entry.queued = False
            if entry.in_flight or entry.held or not entry.pending() or self.entries.get(entry.id) is not entry:
                continue
            entry.in_flight = True
            return entry
        return None

    def worker_ended(self, worker: Worker, host_error: str | None) -> None:
        self._workers.discard(worker)
        if worker.aborted or not self.running:
            return
        if host_error is not None:
            self._host_down(host_error)
        self._pump()

    # -- results ---------------------------------------------------------------------------
    def attempted(self, entry: QueueEntry, outcome: Outcome) -> None:
        """Record one attempt: mark recipients, write DSNs, then the new
        state (DSNs first: a crash in between repeats a DSN, never loses
        one), then run what is due.  An entry deleted meanwhile (L{delete})
        is forgotten; one whose message file is gone is removed."""
        if self.entries.get(entry.id) is not entry:
            entry.in_flight = False
            return self._pump()
        if outcome.missing:
            return self._vanished(entry)
        now = self.clock.seconds()
        before = copy.deepcopy(entry.recipients)
        before_times = (entry.attempts, entry.next_attempt, entry.last_attempt)
        entry.attempts += 1
        entry.last_attempt = now
        expired = now >= entry.arrival + self.lifetime
        failed: list[dsn.RecipientReport] = []
        relayed: list[dsn.RecipientReport] = []
        qid = queue_id(entry.id)
        for r in entry.pending():
            state, status, diag = classify(outcome, r.address)
            r.status, r.diagnostic = status, diag
            remote = outcome.remote if diag.startswith("smtp;") else None
            if state == SENT:
                r.state = SENT
                self._relayed(qid, entry, r, "sent", now, diag)
                if not outcome.dsn and dsn.wants(r.notify, "SUCCESS"):
                    relayed.append(dsn.RecipientReport(r.address, "relayed", "2.0.0", r.orcpt,
                                                       diag, remote, now))
                continue
            if state == PENDING and not expired:
                self._relayed(qid, entry, r, "deferred", now, diag)
                continue
            if state == PENDING:
                r.status = "4.4.7"
                diag = f"{diag} (delivery time expired)"
            r.state = FAILED
            self._relayed(qid, entry, r, "bounced", now, diag)
            if dsn.wants(r.notify, "FAILURE"):
                failed.append(dsn.RecipientReport(r.address, "failed", r.status, r.orcpt,
                                                  diag, remote, now))
        if entry.pending():
            delay = backoff(entry.attempts, self.retry_min, self.retry_max)
            entry.next_attempt = min(now + delay, entry.arrival + self.lifetime)
        notices = []
        if entry.sender:  # never a DSN for the null sender
            if failed:
                notices.append((failed, entry.ret == "HDRS"))
            if relayed:
                notices.append((relayed, True))
        d = defer.succeed(None)
        for reports, headers_only in notices:
            d.addCallback(lambda _, reports=reports, h=headers_only: self._notify(entry, reports, h))
        d.addCallback(lambda _: self._persist(entry))

        def failed_to_store(f):
            log.failure("relay {id}: cannot record the attempt; will retry", f, id=entry.id)
            entry.recipients = before
            entry.attempts, entry.next_attempt, entry.last_attempt = before_times
            entry.next_attempt = self.clock.seconds() + self.retry_min

        def done(_):
            entry.in_flight = False
            if self.entries.get(entry.id) is not entry:  # deleted while it was recorded
                self._track(self.run(self.disk.remove, entry.id))
            elif not entry.pending():
                self.entries.pop(entry.id, None)
            self._pump()

        d.addErrback(failed_to_store)
        d.addBoth(done)
        self._track(d)

    def _notify(self, entry: QueueEntry, reports, headers_only: bool) -> defer.Deferred:
        notice = self.notices.about_entry(entry, reports, headers_only, self.disk.eml_path(entry.id))
        if notice is None or self.deliver is None:
            return defer.succeed(None)
        env, produce = notice
        d = self.deliver(env, produce)
        d.addCallback(lambda _: emit(log, "dsn", {"queue": queue_id(entry.id), "dsn": queue_id(env.message_id),
                                                  "action": reports[0].action, "to": entry.sender}))
        return d

    def _relayed(self, qid: str, entry: QueueEntry, r, result: str, now: float, diag: str) -> None:
        """One recipient's attempt: the log line (Postfix's ``status=``
        line) and the count."""
        self.deliveries[result] += 1
        emit(log, "relay", {"queue": qid, "to": r.address, "relay": self.relay_name, "result": result,
                            "status": r.status, "reply": diag, "attempts": entry.attempts,
                            "delay": now - entry.arrival})

    def _vanished(self, entry: QueueEntry) -> None:
        """The message file was removed from the spool by hand: the entry is
        gone for good -- no retry, no DSN (as after ``queue delete``)."""
        entry.in_flight = False
        self.entries.pop(entry.id, None)
        emit(log, "queue-removed", {"queue": queue_id(entry.id), "reason": "message file removed from the spool"},
             LogLevel.warn)
        self._track(self.run(self.disk.remove, entry.id))
        self._pump()

    def _persist(self, entry: QueueEntry) -> defer.Deferred:
        if self.entries.get(entry.id) is not entry:
            return defer.succeed(None)
        if entry.pending():
            return self.run(self.disk.rewrite, entry.id, entry.to_json())
        return self.run(self.disk.remove, entry.id)
