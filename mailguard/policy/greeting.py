"""Kerio's spam repellent: how a new connection is greeted.

The decision is a plain value (``GreetingDecision``) made from the session
facts; the protocol carries it out with one delayed call on the factory's
clock.  Kerio applies the delay only to unsecured SMTP: the ``smtps`` and
``submission`` listeners are always greeted at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import implementer

from mailguard.interfaces import IGreetingPolicy


@dataclass(frozen=True)
class GreetingDecision:
    delay: float  # seconds; 0 greets at once
    teaser: bool = False  # send "220-" at once, the final "220 " after the delay
    reason: str = ""


GREET_NOW = GreetingDecision(0.0, False, "no delay")


class PassCache:
    """IPs that waited out the delay and completed a mail transaction are
    greeted at once for C{ttl} seconds (Postfix postscreen's greet TTL).

    Bounded: at most C{size} entries, least recently used evicted first, so
    a flood of addresses cannot grow it without limit.  A plain dict keeps
    the order (insertion order; a hit moves the entry to the end), about
    100 bytes per entry (key string, float, slot).  An entry is never
    extended by a hit or by another transaction: after C{ttl} the client
    waits out the delay once more, as with postscreen.
    """

    def __init__(self, clock, ttl: float, size: int) -> None:
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._expires: dict[str, float] = {}

    def add(self, ip: str) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        entries = self._expires
        entries.pop(ip, None)
        entries[ip] = self.clock.seconds() + self.ttl
        while len(entries) > self.size:
            del entries[next(iter(entries))]

    def __contains__(self, ip: str) -> bool:
        entries = self._expires
        expires = entries.pop(ip, None)
        if expires is None:
            return False
        if expires <= self.clock.seconds():
            return False  # expired: already removed
        entries[ip] = expires  # most recently used
        return True

    def __len__(self) -> int:
        return len(self._expires)


@implementer(IGreetingPolicy)
class GreetingPolicy:
    """Delay the greeting on the plain listener unless the client is exempt."""

    def __init__(self, delay: float, ip_groups, exceptions_group: str = "",
                 teaser: bool = False, pass_cache: PassCache | None = None) -> None:
        self.delay = delay
        self.ip_groups = ip_groups
        self.exceptions_group = exceptions_group
        self.teaser = teaser
        self.pass_cache = pass_cache

    def is_exception(self, session) -> bool:
        """The client is in ``SmtpGreetingDelayExceptions``: greeted at
        once, and not held to the per-IP connection limit either (see
        L{mailguard.policy.rules.connection_limit_exempt})."""
        return bool(self.exceptions_group) and self.ip_groups.contains(self.exceptions_group, session.client_ip)

    def _exempt(self, session) -> GreetingDecision | None:
        """The reason C{session} is greeted at once without the pass
        cache, or None if the delay applies to it."""
        if self.delay <= 0:
            return GREET_NOW
        if session.listener != "smtp":
            return GreetingDecision(0.0, False, f"{session.listener} listener is never delayed")
        if self.is_exception(session):
            return GreetingDecision(0.0, False, "in the exceptions IP group")
        return None

    def decide(self, session) -> GreetingDecision:
        exempt = self._exempt(session)
        if exempt is not None:
            return exempt
        if self.pass_cache is not None and session.client_ip in self.pass_cache:
            return GreetingDecision(0.0, False, "in the pass cache")
        return GreetingDecision(self.delay, self.teaser, "delayed")

    def passed(self, session) -> None:
        """Called after each stored message.  Only a client the delay
        applied to, and that is not already cached, enters the cache: an
        exempt client never needs it, and a cached one keeps its original
        expiry (it was greeted at once, so it did not wait this time)."""
        cache = self.pass_cache
        if cache is None or self._exempt(session) is not None:
            return
        if session.client_ip not in cache:
            cache.add(session.client_ip)
