"""The relay queue: messages for non-local recipients (relayed for trusted
clients, and gateway mail) wait here, on disk, for the next hop
(``--relay-host``).

On disk (``docs/delivery.md`` is the administrator's version)::

    SPOOL/queue/tmp/                 envelope files being written
    SPOOL/queue/active/<id>.eml      the message: a hard link to the file
                                     the SMTP session wrote (no copy)
    SPOOL/queue/active/<id>.env      its envelope, JSON: sender, DSN
                                     parameters, per-recipient state,
                                     attempts, next attempt

An entry exists when its ``.env`` does.  At acceptance the ``.eml`` link is
made first, then the ``.env`` (written and fsynced in ``tmp/``) is renamed
in, then ``active/`` is fsynced (shared with concurrent messages: see
L{mailguard.store.maildir.DirSyncer}); only then does the client get its
``250``.  Every later change of state is written the same way (new file,
fsync, rename, directory fsync), and an entry is finished by unlinking
its ``.env`` then its ``.eml``.  At start-up, ``tmp/`` is emptied and a
``.eml`` without ``.env`` (an acceptance that never got its ``250``, or an
interrupted removal) is removed.

Delivery: a L{RelayClient} (a ``twisted.mail.smtp.ESMTPClient``) per
connection to the relay host, at most C{concurrency} connections, each
delivering due entries one after another.  STARTTLS is used when the next
hop offers it (opportunistic: no certificate check, and a refused or
failed TLS handshake falls back to plain text), unless
``RelayHostTlsVerify=1``: then TLS is required and the certificate is
checked.  DSN parameters are passed on when the next hop offers ``DSN``.

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

The clock is a constructor argument: tests drive a
``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import deque
from dataclasses import asdict, dataclass, field
from itertools import count
from typing import Callable

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import basic
from zope.interface import implementer

from mailguard.store import dsn
from mailguard.store.maildir import DirSyncer, Envelope, fsync_dir, makedirs_durable, new_message_id, run_inline
from mailguard.interfaces import IRelayQueue

log = Logger()

PENDING, SENT, FAILED = "pending", "sent", "failed"

_tmp_counter = count()
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


# --- the queue entry (what the .env file holds) ---------------------------------

@dataclass
class Recipient:
    address: str
    notify: list[str] | None = None  # parsed NOTIFY; None: not given
    orcpt: str | None = None  # raw ORCPT ("rfc822;xtext")
    state: str = PENDING
    status: str = ""  # enhanced status of the last result
    diagnostic: str = ""  # "smtp; 451 4.3.0 ..." or "X-mailguard; ..."

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass
class QueueEntry:
    id: str
    sender: str  # "" for the null sender (a DSN): never bounced
    recipients: list[Recipient]
    arrival: float
    size: int = 0
    envid: str | None = None  # raw ENVID (xtext)
    ret: str | None = None  # "FULL", "HDRS" or None
    body: str | None = None  # "8BITMIME", "7BIT" or None
    client_ip: str = ""
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    # Runtime state, not stored.
    in_flight: bool = field(default=False, repr=False)
    queued: bool = field(default=False, repr=False)

    _RUNTIME = ("in_flight", "queued")

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_json(self) -> bytes:
        data = asdict(self)
        for k in self._RUNTIME:
            data.pop(k, None)
        data["version"] = 1
        return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "QueueEntry":
        data = json.loads(raw)
        data.pop("version", None)
        rcpts = [Recipient(**{k: v for k, v in r.items() if k in Recipient.__dataclass_fields__})
                 for r in data.pop("recipients")]
        known = {k: v for k, v in data.items()
                 if k in cls.__dataclass_fields__ and k not in cls._RUNTIME}
        return cls(recipients=rcpts, **known)


@dataclass
class Outcome:
    """What one delivery attempt of one entry came to."""

    error: str | None = None  # connection-level (temporary) failure
    mail: tuple[int, str] | None = None
    rcpts: dict = field(default_factory=dict)  # address -> (code, text)
    data: tuple[int, str] | None = None  # the reply to the end of DATA
    dsn: bool = False  # the next hop took our DSN parameters
    remote: str | None = None


def _status_of(code: int, text: str) -> str:
    """The enhanced status code of a reply (from its text, or by class)."""
    m = _ENHANCED.match(text)
    if m and m.group(1) == str(code)[0]:
        return ".".join(m.groups())
    return f"{str(code)[0]}.0.0" if 200 <= code < 600 else "4.0.0"


def _smtp_diag(code: int, text: str) -> str:
    return f"smtp; {code} {' '.join(text.split())}"


def classify(outcome: Outcome, address: str) -> tuple[str, str, str]:
    """(SENT | FAILED | PENDING, enhanced status, diagnostic) for one
    recipient of an attempt: 5xx is permanent, 4xx and lost connections
    temporary."""
    if outcome.mail is not None and outcome.mail[0] >= 300:
        code, text = outcome.mail
        return (FAILED if code >= 500 else PENDING), _status_of(code, text), _smtp_diag(code, text)
    rcpt = outcome.rcpts.get(address)
    if rcpt is not None and rcpt[0] >= 300:
        code, text = rcpt
        return (FAILED if code >= 500 else PENDING), _status_of(code, text), _smtp_diag(code, text)
    if rcpt is not None and outcome.data is not None:
        code, text = outcome.data
        if code < 300:
            return SENT, _status_of(code, text), _smtp_diag(code, text)
        return (FAILED if code >= 500 else PENDING), _status_of(code, text), _smtp_diag(code, text)
    return PENDING, "4.4.1", f"X-mailguard; {outcome.error or 'delivery not completed'}"


def backoff(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after the C{attempts}-th failed attempt."""
    return min(retry_min * (2 ** max(attempts - 1, 0)), retry_max)


def directory_router(directory, gateway=None) -> Callable:
    """Where a DSN to C{address} goes: (local mailboxes, addresses to relay),
    or None when nothing can take it (an unknown or disabled local user).
    A domain the gateway handles goes to the back-end, like its mail."""

    def route(address: str):
        domain = address.rpartition("@")[2]
        if not domain:
            return None
        if gateway is not None and gateway.handles(domain):
            return (), (address,)
        if directory is None or not directory.is_local_domain(domain):
            return (), (address,)
        result = directory.lookup(address)
        status = getattr(result.status, "name", str(result.status)).upper()
        if status == "KNOWN":
            return tuple(result.mailboxes), tuple(getattr(result, "forwards", ()) or ())
        if status == "NOT_LOCAL":
            return (), (address,)
        return None

    return route


def client_tls(host: str, verify: bool = False, ca_file: str = ""):
    """The TLS client settings for STARTTLS to the relay host: no
    certificate check (opportunistic), or with C{verify} a check against
    C{ca_file} (or the platform's trust store) for C{host}."""
    from twisted.internet import ssl

    if not verify:
        return ssl.CertificateOptions()
    if ca_file:
        with open(ca_file, "rb") as f:
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(host, trustRoot=trust)


def _describe(value) -> str:
    """A short, one-line description of an error (an SMTPClientError's
    reply, or the exception text)."""
    resp = getattr(value, "resp", None)
    if isinstance(resp, bytes):
        code = getattr(value, "code", -1)
        text = resp.decode("utf-8", "replace")
        if code and code > 0:
            text = f"{code} {text}"
    else:
        text = str(value) or value.__class__.__name__
    return " ".join(text.split())[:300]


# --- the queue ------------------------------------------------------------------

@implementer(IRelayQueue)
class RelayQueue(service.Service):
    """The durable relay queue and its runner.

    @param spool: the spool directory (the queue is ``SPOOL/queue``).
    @param clock: an C{IReactorTime} (the reactor; a C{Clock} in tests).
    @param run: runs blocking disk work (see L{mailguard.store.maildir}).
    @param relay_host: (host, port) of the next hop, or None.
    @param router: C{address -> (mailboxes, relay_addresses)} for a DSN's
        recipient, or None when it cannot be delivered (an unknown local
        user); by default everything is relayed.
    @param tls: TLS client settings for STARTTLS, or None for none.
    @param connect: C{factory -> Deferred[protocol]}; by default a
        C{HostnameEndpoint} to C{relay_host} on C{clock}.
    """

    name = "relay-queue"

    def __init__(self, spool: str, clock, *, run=run_inline, relay_host=None,
                 hostname: str = "localhost", lifetime: float = 432000.0,
                 retry_min: float = 300.0, retry_max: float = 14400.0,
                 concurrency: int = 10, router: Callable | None = None,
                 tls=None, tls_required: bool = False,
                 connect: Callable | None = None, timeout: float = 300.0,
                 connect_timeout: float = 30.0) -> None:
        self.spool = spool
        self.dir = os.path.join(spool, "queue")
        self.active = os.path.join(self.dir, "active")
        self.tmp = os.path.join(self.dir, "tmp")
        makedirs_durable(self.active)
        makedirs_durable(self.tmp)
        self.clock = clock
        self.run = run
        self.relay_host = relay_host
        self.hostname = hostname
        self.lifetime = float(lifetime)
        self.retry_min = max(float(retry_min), 1.0)
        self.retry_max = max(float(retry_max), self.retry_min)
        self.concurrency = max(int(concurrency), 1)
        self.router = router
        self.tls = tls
        self.tls_required = bool(tls_required)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._connect = connect or self._connect_relay_host
        self.entries: dict[str, QueueEntry] = {}
        self.store = None
        self.syncer = DirSyncer()
        self._ready: deque[QueueEntry] = deque()
        self._workers: set[_Worker] = set()
        self._timer = None
        self._down_until = 0.0
        self._down_reason = ""
        self._busy: set[defer.Deferred] = set()
        self._loaded = False
        self._pumping = False
        self._pump_again = False

    @property
    def relay_name(self) -> str | None:
        return self.relay_host[0] if self.relay_host else None

    def attach(self, store) -> None:
        """Called by L{mailguard.store.maildir.MaildirStore}: DSNs are stored
        through it, and directory fsyncs are shared with it."""
        self.store = store
        self.syncer = store.syncer

    def eml_path(self, id: str) -> str:
        return os.path.join(self.active, id + ".eml")

    def env_path(self, id: str) -> str:
        return os.path.join(self.active, id + ".env")

    # -- start-up ----------------------------------------------------------------------
    def recover(self) -> int:
        """Load the queue from disk (blocking; at start-up).  Removes what a
        crash left half-done; returns how many files were removed."""
        removed = 0
        for name in os.listdir(self.tmp):
            try:
                os.unlink(os.path.join(self.tmp, name))
                removed += 1
            except OSError:
                pass
        names = set(os.listdir(self.active))
        self.entries = {}
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
                self.entries[entry.id] = entry
        if removed:
            fsync_dir(self.active)
        self._loaded = True
        return removed

    def startService(self) -> None:
        super().startService()
        if not self._loaded:
            self.recover()
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

    # -- acceptance (called by the store) -------------------------------------------------
    def add_file(self, path: str, envelope: Envelope):
        """Runs in the commit thread: make C{path} (fsynced) a queue entry
        for C{envelope.relay_recipients}.  Returns (entry, names created,
        directories to fsync before the 250)."""
        mp = {k.upper(): v for k, v in (envelope.mail_params or {}).items()}
        rcpts = []
        for address in dict.fromkeys(envelope.relay_recipients):
            params = {k.upper(): v for k, v in (envelope.rcpt_params.get(address) or {}).items()}
            try:
                notify = dsn.parse_notify(params.get("NOTIFY"))
            except ValueError:
                notify = None
            rcpts.append(Recipient(address, None if notify is None else list(notify), params.get("ORCPT")))
        entry = QueueEntry(
            id=envelope.message_id,
            sender=envelope.mail_from,
            recipients=rcpts,
            arrival=self.clock.seconds(),
            size=os.stat(path).st_size,
            envid=mp.get("ENVID"),
            ret=(mp.get("RET") or "").upper() or None,
            body=(mp.get("BODY") or "").upper() or None,
            client_ip=envelope.client_ip,
        )
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
        """Runs in a thread: C{data} in a new, fsynced file in ``tmp/``."""
        tmp = os.path.join(self.tmp, f"{id}.{next(_tmp_counter)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def enqueued(self, entry: QueueEntry) -> None:
        """The entry is durable: schedule its first attempt now."""
        entry.next_attempt = self.clock.seconds()
        self.entries[entry.id] = entry
        self._pump()

    def local_notices(self, path: str, envelope: Envelope) -> list:
        """Runs in the commit thread: success DSNs (NOTIFY=SUCCESS) for local
        recipients, as [(Envelope, bytes)], to be stored after the commit."""
        relay = set(envelope.relay_recipients)
        mailboxes = {m.lower() for m in envelope.mailboxes}
        reports = []
        for address, params in (envelope.rcpt_params or {}).items():
            if address in relay:
                continue
            params = {k.upper(): v for k, v in (params or {}).items()}
            try:
                notify = dsn.parse_notify(params.get("NOTIFY"))
            except ValueError:
                continue
            if not dsn.wants(notify, "SUCCESS"):
                continue
            action = "delivered" if address.lower() in mailboxes else "expanded"
            reports.append(dsn.RecipientReport(address, action, "2.0.0", params.get("ORCPT")))
        if not reports:
            return []
        env = self._notice_envelope(envelope.mail_from, envelope.mail_params.get("BODY"))
        if env is None:
            return []
        with open(path, "rb") as f:
            original = f.read()
        now = self.clock.seconds()
        data = dsn.build_report(hostname=self.hostname, to=envelope.mail_from, recipients=reports,
                                original=original, headers_only=True, now=now,
                                message_id=f"{env.message_id}@{self.hostname}",
                                envid=envelope.mail_params.get("ENVID"), arrival=now)
        return [(env, data)]

    def _notice_envelope(self, to: str, body: str | None = None) -> Envelope | None:
        route = self.router(to) if self.router is not None else ((), (to,))
        if route is None:
            log.warn("delivery notification to <{to}> discarded: no such mailbox", to=to)
            return None
        mailboxes, relay = route
        if not mailboxes and not relay:
            return None
        params = {"BODY": "8BITMIME"} if (body or "").upper() == "8BITMIME" else {}
        return Envelope(mail_from="", mailboxes=tuple(mailboxes), relay_recipients=tuple(relay),
                        mail_params=params, message_id=new_message_id())

    # -- ETRN ------------------------------------------------------------------------------
    def kick(self, domain: str | None = None) -> int:
        """Start a queue run now (ETRN): entries with a pending recipient in
        C{domain} ("@domain": that domain and its subdomains; None: all)
        become due.  Returns how many."""
        subdomains = False
        if domain:
            domain = domain.lower().rstrip(".")
            if domain.startswith("@"):
                subdomains, domain = True, domain[1:]

        def matches(d: str) -> bool:
            if domain is None or domain == "":
                return True
            return d == domain or (subdomains and d.endswith("." + domain))

        now = self.clock.seconds()
        n = 0
        for entry in self.entries.values():
            if any(matches(r.domain) for r in entry.pending()):
                entry.next_attempt = min(entry.next_attempt, now)
                n += 1
        if n:
            self._down_until = 0.0
            self._pump()
        return n

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
                      if not e.in_flight and not e.queued and e.next_attempt <= now and e.pending()),
                     key=lambda e: (e.next_attempt, e.arrival))
        if self.relay_host is None:
            for e in due:
                e.in_flight = True
                self._finish(e, Outcome(error="no relay host configured (--relay-host)"))
        elif due and now < self._down_until:
            for e in due:
                e.in_flight = True
                self._finish(e, Outcome(error=f"delivery temporarily suspended: {self._down_reason}"))
        else:
            for e in due:
                e.queued = True
                self._ready.append(e)
        # One more connection per ready entry that no connection being set
        # up will take (busy connections take more when they finish).
        while len(self._workers) < self.concurrency and \
                len(self._ready) > sum(1 for w in self._workers if w.fresh):
            _Worker(self, use_tls=self.tls is not None).start()
        self._arm()

    def _arm(self) -> None:
        waiting = [e.next_attempt for e in self.entries.values()
                   if not e.in_flight and not e.queued and e.pending()]
        if waiting and self.running:
            delay = max(min(waiting) - self.clock.seconds(), 0.0)
            self._timer = self.clock.callLater(delay, self._pump)

    def _host_down(self, reason: str) -> None:
        """The relay host cannot be reached: defer what is ready."""
        self._down_until = self.clock.seconds() + self.retry_min
        self._down_reason = reason
        log.warn("relay host {host} unreachable ({reason}): deliveries suspended for {s:.0f} s",
                 host=self.relay_name, reason=reason, s=self.retry_min)
        while self._ready:
            e = self._ready.popleft()
            e.queued = False
            if e.in_flight or not e.pending():
                continue
            e.in_flight = True
            self._finish(e, Outcome(error=reason))

    def _connect_relay_host(self, factory):
        from twisted.internet.endpoints import HostnameEndpoint

        host, port = self.relay_host
        return HostnameEndpoint(self.clock, host, port, timeout=self.connect_timeout).connect(factory)

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._busy.add(d)
        d.addBoth(lambda r: (self._busy.discard(d), r)[1])
        return d

    # -- results ---------------------------------------------------------------------------
    def _finish(self, entry: QueueEntry, outcome: Outcome) -> None:
        """Record one attempt: mark recipients, write DSNs, then the new
        state (DSNs first: a crash in between repeats a DSN, never loses
        one), then run what is due."""
        now = self.clock.seconds()
        before = copy.deepcopy(entry.recipients)
        before_times = (entry.attempts, entry.next_attempt, entry.last_attempt)
        entry.attempts += 1
        entry.last_attempt = now
        expired = now >= entry.arrival + self.lifetime
        failed: list[dsn.RecipientReport] = []
        relayed: list[dsn.RecipientReport] = []
        for r in entry.pending():
            state, status, diag = classify(outcome, r.address)
            r.status, r.diagnostic = status, diag
            remote = outcome.remote if diag.startswith("smtp;") else None
            if state == SENT:
                r.state = SENT
                log.info("relay {id} to <{rcpt}> via {host}: sent ({diag})", id=entry.id,
                         rcpt=r.address, host=self.relay_name, diag=diag)
                if not outcome.dsn and dsn.wants(r.notify, "SUCCESS"):
                    relayed.append(dsn.RecipientReport(r.address, "relayed", "2.0.0", r.orcpt,
                                                       diag, remote, now))
                continue
            if state == PENDING and not expired:
                log.info("relay {id} to <{rcpt}>: deferred ({diag})", id=entry.id,
                         rcpt=r.address, diag=diag)
                continue
            if state == PENDING:
                r.status = "4.4.7"
                diag = f"{diag} (delivery time expired)"
            r.state = FAILED
            log.info("relay {id} to <{rcpt}>: bounced ({diag})", id=entry.id, rcpt=r.address, diag=diag)
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
            if not entry.pending():
                self.entries.pop(entry.id, None)
            self._pump()

        d.addErrback(failed_to_store)
        d.addBoth(done)
        self._track(d)

    def _notify(self, entry: QueueEntry, reports, headers_only: bool) -> defer.Deferred:
        env = self._notice_envelope(entry.sender, entry.body)
        if env is None or self.store is None:
            return defer.succeed(None)
        eml = self.eml_path(entry.id)
        hostname, now = self.hostname, self.clock.seconds()

        def produce() -> bytes:
            with open(eml, "rb") as f:
                original = f.read()
            return dsn.build_report(hostname=hostname, to=entry.sender, recipients=reports,
                                    original=original, headers_only=headers_only, now=now,
                                    message_id=f"{env.message_id}@{hostname}",
                                    envid=entry.envid, arrival=entry.arrival)

        d = self.store.inject(env, produce)
        d.addCallback(lambda _: log.info("DSN {dsn} ({action}) for {id} to <{to}> stored", dsn=env.message_id,
                                         action=reports[0].action, id=entry.id, to=entry.sender))
        return d

    def _persist(self, entry: QueueEntry) -> defer.Deferred:
        if entry.pending():
            return self.run(self._rewrite, entry.id, entry.to_json())
        return self.run(self._remove, entry.id)

    def _rewrite(self, id: str, data: bytes) -> None:
        """Runs in a thread: the entry's new state, durably."""
        os.rename(self._write_tmp(id, data), self.env_path(id))
        self.syncer.sync(self.active)

    def _remove(self, id: str) -> None:
        """Runs in a thread: the entry is finished.  (The directory fsync
        keeps a crash from bringing it back to be sent twice.)"""
        for path in (self.env_path(id), self.eml_path(id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.syncer.sync(self.active)


# --- the SMTP client ------------------------------------------------------------------

class _Worker:
    """One connection to the relay host, delivering ready entries in turn."""

    def __init__(self, queue: RelayQueue, use_tls: bool) -> None:
        self.queue = queue
        self.use_tls = use_tls
        self.proto: RelayClient | None = None
        self._ended = False
        self._aborted = False
        self.fresh = True  # has not asked for an entry yet

    def start(self) -> None:
        self.queue._workers.add(self)
        factory = _RelayClientFactory(self)
        d = defer.maybeDeferred(self.queue._connect, factory)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, proto) -> None:
        self.proto = proto
        if self._aborted:
            proto.transport.abortConnection()

    def _connect_failed(self, failure) -> None:
        self._end(f"connect to {self.queue.relay_name}: {_describe(failure.value)}")

    def abort(self) -> None:
        self._aborted = True
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abortConnection()

    def next_entry(self) -> QueueEntry | None:
        self.fresh = False
        if self._aborted or not self.queue.running:
            return None
        ready = self.queue._ready
        while ready:
            entry = ready.popleft()
            entry.queued = False
            if entry.in_flight or not entry.pending():
                continue
            entry.in_flight = True
            return entry
        return None

    def done(self, entry: QueueEntry, outcome: Outcome) -> None:
        if self._aborted and not self.queue.running:
            entry.in_flight = False  # shutting down: the disk keeps the old state
            return
        self.queue._finish(entry, outcome)

    def closed(self, proto: "RelayClient") -> None:
        if proto.tls_failed and not self.queue.tls_required and self.use_tls and not self._aborted:
            # Opportunistic TLS failed in the handshake: once more in clear.
            log.warn("STARTTLS to {host} failed ({why}); retrying without TLS",
                     host=self.queue.relay_name, why=proto.error)
            self.use_tls = False
            self.proto = None
            factory = _RelayClientFactory(self)
            d = defer.maybeDeferred(self.queue._connect, factory)
            d.addCallbacks(self._connected, self._connect_failed)
            return
        if not proto.session_ready and not self._aborted:
            self._end(proto.error or "connection closed before the first transaction")
        else:
            self._end(None)

    def _end(self, host_error: str | None) -> None:
        if self._ended:
            return
        self._ended = True
        self.fresh = False
        self.queue._workers.discard(self)
        if self._aborted or not self.queue.running:
            return
        if host_error is not None:
            self.queue._host_down(host_error)
        self.queue._pump()


class _RelayClientFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def buildProtocol(self, addr):
        q = self.worker.queue
        p = RelayClient(self.worker, q.hostname, q.tls if self.worker.use_tls else None,
                        q.tls_required, q.timeout)
        p.factory = self
        return p


def skip_return_path(f) -> None:
    """Position C{f} after a leading ``Return-Path:`` line: it records final
    delivery here and must not travel to the next hop (RFC 5321 4.4)."""
    first = f.readline()
    if not first.lower().startswith(b"return-path:"):
        f.seek(0)


class RelayClient(smtp.ESMTPClient):
    """An ESMTP client that delivers queue entries, one transaction each,
    until its worker has no more; records every reply per recipient.

    Subclasses ``twisted.mail.smtp.ESMTPClient`` for the greeting, EHLO
    (HELO fallback), STARTTLS and timeouts; the transaction itself is its
    own, because the inherited one loses per-recipient replies, cannot send
    ESMTP parameters (SIZE, BODY, DSN) and converts LF to CRLF in a message
    that is already CRLF.
    """

    debug = True
    heloFallback = True
    requireAuthentication = False

    def __init__(self, worker: _Worker, identity: str, context, require_tls: bool,
                 timeout: float | None) -> None:
        smtp.ESMTPClient.__init__(self, None, context, identity, logsize=20)
        self.worker = worker
        self.requireTransportSecurity = require_tls
        self.timeout = timeout
        self.extensions: dict[bytes, bytes | None] = {}
        self.entry: QueueEntry | None = None
        self.outcome: Outcome | None = None
        self.error: str | None = None
        self.transactions = 0
        self.session_ready = False  # greeting, EHLO (and STARTTLS) done
        self.tls_started = False
        self.tls_failed = False
        self._items: dict = {}
        self._file = None
        self._line_start = True
        self._closed = False

    # -- session set-up (inherited states, a few corrections) ------------------------
    def connectionMade(self):
        # The end of DATA is a small write right after the message: with
        # Nagle's algorithm it waits for the peer's delayed ACK (40 ms).
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)
        smtp.ESMTPClient.connectionMade(self)

    def esmtpState_serverConfig(self, code, resp):
        items = {}
        for line in resp.splitlines():
            e = line.split(None, 1)
            if e:
                items[e[0].upper()] = e[1] if len(e) > 1 else None
        self._items = items
        self.extensions = items
        self.tryTLS(code, resp, items)

    def smtpState_helo(self, code, resp):
        # EHLO refused: plain SMTP.  (The inherited state would send HELO
        # again and again if HELO were refused too.)
        self.extensions = {}
        self.sendLine(b"HELO " + self.identity)
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = self.smtpConnectionFailed

    def esmtpState_starttls(self, code, resp):
        try:
            self.transport.startTLS(self.context)
        except Exception as e:  # a broken context: no plain-text retry here
            self.tls_failed = True
            self._fail(f"STARTTLS: {e}")
            return
        self.tls_started = True
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def esmtpTLSFailed(self, code=-1, resp=None):
        # The server refused STARTTLS (after offering it).
        if self.requireTransportSecurity:
            return smtp.ESMTPClient.esmtpTLSFailed(self, code, resp)
        log.info("relay host refused STARTTLS ({code}); continuing without TLS", code=code)
        self.authenticate(code, resp, self._items)

    def esmtpTLSRequired(self, code=-1, resp=None):
        self._fail("relay host does not offer STARTTLS and RelayHostTlsVerify=1")

    def sendError(self, exc):
        self._fail(_describe(exc))

    def timeoutConnection(self):
        self._fail("timeout waiting for the relay host")

    # -- transactions -------------------------------------------------------------------
    def smtpState_from(self, code, resp):
        self.session_ready = True
        entry = self.worker.next_entry()
        if entry is None:
            self._disconnectFromServer()
            return
        self.transactions += 1
        self.entry = entry
        ext = self.extensions
        self.outcome = Outcome(dsn=b"DSN" in ext, remote=self.worker.queue.relay_name)
        try:
            self._file = open(self.worker.queue.eml_path(entry.id), "rb")
            skip_return_path(self._file)
        except OSError as e:
            self.outcome.error = f"cannot read the queued message: {e.strerror}"
            self._entry_done()
            self._next_transaction()
            return
        params = []
        if b"SIZE" in ext:
            params.append(f"SIZE={entry.size}")
        if entry.body == "8BITMIME" and b"8BITMIME" in ext:
            params.append("BODY=8BITMIME")
        if self.outcome.dsn:
            if entry.ret:
                params.append(f"RET={entry.ret}")
            if entry.envid:
                params.append(f"ENVID={entry.envid}")
        self._rcpts = iter(entry.pending())
        self._accepted = 0
        self._last_rcpt = None
        self._send_command(f"MAIL FROM:<{entry.sender}>", params, self._mail_reply)

    def _send_command(self, command: str, params, handler) -> None:
        line = " ".join([command, *params])
        self._expected = range(0, 1000)  # every reply goes to the handler
        self._okresponse = handler
        self._failresponse = handler
        self.sendLine(line.encode("utf-8"))

    @staticmethod
    def _text(resp) -> str:
        if isinstance(resp, bytes):
            resp = resp.decode("utf-8", "replace")
        return " ".join(str(resp).split())

    def _mail_reply(self, code, resp):
        if code >= 300:
            self.outcome.mail = (code, self._text(resp))
            self._entry_done()
            return self._reset()
        self._next_rcpt()

    def _next_rcpt(self) -> None:
        r = next(self._rcpts, None)
        if r is None:
            if self._accepted:
                self._send_command("DATA", [], self._data_reply)
            else:
                self._entry_done()
                self._reset()
            return
        self._last_rcpt = r
        params = []
        if self.outcome.dsn:
            if r.notify is not None:
                params.append("NOTIFY=" + (",".join(r.notify) if r.notify else "NEVER"))
            if r.orcpt:
                params.append(f"ORCPT={r.orcpt}")
        self._send_command(f"RCPT TO:<{r.address}>", params, self._rcpt_reply)

    def _rcpt_reply(self, code, resp):
        self.outcome.rcpts[self._last_rcpt.address] = (code, self._text(resp))
        if code < 300:
            self._accepted += 1
        self._next_rcpt()

    def _data_reply(self, code, resp):
        if code != 354:
            self.outcome.data = (code if code >= 400 else 451, self._text(resp))
            self._entry_done()
            return self._reset()
        self._line_start = True
        sender = basic.FileSender()
        d = sender.beginFileTransfer(self._file, self.transport, self.transformChunk)
        d.addCallbacks(self.finishedFileTransfer,
                       lambda f: self._fail(f"sending the message: {_describe(f.value)}"))
        self._expected = range(0, 1000)
        self._okresponse = self._end_of_data
        self._failresponse = self._end_of_data

    def transformChunk(self, chunk: bytes) -> bytes:
        """Dot-stuff a chunk of a CRLF message (it is stored with CRLF
        line ends already; a leading dot may follow a chunk boundary)."""
        self.resetTimeout()
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        chunk = chunk.replace(b"\n.", b"\n..")
        self._line_start = chunk.endswith(b"\n")
        return chunk

    def _end_of_data(self, code, resp):
        self.outcome.data = (code, self._text(resp))
        self._entry_done()
        self._next_transaction()

    def _entry_done(self) -> None:
        entry, outcome = self.entry, self.outcome
        self.entry = self.outcome = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if entry is not None:
            self.worker.done(entry, outcome)

    def _reset(self) -> None:
        """After an aborted transaction: RSET, then the next one."""
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = lambda code, resp: self._fail(f"RSET refused: {code}")
        self.sendLine(b"RSET")

    def _next_transaction(self) -> None:
        self.smtpState_from(250, b"")

    # -- failures -----------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self.entry is not None:
            self.outcome.error = reason
            self._entry_done()
        if self.transport is not None and not self._closed:
            self.transport.abortConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        smtp.ESMTPClient.connectionLost(self, reason)
        self._closed = True
        if self.tls_started and not self._tls_ehlo_done and self.error is None:
            self.tls_failed = True
            self.error = f"TLS handshake failed: {_describe(reason.value)}"
        if self.entry is not None:
            self.outcome.error = self.error or f"connection lost: {_describe(reason.value)}"
            self._entry_done()
        if self.error is None and not self.session_ready:
            self.error = f"connection closed: {_describe(reason.value)}"
        self.worker.closed(self)

    _tls_ehlo_done = False

    def tryTLS(self, code, resp, items):
        if self.tls_started:
            self._tls_ehlo_done = True
        smtp.ESMTPClient.tryTLS(self, code, resp, items)
