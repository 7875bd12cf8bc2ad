"""The ESMTP factory and the context it injects into every session.

``ServerContext`` holds what the sessions of all listeners share: the
configuration, the clock, the policy objects, the message store, the
security log, the TLS context and the connection counters.  Each listener
has its own ``MailguardFactory`` (it knows which listener it is: the
greeting delay applies only to ``smtp``), all pointing at one context.
Nothing here imports the global reactor: tests pass a
``twisted.internet.task.Clock``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.mail import smtp

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
from mailguard.policy.build import Policies
from mailguard.smtpd.protocol import MailguardESMTP


class Connections:
    """Counts open sessions, in total and per client IP; refuses past the
    configured limits with ``421 4.7.0`` (``SmtpMaxConnections``,
    ``SmtpMaxConnectionsPerIp``; 0 is no limit).

    The total limit applies to everyone: it protects the process (file
    descriptors, memory).  The per-IP limit does not apply to trusted
    clients (the relay IP group) nor to the ``SmtpGreetingDelayExceptions``
    group, as Postfix exempts ``$mynetworks`` from its per-client limits:
    a gateway or a NATed office legitimately opens many connections.  The
    exemption is looked up only when the limit would refuse, so the common
    path costs a counter increment.

    ``stopping`` is set when the reactor begins to shut down, so that the
    connections it then closes are not mistaken for clients that gave up
    waiting for the greeting.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set = set()
        self.stopping = False
        self._watching = False

    def open(self, proto) -> R.Reply | None:
        if not self._watching:
            self._watch(proto.factory.context.clock)
        ip = proto.session.client_ip
        if self.max_total and self.total >= self.max_total:
            return R.TOO_MANY_CONNECTIONS
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip and not self._exempt(proto):
            return R.TOO_MANY_FROM_IP
        self.total += 1
        self.per_ip[ip] += 1
        self.sessions.add(proto)
        return None

    def close(self, proto) -> None:
        if proto not in self.sessions:
            return
        self.sessions.discard(proto)
        self.total -= 1
        ip = proto.session.client_ip
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    def stop(self) -> None:
        """The server is shutting down (a reactor "before shutdown" trigger)."""
        self.stopping = True

    def _watch(self, clock) -> None:
        self._watching = True
        add_trigger = getattr(clock, "addSystemEventTrigger", None)  # not on task.Clock
        if add_trigger is not None:
            add_trigger("before", "shutdown", self.stop)

    @staticmethod
    def _exempt(proto) -> bool:
        ctx = proto.factory.context
        session = proto.session
        group = ctx.config.greeting_delay_exceptions
        if group and ctx.policies.ip_groups.contains(group, session.client_ip):
            return True
        return bool(ctx.trust.is_trusted(session))


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

    def __post_init__(self) -> None:
        if self.connections is None:
            self.connections = Connections(self.config.max_connections, self.config.max_connections_per_ip)

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


class MailguardFactory(smtp.SMTPFactory):
    """Builds a L{MailguardESMTP} per connection of one listener."""

    protocol = MailguardESMTP
    noisy = False

    def __init__(self, context: ServerContext, listener: str = "smtp") -> None:
        if listener not in ("smtp", "smtps", "submission"):
            raise ValueError(f"unknown listener kind {listener!r}")
        self.context = context
        self.listener = listener

    def buildProtocol(self, addr):
        return self.protocol(self)
