"""What a configuration reload changes, told in one line.

Two configurations in, a L{Changes} value out: how many users, aliases,
domains and IP groups were added, removed or changed, and the names of
the settings whose value changed -- counts and names only, never a
password or an address, so the line can go to any log.

Some settings are not applied by a reload: the objects built from them
hold connections or files for the life of the process (the gateway's
pool and cache, the relay queue's TLS client).  L{RESTART_ONLY} lists
them; L{pinned} keeps their running values in the configuration a reload
installs, and L{Changes.restart} names those the files changed, so the
log says what waits for a restart.  Plain values in, values out: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from operator import attrgetter

from mailguard.config.settings import SCALARS, Configuration

__all__ = ["RESTART_ONLY", "Changes", "Counts", "diff", "pinned"]

#: Setting names a reload does not apply (docs/operations.md says why).
RESTART_ONLY = frozenset({
    "GatewayEnabled", "GatewayDomains", "GatewayBackend", "GatewayBindAddress",
    "GatewayConnections", "GatewayTimeout", "GatewayIdleTimeout",
    "GatewayCachePositiveTtl", "GatewayCacheNegativeTtl", "GatewayCacheSize",
    "RelayHostTlsVerify", "RelayHostTlsCaFile", "RelayHostBindAddress",
})
#: In gateway mode without GatewayDomains the Domain table says which
#: domains the back-end holds: named so in L{Changes.restart}.
GATEWAY_DOMAINS = "the gateway's domains (Domain table)"

_ATTR = {s.name: s.attr for s in SCALARS}


@dataclass(frozen=True)
class Counts:
    added: int = 0
    removed: int = 0
    changed: int = 0

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def __str__(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.added, "added"), (self.removed, "removed"),
                                               (self.changed, "changed")) if n]
        return ", ".join(parts) or "unchanged"


@dataclass(frozen=True)
class Changes:
    users: Counts = Counts()
    aliases: Counts = Counts()
    domains: Counts = Counts()
    groups: Counts = Counts()
    settings: tuple[str, ...] = ()  # changed, and applied
    restart: tuple[str, ...] = ()  # changed in the files, applied at the next restart

    def __bool__(self) -> bool:
        return bool(self.users or self.aliases or self.domains or self.groups or self.settings
                    or self.restart)

    def describe(self) -> str:
        """One line: what changed, or ``no change``."""
        parts = [f"{what} {counts}" for what, counts in (
            ("users", self.users), ("aliases", self.aliases), ("domains", self.domains),
            ("IP groups", self.groups)) if counts]
        if self.settings:
            parts.append("settings changed: " + ", ".join(self.settings))
        if self.restart:
            parts.append("changed but applied only at the next restart: " + ", ".join(self.restart))
        return "; ".join(parts) if parts else "no change"


_GETTERS: dict[type, attrgetter] = {}


def _values(record) -> tuple:
    """A record's content without the line it was read from."""
    get = _GETTERS.get(type(record))
    if get is None:
        names = [f.name for f in fields(record) if f.name != "where"]
        get = _GETTERS[type(record)] = attrgetter(*names)
    return get(record)


def _count(old: dict, new: dict) -> Counts:
    return Counts(
        added=sum(1 for k in new if k not in old),
        removed=sum(1 for k in old if k not in new),
        changed=sum(1 for k, v in new.items() if k in old and old[k] != v),
    )


def _groups(config: Configuration) -> dict[str, list]:
    out: dict[str, list] = {}
    for row in config.ip_group_rows:
        out.setdefault(row.group, []).append(_values(row))
    return {k: sorted(v) for k, v in out.items()}


def diff(old: Configuration, new: Configuration) -> Changes:
    """What going from C{old} (running) to C{new} (just read) changes."""
    def by_address(records):
        return {r.address.lower(): _values(r) for r in records}

    changed = [s.name for s in SCALARS if getattr(old, s.attr) != getattr(new, s.attr)]
    restart = [n for n in changed if n in RESTART_ONLY]
    if old.gateway_enabled and old.gateway_domain_names != new.gateway_domain_names \
            and "GatewayDomains" not in restart:
        restart.append(GATEWAY_DOMAINS)
    return Changes(
        users=_count(by_address(old.users), by_address(new.users)),
        aliases=_count(by_address(old.aliases), by_address(new.aliases)),
        domains=_count({d.name: _values(d) for d in old.domains}, {d.name: _values(d) for d in new.domains}),
        groups=_count(_groups(old), _groups(new)),
        settings=tuple(n for n in changed if n not in RESTART_ONLY),
        restart=tuple(restart),
    )


def pinned(new: Configuration, running: Configuration) -> Configuration:
    """C{new} with the C{running} values of the L{RESTART_ONLY} settings:
    the configuration a reload installs says what actually runs."""
    return replace(new, **{_ATTR[name]: getattr(running, _ATTR[name]) for name in RESTART_ONLY if name in _ATTR})
