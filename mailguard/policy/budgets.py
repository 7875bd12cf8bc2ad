"""What one client address may do across its connections, as plain objects.

A session's own limits (``SmtpMaxErrors``, ``SmtpMaxAuthFailures``...) end
with the connection; an attacker opens another.  The objects here keep
count per client address across connections, in the manner of Postfix's
``anvil``, for the abuse an address repeats:

- L{FailureBudget}: at most C{limit} failures within any C{window} seconds;
  the failure that reaches the limit locks the address out for C{window}
  seconds (failed AUTH, client errors);
- L{RateLimit}: at most C{limit} events per C{window} (connections,
  messages), estimated over a sliding window;
- L{ClientLimits}: the four of them for one server, and the decisions the
  session and the protocol ask, answered with values.

They count per L{client_key}: an IPv4 address, or an IPv6 address's /64
(one subscriber gets a whole /64 and can use every address in it).  Time
comes from an injected clock (C{seconds()}); nothing here does I/O.  The
limits are passed with each question, not kept, so a configuration
reload changes them without forgetting what was counted: one
L{ClientLimits} lives as long as the process.  Memory is bounded: each
table keeps at most C{max_keys} addresses, the least recently seen
dropped first.

Also here, because they are budgets too: L{DataDeadline} (how long a
message may take to arrive) and L{descriptor_plan} (how many connections
the open-file limit allows).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Callable

from mailguard import replies
from mailguard.policy.session import Session
from mailguard.replies import Reply

__all__ = ["EXEMPT_SESSIONS", "ClientLimits", "DataDeadline", "DescriptorPlan", "FailureBudget", "Limited",
           "RateLimit", "client_key", "descriptor_plan", "descriptor_reserve"]

RATE_WINDOW = 60.0  # seconds: the unit of the rate limits (Postfix's anvil_rate_time_unit)


def client_key(ip: str) -> str:
    """The address budgets are counted for: C{ip} itself for IPv4, its /64
    for IPv6 (``2001:db8:1:2::/64``)."""
    if ":" not in ip:
        return ip
    try:
        net = ipaddress.IPv6Network((ip, 64), strict=False)
    except ValueError:
        return ip
    return str(net)


class _Table:
    """A dict of per-key state, at most C{max_keys} long; the least
    recently used key goes first."""

    __slots__ = ("clock", "max_keys", "_state")

    def __init__(self, clock, max_keys: int) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._state: dict[str, list] = {}

    def _get(self, key: str) -> list | None:
        entry = self._state.pop(key, None)
        if entry is not None:
            self._state[key] = entry  # most recently used
        return entry

    def _put(self, key: str, entry: list) -> list:
        state = self._state
        state[key] = entry
        while len(state) > self.max_keys:
            del state[next(iter(state))]
        return entry

    def __len__(self) -> int:
        return len(self._state)


class FailureBudget(_Table):
    """At most C{limit} failures per key within any C{window} seconds.

    The failure that reaches the limit starts a lock-out of C{window}
    seconds and clears the count: an address that keeps failing gets at
    most C{limit} tries per C{window}, however many connections it
    spreads them over.  Exact: a key keeps the times of its failures in
    the window (at most C{limit} of them).  C{limit} 0 is no budget.
    """

    __slots__ = ()

    def __init__(self, clock, max_keys: int = 10_000) -> None:
        super().__init__(clock, max_keys)

    def locked(self, key: str) -> float:
        """Seconds left of C{key}'s lock-out, or 0."""
        entry = self._state.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry[0] - self.clock.seconds())

    def spend(self, key: str, limit: int, window: float) -> bool:
        """One failure of C{key}; True if it started a lock-out.  A
        C{limit} or C{window} of 0 counts nothing."""
        if limit <= 0 or window <= 0:
            return False
        now = self.clock.seconds()
        entry = self._get(key) or self._put(key, [0.0, []])
        times = entry[1]
        while times and times[0] <= now - window:
            del times[0]
        times.append(now)
        if len(times) < limit:
            return False
        entry[0] = now + window
        times.clear()
        return True

    def count(self, key: str, window: float) -> int:
        """Failures of C{key} within the last C{window} seconds (0 just
        after a lock-out began)."""
        entry = self._state.get(key)
        if entry is None:
            return 0
        since = self.clock.seconds() - window
        return sum(1 for t in entry[1] if t > since)

    def forgive(self, key: str) -> None:
        """Forget C{key} (an exempt address that was counted)."""
        self._state.pop(key, None)


class RateLimit(_Table):
    """At most C{limit} events per key per C{window} seconds.

    The rate is estimated over a sliding window from two fixed ones (the
    current and the previous C{window}, the previous weighted by how much
    of it still overlaps): three numbers per key, whatever the rate.
    Refused events count too, so a client that keeps hammering stays
    refused.  C{limit} 0 is no limit (nothing is counted).
    """

    __slots__ = ()

    def __init__(self, clock, max_keys: int = 100_000) -> None:
        super().__init__(clock, max_keys)

    def hit(self, key: str, limit: int, window: float = RATE_WINDOW) -> bool:
        """One event of C{key}; True if it is over the limit."""
        if limit <= 0:
            return False
        now = self.clock.seconds()
        index = math.floor(now / window)
        entry = self._get(key) or self._put(key, [index, 0, 0])
        if entry[0] != index:
            entry[1] = entry[2] if entry[0] == index - 1 else 0
            entry[2] = 0
            entry[0] = index
        entry[2] += 1
        overlap = 1.0 - (now - index * window) / window
        return entry[1] * overlap + entry[2] > limit


@dataclass(frozen=True)
class Limited:
    """A per-address limit refused something: the reply, and the
    security-log event and its fields."""

    reply: Reply
    event: str
    fields: dict = field(default_factory=dict)


class ClientLimits:
    """Every per-address budget of one server; lives as long as the
    process (a reload must not forget a brute-force attacker).

    Each question takes the session facts, the configuration in force, and
    C{exempt}: a callable that says whether the client is exempt from
    per-address limits (the relay IP group and the greeting-delay
    exceptions: L{mailguard.policy.rules.connection_limit_exempt}).  It is
    called only when a limit would refuse, so the common path costs a
    counter update.
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self.auth = FailureBudget(clock)
        self.errors = FailureBudget(clock)
        self.connections = RateLimit(clock)
        self.messages = RateLimit(clock)

    def at_connect(self, session: Session, config, exempt: Callable[[Session], bool]) -> Limited | None:
        """A new connection: refused while the address is locked out for
        errors, or past ``SmtpConnectionRateLimit``."""
        key = client_key(session.client_ip)
        locked = self.errors.locked(key)
        if locked and not exempt(session):
            return Limited(replies.TOO_MANY_ERRORS_FROM_IP, "error-limit", {"locked": round(locked)})
        if self.connections.hit(key, config.connection_rate_limit) and not exempt(session):
            return Limited(replies.CONNECTION_RATE_LIMIT, "connection-rate",
                           {"limit": f"{config.connection_rate_limit}/min"})
        return None

    def at_mail(self, session: Session, config, exempt: Callable[[Session], bool]) -> Limited | None:
        """A MAIL command: refused past ``SmtpMessageRateLimit``."""
        key = client_key(session.client_ip)
        if self.messages.hit(key, config.message_rate_limit) and not exempt(session):
            return Limited(replies.MESSAGE_RATE_LIMIT, "message-rate",
                           {"limit": f"{config.message_rate_limit}/min"})
        return None

    def at_auth(self, session: Session, exempt: Callable[[Session], bool]) -> Limited | None:
        """An AUTH command: refused (``454 4.7.0``) while the address is
        locked out for failed AUTH.  Not logged: the lock-out was."""
        locked = self.auth.locked(client_key(session.client_ip))
        if locked and not exempt(session):
            return Limited(replies.AUTH_LOCKED_OUT, "", {"locked": round(locked)})
        return None

    def auth_failed(self, session: Session, config, exempt: Callable[[Session], bool]) -> Limited | None:
        """A failed AUTH: counted against ``SmtpMaxAuthFailuresPerIp``; the
        failure that reaches it starts the lock-out (returned, to log)."""
        return self._spend(self.auth, session, config.max_auth_failures_per_ip, config.per_ip_window, exempt,
                           replies.AUTH_LOCKED_OUT, "auth-lockout", "failures")

    def auth_failures(self, session: Session, config) -> int:
        """Failed AUTH from the address within ``SmtpPerIpWindow``."""
        return self.auth.count(client_key(session.client_ip), config.per_ip_window)

    def error(self, session: Session, config, exempt: Callable[[Session], bool]) -> Limited | None:
        """A client error: counted against ``SmtpMaxErrorsPerIp``; the error
        that reaches it locks the address out (returned: close the
        session)."""
        return self._spend(self.errors, session, config.max_errors_per_ip, config.per_ip_window, exempt,
                           replies.TOO_MANY_ERRORS_FROM_IP, "error-limit", "errors")

    @staticmethod
    def _spend(budget: FailureBudget, session: Session, limit: int, window: float, exempt, reply: Reply,
               event: str, counted: str) -> Limited | None:
        """One failure against C{budget}; the lock-out it starts, unless
        the client is exempt (then forgiven)."""
        key = client_key(session.client_ip)
        if not budget.spend(key, limit, window):
            return None
        if exempt(session):
            budget.forgive(key)
            return None
        return Limited(reply, event, {counted: limit, "window": f"{window:g}", "locked": f"{window:g}"})


class DataDeadline:
    """How long a message may take to arrive: Postfix's
    ``smtpd_min_data_rate`` model, so that bytes cannot hold a session.

    The deadline starts C{timeout} seconds after DATA; each read of N
    octets moves it N / C{min_rate} seconds later, never more than
    C{timeout} seconds ahead.  A sender faster than C{min_rate} octets per
    second never meets it; one slower loses time with every read and is
    cut off (a 1 octet/s sender after about C{timeout} seconds).
    C{min_rate} 0: each read moves the deadline C{timeout} seconds ahead
    (an idle timer).
    """

    __slots__ = ("timeout", "min_rate", "expires")

    def __init__(self, timeout: float, min_rate: int) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        self.expires = 0.0

    def start(self, now: float) -> float:
        self.expires = now + self.timeout
        return self.expires

    def received(self, octets: int, now: float) -> float:
        """The deadline after a read of C{octets} at C{now}."""
        if self.min_rate <= 0:
            return self.start(now)
        self.expires = min(self.expires + octets / self.min_rate, now + self.timeout)
        return self.expires


@dataclass(frozen=True)
class DescriptorPlan:
    """What to do about the open-file limit at start-up.

    @ivar soft: the soft limit to set (the current one if it cannot change).
    @ivar max_connections: the connection limit to use (``SmtpMaxConnections``,
        or fewer when the open-file limit cannot hold them).
    @ivar clamped: the configured limit was lowered (say so, once).
    @ivar fits: the most sessions the limit holds (what a reload may use).
    """

    soft: int
    max_connections: int
    clamped: bool
    fits: int


# Descriptors a session may hold: its socket, and the file of the message
# it is receiving.
PER_SESSION = 2
# Sessions of exempt clients (the relay IP group, the greeting-delay
# exceptions) allowed past SmtpMaxConnections, from the reserve.
EXEMPT_SESSIONS = 100
_OTHER = 64  # listeners, logs, the reactor, the thread pools, files being read


def descriptor_reserve(config) -> int:
    """Descriptors kept from the sessions: for exempt clients' sessions
    past the limit, the relay queue's connections (and the message each
    one reads), the gateway's connections, and the process itself."""
    return (PER_SESSION * EXEMPT_SESSIONS + 2 * config.queue_concurrency + config.gateway_connections
            + _OTHER)


def descriptor_plan(soft: int, hard: int, max_connections: int, reserve: int) -> DescriptorPlan:
    """Fit ``SmtpMaxConnections`` sessions and C{reserve} other descriptors
    (listeners, logs, the queue's connections, sessions of exempt clients
    past the limit) under the open-file limit: raise the soft limit to the
    hard one (so that a reload may raise the connection limit too), and
    lower the connection limit to what fits if it must.  C{max_connections}
    0 (no limit) is planned as the most that fits."""
    soft = max(soft, hard)
    fits = max(1, (soft - reserve) // PER_SESSION)
    if max_connections and max_connections <= fits:
        return DescriptorPlan(soft, max_connections, False, fits)
    return DescriptorPlan(soft, fits, bool(max_connections), fits)
