"""Building the user directory from configuration records.

Everything is resolved here, once, so that a lookup in
L{mailguard.policy.directory.UserDirectory} is a few string operations and
two dict probes: domain aliases, user aliases, alias records (chains
flattened by L{mailguard.policy.aliasgraph}), wildcard aliases, and every
problem on the way, reported with its C{FILE:LINE} instead of raised.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from mailguard.config.problems import Problem, Where
from mailguard.config.records import AliasRecord, DomainRecord, UserRecord
from mailguard.policy.aliasgraph import flatten
from mailguard.policy.directory import (
    DISABLED,
    KNOWN,
    UNKNOWN,
    Lookup,
    UserDirectory,
    unquote_local,
    maildir_dirs,
    normalise_domain,
    split_address,
)


def _is_wildcard(name: str) -> bool:
    return "*" in name or "?" in name


def _compile_wildcard(name: str):
    """Kerio's alias wildcards: C{*} any run of characters, C{?} one."""
    parts = []
    for ch in name.lower():
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.DOTALL).fullmatch


def _split_names(values) -> list[str]:
    """A user's Aliases: a tuple of names, or Kerio's comma-separated text."""
    if isinstance(values, str):
        values = (values,)
    out = []
    for value in values or ():
        for name in str(value).split(","):
            name = name.strip()
            if name:
                out.append(name)
    return out


# --- building -------------------------------------------------------------


def _place(record: UserRecord | AliasRecord, kind: str, primary_of: dict[str, str],
           problems: list[Problem]) -> tuple[str, str, str] | None:
    """A user's or alias's local part, domain and primary domain; None
    (with the problem recorded) for an empty name or a non-local domain."""
    name = unquote_local(record.name.strip())
    domain = normalise_domain(record.domain.strip())
    if not name:
        problems.append(Problem(record.where, f"{kind} with an empty name in domain {domain}"))
        return None
    primary = primary_of.get(domain)
    if primary is None:
        problems.append(Problem(record.where,
                                f"{kind} {name}@{domain}: domain {domain or '(empty)'} is not a local domain"))
        return None
    return name, domain, primary


class _Alias:
    """Build-time state of one alias address (records merged by name)."""

    __slots__ = ("key", "where", "targets", "shadows")

    def __init__(self, key: str, where: Where):
        self.key = key
        self.where = where
        self.targets: list[tuple[str, Where]] = []
        self.shadows = False


def build(
    domains: Iterable[DomainRecord],
    users: Iterable[UserRecord],
    aliases: Iterable[AliasRecord],
) -> tuple[UserDirectory, list[Problem]]:
    """Build a L{UserDirectory}; never raises on bad data.

    Whatever is wrong comes back as L{Problem}s (sorted by place) and the
    offending item is left out (the first of two duplicates is kept).
    C{users} is iterated once, so it may be a generator.
    """
    problems: list[Problem] = []
    # Problems that must name the line of an earlier user: resolved in one
    # pass over the accounts at the end, so no per-user map is kept.
    deferred: list[tuple[str, object]] = []

    # -- domains: every primary first, then the aliases, so an alias that
    # collides with a domain defined later is still caught.
    domain_list = list(domains)
    primary_of: dict[str, str] = {}
    where_of_domain: dict[str, Where] = {}
    primaries: list[str] = []
    accepted: list[tuple[DomainRecord, str]] = []
    for record in domain_list:
        name = normalise_domain(record.name.strip())
        if not name:
            problems.append(Problem(record.where, "domain with an empty name"))
            continue
        if name in primary_of:
            problems.append(
                Problem(
                    record.where,
                    f"duplicate domain {name} (first defined at {where_of_domain[name]})",
                )
            )
            continue
        name = sys.intern(name)
        primary_of[name] = name
        where_of_domain[name] = record.where
        primaries.append(name)
        accepted.append((record, name))
    for record, primary in accepted:  # a dropped record's aliases go with it
        for alias in _split_names(record.aliases):
            alias = normalise_domain(alias)
            if alias == primary:
                continue
            if alias in primary_of:
                other = primary_of[alias]
                what = f"domain {alias}" if other == alias else f"alias {alias} of domain {other}"
                problems.append(
                    Problem(
                        record.where,
                        f"domain alias {alias} of {primary} collides with "
                        f"{what} ({where_of_domain[alias]})",
                    )
                )
                continue
            primary_of[sys.intern(alias)] = primary
            where_of_domain[alias] = record.where

    # -- users: one pass; entries map every name of a user to its canonical
    # address (the same str object for all of them).
    entries: dict[str, str | Lookup] = {}
    accounts: list[str] = []
    wheres: list[Where] = []  # parallel to accounts, dropped at the end
    disabled: set[str] = set()
    for record in users:
        placed = _place(record, "user", primary_of, problems)
        if placed is None:
            continue
        name, domain, primary = placed
        shown = f"{name}@{domain}"
        canonical = f"{name.lower()}@{primary}"
        first = entries.get(canonical)
        if first is not None and first != canonical:
            # The name was taken as an extra name of another user: the
            # account wins, the other user's alias is dropped.
            deferred.append(
                (
                    first,
                    lambda w, where=record.where, shown=shown, first=first: Problem(
                        where,
                        f"user {shown} is also an alias of user {first} ({w}); "
                        "the alias is ignored",
                    ),
                )
            )
        elif first is not None:
            deferred.append(
                (
                    first,
                    lambda w, where=record.where, shown=shown, first=first: Problem(
                        where,
                        f"duplicate user {shown}: {first} is already defined at {w} "
                        "(user names are case-insensitive)",
                    ),
                )
            )
            continue
        entries[canonical] = canonical
        accounts.append(canonical)
        wheres.append(record.where)
        if not record.enabled:
            disabled.add(canonical)
        for extra in _split_names(record.aliases):
            if "@" in extra:
                local, extra_domain, _ = split_address(extra)
            else:
                local, extra_domain = unquote_local(extra), primary
            extra_primary = primary_of.get(extra_domain)
            if extra_primary is None or not local:
                problems.append(
                    Problem(
                        record.where,
                        f"user {canonical}: alias {extra} is not an address in a local domain",
                    )
                )
                continue
            key = f"{local.lower()}@{extra_primary}"
            holder = entries.get(key)
            if holder is None:
                entries[key] = canonical
            elif holder != canonical:
                deferred.append(
                    (
                        holder,
                        lambda w, where=record.where, c=canonical, key=key, h=holder: Problem(
                            where,
                            f"user {c}: alias {key} already names user {h} ({w})",
                        ),
                    )
                )

    # -- two accounts must never share a Maildir (mail for one would land
    # in the other's box).
    homes: dict[tuple[str, str], int] = {}
    for i, canonical in enumerate(accounts):
        first = homes.setdefault(maildir_dirs(canonical), i)
        if first != i:
            problems.append(
                Problem(
                    wheres[i],
                    f"user {canonical}: its Maildir would be the directory of user "
                    f"{accounts[first]} ({wheres[first]})",
                )
            )

    # -- alias records: merged by address, then flattened.
    nodes: dict[str, _Alias] = {}
    wildcards: dict[str, list[tuple[object, str]]] = {}  # primary -> (match, key)
    for record in aliases:
        placed = _place(record, "alias", primary_of, problems)
        if placed is None:
            continue
        name, domain, primary = placed
        key = f"{name.lower()}@{primary}"
        node = nodes.get(key)
        if node is None:
            node = nodes[key] = _Alias(key, record.where)
            if _is_wildcard(name):
                wildcards.setdefault(primary, []).append((_compile_wildcard(name), key))
            elif key in entries:
                node.shadows = True
                holder = entries[key]
                deferred.append(
                    (
                        holder,
                        lambda w, where=record.where, key=key, h=holder: Problem(
                            where,
                            f"alias {key} shadows user {h} ({w}); "
                            f"mail to {key} follows the alias",
                            severity="warning",
                        ),
                    )
                )
        for target in _split_names(record.deliver_to):
            node.targets.append((target, record.where))

    # Each alias's edges: ("user", canonical), ("fwd", address) or
    # ("alias", key).
    edges: dict[str, list[tuple[str, str]]] = {}
    for key, node in nodes.items():
        out: list[tuple[str, str]] = []
        if not node.targets:
            problems.append(Problem(node.where, f"alias {key} delivers to nothing"))
        own_domain = key.rpartition("@")[2]
        for target, where in node.targets:
            if "@" in target:
                local, domain, _ = split_address(target)
            else:
                local, domain = unquote_local(target), own_domain
            primary = primary_of.get(domain)
            if primary is None:
                out.append(("fwd", f"{local}@{domain}"))
                continue
            tkey = f"{local.lower()}@{primary}"
            if tkey == key and node.shadows:
                out.append(("user", entries[tkey]))  # Kerio: sherlock -> sherlock
            elif tkey in nodes and not _is_wildcard(local):
                out.append(("alias", tkey))
            elif tkey in entries:
                out.append(("user", entries[tkey]))
            else:
                wild = None
                if local:
                    for match, wkey in wildcards.get(primary, ()):
                        if match(local.lower()) is not None:
                            wild = wkey
                            break
                if wild is not None:
                    out.append(("alias", wild))
                else:
                    problems.append(
                        Problem(
                            where,
                            f"alias {key}: target {tkey} is not a local user or alias",
                        )
                    )
        edges[key] = out

    resolved = flatten(nodes, edges, problems)

    # -- assemble: disabled users and aliases become prebuilt Lookups.
    disabled_lookup: dict[str, Lookup] = {c: Lookup(DISABLED, c) for c in disabled}
    if disabled_lookup:
        for key, value in entries.items():
            if value in disabled_lookup:
                entries[key] = disabled_lookup[value]
    templates: dict[str, Lookup] = {}
    for key in nodes:
        reached, forwards = resolved[key]
        mailboxes = tuple(m for m in reached if m not in disabled)
        if mailboxes or forwards:
            status = KNOWN
        elif reached:  # every account it reaches is disabled
            status = DISABLED
        else:
            status = UNKNOWN
        templates[key] = Lookup(status, key, mailboxes, forwards)
    for key, template in templates.items():
        if not _is_wildcard(key.rpartition("@")[0]):
            entries[key] = template

    patterns = {
        primary: tuple((match, templates[key]) for match, key in found)
        for primary, found in wildcards.items()
    }
    domain_map = {
        name: (primary, patterns.get(primary, ())) for name, primary in primary_of.items()
    }

    if deferred:
        wanted = {holder for holder, _ in deferred}
        found_at = {c: wheres[i] for i, c in enumerate(accounts) if c in wanted}
        problems.extend(make(found_at[holder]) for holder, make in deferred)
    del wheres

    problems.sort(key=lambda p: (p.where.file, p.where.line))
    return UserDirectory(domain_map, entries, accounts, primaries), problems
