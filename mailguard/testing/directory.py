"""A user directory from a plain mapping: the fake of L{IUserDirectory}.

It passes the same contract tests as the real directory
(C{tests/unit/policy/test_directory.py}), so a test that uses it tests real
behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from zope.interface import implementer

from mailguard.interfaces import IUserDirectory
from mailguard.policy.directory import Lookup, LookupStatus, normalise_domain, split_address

__all__ = ["FakeUserDirectory"]


@implementer(IUserDirectory)
class FakeUserDirectory:
    """A user directory from a plain mapping.

        FakeUserDirectory(
            {"john@example.com": "known", "old@example.com": "disabled"},
            domains=["example.com"],
            domain_aliases={"example.net": "example.com"},
        )

    @param users: address -> C{"known"} or C{"disabled"} (an account), or a
        L{Lookup} to answer for that address as it is (an alias, say).
        Addresses are matched case-insensitively.
    @param domains: the local (primary) domains; by default the domains of
        C{users}.
    @param domain_aliases: alias domain -> primary domain.
    """

    def __init__(
        self,
        users: Mapping[str, str | Lookup],
        domains: Iterable[str] | None = None,
        domain_aliases: Mapping[str, str] | None = None,
    ):
        self._entries: dict[str, Lookup] = {}
        self._accounts: list[str] = []
        for address, value in users.items():
            local, domain, _ = split_address(address)
            key = f"{local.lower()}@{domain}"
            if isinstance(value, Lookup):
                self._entries[key] = value
            elif value in ("known", "disabled"):
                status = LookupStatus.KNOWN if value == "known" else LookupStatus.DISABLED
                mailboxes = (key,) if value == "known" else ()
                self._entries[key] = Lookup(status, key, mailboxes)
                self._accounts.append(key)
            else:
                raise ValueError(f"{address}: expected 'known', 'disabled' or a Lookup")
        if domains is None:
            domains = dict.fromkeys(k.rpartition("@")[2] for k in self._entries)
        self._primaries = tuple(normalise_domain(d) for d in domains)
        self._domains = {d: d for d in self._primaries}
        for alias, primary in (domain_aliases or {}).items():
            self._domains[normalise_domain(alias)] = normalise_domain(primary)

    def is_local_domain(self, domain: str) -> bool:
        return normalise_domain(domain) in self._domains

    def canonical_domain(self, domain: str) -> str | None:
        return self._domains.get(normalise_domain(domain))

    def lookup(self, address: str) -> Lookup:
        local, domain, has_at = split_address(address)
        primary = self._domains.get(domain)
        if primary is None:
            if has_at and domain:
                return Lookup(LookupStatus.NOT_LOCAL, f"{local}@{domain}")
            normalised = f"{local.lower()}@{domain}" if has_at else local.lower()
            return Lookup(LookupStatus.UNKNOWN, normalised)
        found = self._entries.get(f"{local.lower()}@{primary}")
        if found is None:
            return Lookup(LookupStatus.UNKNOWN, f"{local.lower()}@{domain}")
        return found

    def __len__(self) -> int:
        return len(self._accounts)

    def domains(self) -> tuple[str, ...]:
        return self._primaries

    def users(self) -> Iterator[str]:
        return iter(self._accounts)


