"""The context every session shares, and the connection counters.

``ServerContext`` holds what the sessions of all listeners share: the
configuration, the clock, the policy objects, the message store, the
security log, the TLS context and the connection counters.  Nothing here
imports the global reactor: tests pass a ``twisted.internet.task.Clock``.
It is apart from the factory so that the session state machine can name
it without importing the protocol.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import CertificateOptions

from mailguard import replies as R
from mailguard.config.settings import Configuration
from mailguard.interfaces import (
    IGreetingPolicy,
    IMessageStore,
    IPasswordChecker,
    IRecipientPolicy,
    IRelayQueue,
    ISecurityLog,
    ITrustPolicy,
    IVrfyPolicy,
)
from mailguard.policy.budgets import ClientLimits
from mailguard.policy.build import Policies
from mailguard.policy.rules import connection_limit_exempt
from mailguard.policy.session import Session
from mailguard.smtpd.stats import Stats

__all__ = ["Connections", "ServerContext"]


class Connections:
    """Counts open sessions, in total and per client IP; refuses past the
    configured limits with ``421 4.7.0`` (``SmtpMaxConnections``,
    ``SmtpMaxConnectionsPerIp``; 0 is no limit).

    The total limit protects the process (file descriptors, memory); the
    exempt (the relay IP group and the greeting-delay exceptions) may go
    C{exempt_reserve} sessions past it, on descriptors kept for them, so
    a flood of strangers cannot lock them out.  Who is exempt is the
    policy's decision (L{mailguard.policy.rules.connection_limit_exempt}),
    asked only when a limit would refuse, so the common path costs a
    counter increment.

    ``stopping`` is set when the reactor begins to shut down, so that the
    connections it then closes are not mistaken for clients that gave up
    waiting for the greeting.
    """

    def __init__(self, max_total: int, max_per_ip: int,
                 exempt: Callable[[Session], bool] = lambda session: False,
                 clock: IReactorTime | None = None) -> None:
        self.max_total = max_total
        self.exempt_reserve = 0  # set by the service from its descriptor plan
        self.descriptor_cap = 0  # the most sessions the open-file limit holds; 0: not known
        self.max_per_ip = max_per_ip
        self.exempt = exempt
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set = set()
        self.stopping = False
        self._clock = clock
        self._emptied: list[defer.Deferred] = []

    def open(self, key, session: Session) -> R.Reply | None:
        """Count the connection C{key} (its protocol), or the refusal."""
        if self._clock is not None:
            self._watch(self._clock)
        ip = session.client_ip
        if self.max_total and self.total >= self.max_total and not (
                self.total < self.max_total + self.exempt_reserve and self.exempt(session)):
            return R.TOO_MANY_CONNECTIONS
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip and not self.exempt(session):
            return R.TOO_MANY_FROM_IP
        self.total += 1
        self.per_ip[ip] += 1
        self.sessions.add(key)
        return None

    def fitted(self, wanted: int) -> int:
        """``SmtpMaxConnections`` C{wanted}, within what the open-file limit
        holds (a reload cannot raise it past that)."""
        cap = self.descriptor_cap
        return min(wanted or cap, cap) if cap else wanted

    def close(self, key, session: Session) -> None:
        if key not in self.sessions:
            return
        self.sessions.discard(key)
        self.total -= 1
        ip = session.client_ip
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        if not self.sessions and self._emptied:
            waiters, self._emptied = self._emptied, []
            for d in waiters:
                d.callback(None)

    def when_empty(self) -> defer.Deferred:
        """Fires once no connection is open (at once if none is)."""
        if not self.sessions:
            return defer.succeed(None)
        d = defer.Deferred()
        self._emptied.append(d)
        return d

    def stop(self) -> None:
        """The server is shutting down (a reactor "before shutdown" trigger)."""
        self.stopping = True

    def _watch(self, clock) -> None:
        """At the first connection, not before: a context that never
        serves adds no trigger to the reactor."""
        self._clock = None
        add_trigger = getattr(clock, "addSystemEventTrigger", None)  # not on task.Clock
        if add_trigger is not None:
            add_trigger("before", "shutdown", self.stop)


def _run_inline(f, *args):
    return defer.maybeDeferred(f, *args)


@dataclass
class ServerContext:
    """What every session of every listener shares.

    C{config} and C{policies} belong together (one configuration and what
    was built from it); the rest lives as long as the process."""

    config: Configuration
    clock: IReactorTime
    policies: Policies
    store: IMessageStore
    security_log: ISecurityLog
    tls: CertificateOptions | None = None  # STARTTLS / smtps, or None
    queue: IRelayQueue | None = None
    dsn: bool = False  # advertise and accept DSN parameters
    run_blocking: Callable[..., defer.Deferred] = _run_inline  # slow work (PBKDF2) off the reactor
    connections: Connections = field(default=None)  # type: ignore[assignment]
    stats: Stats = field(default_factory=Stats)  # the counters the metrics read
    # Per-address budgets across connections: made once per process (give
    # the same one to the context a reload builds).
    limits: ClientLimits = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.connections is None:
            self.connections = Connections(self.config.max_connections, self.config.max_connections_per_ip,
                                           self._limit_exempt, self.clock)
        if self.limits is None:
            self.limits = ClientLimits(self.clock)

    def renewed(self, config: Configuration, policies: Policies,
                tls: CertificateOptions | None = None) -> "ServerContext":
        """The next generation, for a configuration reload: the new
        configuration and policies (and TLS context, if given), with the
        long-lived pieces carried on -- the store, the queue, the security
        log, the connection counters (under the new limits) and the
        per-address budgets.  Sessions in
        progress keep the generation they started with."""
        new = replace(self, config=config, policies=policies, tls=self.tls if tls is None else tls)
        counters = self.connections
        counters.max_total, counters.max_per_ip = counters.fitted(config.max_connections), config.max_connections_per_ip
        counters.exempt = new._limit_exempt
        return new

    def _limit_exempt(self, session: Session) -> bool:
        return connection_limit_exempt(session, self.greeting, self.trust)

    def exempt(self, session: Session) -> bool:
        """Exempt from the per-address limits: the relay IP group and the
        greeting-delay exceptions."""
        return self._limit_exempt(session)

    @property
    def hostname(self) -> str:
        return self.config.hostname

    # The policies, by name, as the protocol asks them.
    @property
    def greeting(self) -> IGreetingPolicy:
        return self.policies.greeting

    @property
    def recipients(self) -> IRecipientPolicy:
        return self.policies.recipients

    @property
    def vrfy(self) -> IVrfyPolicy:
        return self.policies.vrfy

    @property
    def trust(self) -> ITrustPolicy:
        return self.policies.trust

    @property
    def passwords(self) -> IPasswordChecker | None:
        return self.policies.passwords
