"""Kerio's spam repellent: how a new connection is greeted.

The decision is a plain value (``GreetingDecision``) made from the session
facts; the protocol carries it out with one delayed call on the factory's
clock.  Kerio applies the delay only to unsecured SMTP: the ``smtps`` and
``submission`` listeners are always greeted at once.
"""

from __future__ import annotations

from collections import OrderedDict
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
    Bounded LRU so a flood of addresses cannot grow it without limit."""

    def __init__(self, clock, ttl: float, size: int) -> None:
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[str, float] = OrderedDict()

    def add(self, ip: str) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        self._entries[ip] = self.clock.seconds() + self.ttl
        self._entries.move_to_end(ip)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __contains__(self, ip: str) -> bool:
        expires = self._entries.get(ip)
        if expires is None:
            return False
        if expires <= self.clock.seconds():
            del self._entries[ip]
            return False
        return True

    def __len__(self) -> int:
        return len(self._entries)


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

    @classmethod
    def from_config(cls, config, clock) -> "GreetingPolicy":
        cache = None
        if config.greeting_pass_ttl > 0:
            cache = PassCache(clock, config.greeting_pass_ttl, config.greeting_pass_cache_size)
        return cls(config.greeting_delay, config.ip_groups,
                   config.greeting_delay_exceptions, config.greeting_teaser, cache)

    def decide(self, session) -> GreetingDecision:
        if self.delay <= 0:
            return GREET_NOW
        if session.listener != "smtp":
            return GreetingDecision(0.0, False, f"{session.listener} listener is never delayed")
        if self.exceptions_group and self.ip_groups.contains(self.exceptions_group, session.client_ip):
            return GreetingDecision(0.0, False, "in the exceptions IP group")
        if self.pass_cache is not None and session.client_ip in self.pass_cache:
            return GreetingDecision(0.0, False, "in the pass cache")
        return GreetingDecision(self.delay, self.teaser, "delayed")

    def passed(self, session) -> None:
        if self.pass_cache is not None and session.listener == "smtp":
            self.pass_cache.add(session.client_ip)
