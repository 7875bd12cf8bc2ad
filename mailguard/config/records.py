"""The record types of a Kerio configuration, as read from the files.

These are plain values with the place they were read from, so every later
check can point at the line.  ``mailguard.config.settings`` builds them; the IP groups
(``mailguard.policy.ipgroups``) and the user directory (``mailguard.policy.directory``) are
built from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailguard.config.problems import NOWHERE, Where


@dataclass(frozen=True)
class DomainRecord:
    name: str  # lower case, no trailing dot
    aliases: tuple[str, ...] = ()  # lower case domain aliases
    where: Where = NOWHERE


@dataclass(frozen=True)
class IpGroupRow:
    group: str
    address: str  # "1.2.3.4", "10.0.0.0/8", "A-B", "::1", "group:NAME"
    enabled: bool = True
    description: str = ""
    where: Where = NOWHERE


@dataclass(frozen=True)
class UserRecord:
    name: str  # local part as written
    domain: str  # lower case
    password: str | None = None  # plain text, "SHA:..." or another form
    enabled: bool = True
    aliases: tuple[str, ...] = ()  # extra local parts (or full addresses)
    where: Where = NOWHERE

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"


@dataclass(frozen=True)
class AliasRecord:
    name: str  # local part
    domain: str
    deliver_to: tuple[str, ...] = ()  # addresses (local or not) or local parts
    where: Where = NOWHERE

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"
