"""The user directory: local domains, their users and aliases.

RCPT and VRFY ask one question, "what is this address?", and the answer must
be cheap and must not depend much on whether the address exists.  So
everything is resolved when the directory is built
(L{mailguard.policy.directorybuild.build}), and a lookup
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
from collections.abc import Iterator
from dataclasses import dataclass

from zope.interface import implementer

from mailguard.interfaces import IUserDirectory

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


def unquote_local(local: str) -> str:
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
        local = unquote_local(local)
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


# --- the directory --------------------------------------------------------

_NO_DOMAIN: tuple[None, tuple] = (None, ())


@implementer(IUserDirectory)
class UserDirectory:
    """An immutable directory; build one with
    L{mailguard.policy.directorybuild.build}.

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
            local = unquote_local(local)
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
