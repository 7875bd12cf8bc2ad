"""The user directory: local domains, their users and aliases.

RCPT and VRFY ask one question, "what is this address?", and the answer must
be cheap and must not depend much on whether the address exists.  So
everything is resolved when the directory is built (L{build}), and a lookup
is a few string operations and two dict probes:

    1. the domain, lower-cased and without a trailing dot, maps to its
       primary name (domain aliases included) in C{_domains};
    2. "local@primary", lower-cased, maps in C{_entries} to either the
       canonical address of an enabled user (a str, shared with the account
       list: no per-user object), or a prebuilt L{Lookup} (disabled users,
       alias records, which are few).

Alias chains are flattened at build time, so a lookup never walks a chain.

Rules, as Kerio applies them (and as a Postfix administrator would expect
from virtual alias maps):

  - Domains and local parts are case-insensitive; a trailing dot on the
    domain is ignored; a quoted local part (C{"john"@example.com}) is the
    same as the unquoted one.
  - C{john@alias.example} is C{john@example.com} when C{alias.example} is a
    domain alias of C{example.com}.
  - A user's C{Aliases} are extra names of that user: the lookup answers
    with the user's own canonical address.
  - An C{Alias} record that has the same name as a user shadows the user:
    mail follows the alias (with a warning at build time).  An alias that
    names itself (C{sherlock -> sherlock}) delivers to the shadowed user, as
    Kerio's loop flag does.
  - Wildcard alias names (C{*}, C{?ill}, C{*erlock}: Kerio's "aliases for
    misspelt addresses") apply only when no user or alias has the exact
    name.  In a domain that has wildcards, every lookup tries all of them, so
    a hit and a miss cost the same.
  - Canonical addresses are lower case: C{user@primarydomain}.

Addresses that are not well formed never raise:

  - no C{@} (C{"postmaster"}), or an empty domain (C{"john@"}): UNKNOWN.
    (RFC 5321 "Postmaster" without a domain is the protocol's to map onto a
    local domain before asking.)
  - empty local part: UNKNOWN in a local domain, NOT_LOCAL otherwise.  The
    status is NOT_LOCAL exactly when the domain part is non-empty and not one
    of ours, whatever the local part: that is the relay question.
"""

from __future__ import annotations

import enum
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from zope.interface import implementer

from mailguard.interfaces import IUserDirectory
from mailguard.policy.aliasgraph import flatten
from mailguard.config.problems import Problem, Where
from mailguard.config.records import AliasRecord, DomainRecord, UserRecord

__all__ = [
    "Lookup",
    "LookupStatus",
    "UserDirectory",
    "build",
    "maildir_dirs",
    "normalise_domain",
    "split_address",
]


class LookupStatus(enum.Enum):
    KNOWN = "known"
    UNKNOWN = "unknown"
    DISABLED = "disabled"
    NOT_LOCAL = "not-local"


KNOWN = LookupStatus.KNOWN
UNKNOWN = LookupStatus.UNKNOWN
DISABLED = LookupStatus.DISABLED
NOT_LOCAL = LookupStatus.NOT_LOCAL


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer for one address.

    @ivar status: a L{LookupStatus}.
    @ivar address: for KNOWN and DISABLED, the canonical lower-case
        C{user@primarydomain} (for an C{Alias} record, the alias's own
        address; for a user's extra name, the user's address); otherwise
        the input normalised (domain lower-cased, trailing dot dropped; the
        local part lower-cased in local domains and kept as written in
        others).
    @ivar mailboxes: the local accounts the mail goes to, aliases resolved
        (only enabled accounts).
    @ivar forwards: non-local addresses an alias delivers to.
    """

    status: LookupStatus
    address: str
    mailboxes: tuple[str, ...] = ()
    forwards: tuple[str, ...] = ()


# --- address helpers ------------------------------------------------------

_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def normalise_domain(domain: str) -> str:
    """Lower case, without one trailing dot."""
    return domain.lower().removesuffix(".")


def _unquote(local: str) -> str:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def split_address(address: str) -> tuple[str, str, bool]:
    """Split C{address} into C{(local, domain, has_at)}.

    The domain is normalised (L{normalise_domain}); the local part is
    unquoted but keeps its case.  The split is at the last C{@}, so a quoted
    local part may hold one.  Without an C{@} the whole input is the local
    part and the domain is empty.
    """
    local, sep, domain = address.rpartition("@")
    if not sep:
        local, domain = domain, ""
    if local[:1] == '"':
        local = _unquote(local)
    return local, normalise_domain(domain), bool(sep)


def _safe_dir(name: str) -> str:
    if name in (".", ".."):
        return "_" + name
    return name.replace("/", "_").replace("\0", "_") or "_"


def maildir_dirs(mailbox: str) -> tuple[str, str]:
    """The (domain, user) directory names of C{mailbox}'s Maildir, which
    ``mailguard.store.maildir`` puts at ``SPOOL/mail/DOMAIN/USER/Maildir``.

    C{mailbox} is a canonical address (L{Lookup.mailboxes}).  The
    configuration refuses names this would have to change (path
    separators, NUL, "." and ".."), but records may come from elsewhere,
    so the mapping still keeps every name inside the spool -- and L{build}
    refuses two accounts it maps onto one directory."""
    local, _, domain = mailbox.rpartition("@")
    return _safe_dir(domain), _safe_dir(local)


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


# --- the directory --------------------------------------------------------

_NO_DOMAIN: tuple[None, tuple] = (None, ())


@implementer(IUserDirectory)
class UserDirectory:
    """An immutable directory; build one with L{build}.

    C{UserDirectory()} is an empty directory (no local domain).
    """

    __slots__ = ("_domains", "_entries", "_accounts", "_primaries")

    def __init__(self, domains=None, entries=None, accounts=(), primaries=()):
        # any domain name -> (primary name, wildcard patterns of the domain)
        self._domains: dict[str, tuple[str, tuple]] = dict(domains or {})
        # "local@primary" -> canonical str (enabled user) or a Lookup
        self._entries: dict[str, str | Lookup] = entries if entries is not None else {}
        self._accounts: list[str] = list(accounts)
        self._primaries: tuple[str, ...] = tuple(primaries)

    def is_local_domain(self, domain: str) -> bool:
        return normalise_domain(domain) in self._domains

    def canonical_domain(self, domain: str) -> str | None:
        """The primary name of C{domain} (itself or one of its aliases), or
        None if it is not local."""
        return self._domains.get(normalise_domain(domain), _NO_DOMAIN)[0]

    def lookup(self, address: str) -> Lookup:
        # One path for every address: split, two dict probes, one Lookup
        # built.  The branches below choose which Lookup, after the probes.
        local, sep, domain = address.rpartition("@")
        if not sep:
            local, domain = domain, ""
        if local[:1] == '"':
            local = _unquote(local)
        domain = domain.lower().removesuffix(".")
        lower = local.lower()
        primary, patterns = self._domains.get(domain, _NO_DOMAIN)
        hit = self._entries.get(f"{lower}@{primary or domain}")
        if patterns:
            wild = None
            for match, template in patterns:
                if match(lower) is not None and wild is None:
                    wild = template
            if hit is None and wild is not None and lower:
                return Lookup(
                    wild.status, f"{lower}@{primary}", wild.mailboxes, wild.forwards
                )
        if hit.__class__ is str:
            return Lookup(KNOWN, hit, (hit,))
        if hit is not None:
            return hit
        if primary is None and domain:
            return Lookup(NOT_LOCAL, f"{local}@{domain}")
        return Lookup(UNKNOWN, f"{lower}@{domain}" if sep else lower)

    def __len__(self) -> int:
        return len(self._accounts)

    def domains(self) -> tuple[str, ...]:
        """The primary names of the local domains, in configuration order."""
        return self._primaries

    def users(self) -> Iterator[str]:
        """The canonical addresses of all accounts (enabled or not), in
        configuration order."""
        return iter(self._accounts)

    def __repr__(self) -> str:
        return f"<UserDirectory: {len(self._primaries)} domains, {len(self)} users>"


# --- building -------------------------------------------------------------


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
        name = _unquote(record.name.strip())
        domain = normalise_domain(record.domain.strip())
        shown = f"{name}@{domain}"
        primary = primary_of.get(domain)
        if not name:
            problems.append(Problem(record.where, f"user with an empty name in domain {domain}"))
            continue
        if primary is None:
            problems.append(
                Problem(
                    record.where,
                    f"user {shown}: domain {domain or '(empty)'} is not a local domain",
                )
            )
            continue
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
                local, extra_domain = _unquote(extra), primary
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
        name = _unquote(record.name.strip())
        domain = normalise_domain(record.domain.strip())
        primary = primary_of.get(domain)
        if not name:
            problems.append(Problem(record.where, f"alias with an empty name in domain {domain}"))
            continue
        if primary is None:
            problems.append(
                Problem(
                    record.where,
                    f"alias {name}@{domain}: domain {domain or '(empty)'} is not a local domain",
                )
            )
            continue
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
                local, domain = _unquote(target), own_domain
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
