"""Kerio IP address groups with O(log n) membership.

Kerio's ``IpAddressGroup`` collection holds one row per member: a single
address, a CIDR prefix, an inclusive range ``A-B`` or ``group:NAME``.  The
relay and greeting-delay decisions ask "is this client in group G?" on every
connection, and real groups (blocklists, country ranges) run to 100,000 rows,
so L{build} does all the work once:

  - every row is parsed to an inclusive integer interval ``[lo, hi]`` of one
    family (IPv4 or IPv6);
  - ``group:NAME`` includes are resolved at build time (unknown names and
    cycles are reported, never followed);
  - each group is flattened into sorted, merged, non-overlapping intervals per
    family, so a lookup is one ``bisect`` -- O(log n), whatever the mix of
    entries or the depth of nesting.

IPv4-mapped IPv6 (``::ffff:1.2.3.4``, what Twisted reports on dual-stack
sockets) is the IPv4 host it maps: lookups fold it to IPv4, and entries lying
wholly inside ``::ffff:0:0/96`` are folded the same way.  A broader IPv6 entry
such as ``::/0`` does *not* cover IPv4: an admin writing "all of IPv6" into a
relay group must not open relaying to all of IPv4 (Postfix folds client
addresses the same way).

Bad rows never raise: L{build} returns them as L{Problem} values (so
``mailguard check`` can list them all) and skips them; the rest of the group
still works.  A plain object: no reactor, no Twisted.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Iterable, Mapping

from zope.interface import implementer

from mailguard.interfaces import IIPGroups
from mailguard.config.problems import NOWHERE, ConfigError, Problem, Where, errors
from mailguard.config.records import IpGroupRow

__all__ = ["IPGroups", "build", "from_mapping"]

_V4, _V6 = 4, 6
_MAPPED_LO = 0xFFFF << 32  # ::ffff:0.0.0.0
_MAPPED_HI = _MAPPED_LO | 0xFFFFFFFF  # ::ffff:255.255.255.255
_INCLUDE = "group:"
_BAD = "is not an IP address, CIDR prefix or range"


def _q(text: str) -> str:
    """Quote a configured value for a message; control characters and quotes
    are escaped so a hostile or broken file cannot garble ``check`` output."""
    return json.dumps(text, ensure_ascii=False)


class _Bad(Exception):
    """One row's value cannot be used; the message is shown as written."""


# -- parsing one Address -------------------------------------------------------


def _fold(family: int, lo: int, hi: int) -> tuple[int, int, int]:
    """An IPv6 interval wholly inside ::ffff:0:0/96 is the IPv4 interval it
    maps (see the module docstring for why partial overlaps are not)."""
    if family == _V6 and _MAPPED_LO <= lo and hi <= _MAPPED_HI:
        return _V4, lo - _MAPPED_LO, hi - _MAPPED_LO
    return family, lo, hi


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(r"\.".join([_OCTET] * 4))


def _v4_int(text: str) -> int | None:
    """Fast path for the common case, a dotted quad: ``ipaddress`` costs
    about 5 us per address, which is most of a 100,000-row build.  Exactly
    as strict as ``ipaddress`` (no leading zeros, ASCII digits only);
    anything else returns None and takes the slow, general path."""
    m = _DOTTED_QUAD.fullmatch(text)
    if m is None:
        return None
    a, b, c, d = m.groups()
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


def _address(text: str):
    """Parse one address; Postfix-style brackets (``[::1]``) are allowed."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    n = _v4_int(text)
    if n is not None:
        return IPv4Address(n)
    return ip_address(text)  # ValueError if not an address


def _parse_address(value: str) -> tuple[int, int, int, str | None]:
    """C{value} (stripped, not an include) -> (family, lo, hi, warning).

    Raises L{_Bad} with the reason."""
    if "-" in value:  # no IPv4 or IPv6 literal contains a dash
        parts = value.split("-")
        if len(parts) != 2:
            raise _Bad(f"{_q(value)} {_BAD}")
        ends = []
        for part in parts:
            try:
                ends.append(_address(part))
            except ValueError:
                raise _Bad(f"range {_q(value)}: {_q(part.strip())} is not an IP address") from None
        start, end = ends
        if start.version != end.version:
            raise _Bad(f"range {_q(value)} mixes IPv4 and IPv6")
        if int(start) > int(end):
            raise _Bad(f"range {_q(value)} is reversed: {start} is after {end}")
        return (*_fold(start.version, int(start), int(end)), None)

    if "/" in value:
        addr_text, _, mask = value.partition("/")
        addr_text, mask = addr_text.strip(), mask.strip()
        if addr_text.startswith("[") and addr_text.endswith("]"):
            addr_text = addr_text[1:-1]
        n = _v4_int(addr_text)
        if n is not None and mask.isascii() and mask.isdigit() and int(mask) <= 32:
            size = 1 << (32 - int(mask))
            lo = n & ~(size - 1)
            warning = None
            if n != lo:
                warning = (f"{_q(value)} has host bits set; "
                           f"using {IPv4Address(lo)}/{int(mask)}")
            return _V4, lo, lo + size - 1, warning
        try:
            addr = ip_address(addr_text)
            # strict=False: like Postfix and ipaddress, 10.0.0.1/8 means
            # 10.0.0.0/8 -- but say so, it is often a typo for a /32.
            net = ip_network(f"{addr_text}/{mask}", strict=False)
        except ValueError:
            raise _Bad(f"{_q(value)} {_BAD}") from None
        lo = int(net.network_address)
        hi = int(net.broadcast_address)
        warning = None
        if int(addr) != lo:
            warning = f"{_q(value)} has host bits set; using {net}"
        return (*_fold(net.version, lo, hi), warning)

    n = _v4_int(value)
    if n is not None:
        return _V4, n, n, None
    try:
        addr = _address(value)
    except ValueError:
        raise _Bad(f"{_q(value)} {_BAD}") from None
    n = int(addr)
    return (*_fold(addr.version, n, n), None)


# -- flattened intervals -------------------------------------------------------


def _merge(intervals: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sort and merge overlapping *or adjacent* intervals, so lookups need
    only the nearest start at or below the address."""
    intervals.sort()
    starts: list[int] = []
    ends: list[int] = []
    for lo, hi in intervals:
        if ends and lo <= ends[-1] + 1:
            if hi > ends[-1]:
                ends[-1] = hi
        else:
            starts.append(lo)
            ends.append(hi)
    return starts, ends


@dataclass
class _Flat:
    """One group, flattened: parallel lists of interval starts and ends."""

    v4_starts: list[int] = field(default_factory=list)
    v4_ends: list[int] = field(default_factory=list)
    v6_starts: list[int] = field(default_factory=list)
    v6_ends: list[int] = field(default_factory=list)

    def intervals(self, family: int) -> list[tuple[int, int]]:
        if family == _V4:
            return list(zip(self.v4_starts, self.v4_ends))
        return list(zip(self.v6_starts, self.v6_ends))


@dataclass
class _Stats:
    """What C{describe} and C{row_count} report about one group's rows."""

    entries: int = 0  # enabled rows in effect (addresses and includes)
    disabled: int = 0
    invalid: int = 0  # enabled rows skipped because of an error
    includes: list[str] = field(default_factory=list)


def _lookup_key(address) -> tuple[int, int] | None:
    """(family, integer) for a client address, IPv4-mapped folded to IPv4;
    None for a string that is not an address."""
    if isinstance(address, str):
        n = _v4_int(address)
        if n is not None:
            return _V4, n
        try:
            address = ip_address(address.strip())
        except ValueError:
            return None
    if isinstance(address, IPv4Address):
        return _V4, int(address)
    if isinstance(address, IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return _V4, int(mapped)
        return _V6, int(address)
    raise TypeError(f"address must be str, IPv4Address or IPv6Address, not {type(address).__name__}")


@implementer(IIPGroups)
class IPGroups:
    """Immutable, built IP address groups.  Made by L{build}."""

    __slots__ = ("_groups", "_stats")

    def __init__(self, groups: Mapping[str, _Flat] | None = None,
                 stats: Mapping[str, _Stats] | None = None):
        """Private: use L{build} (or L{from_mapping}); C{IPGroups()} is the
        empty set of groups."""
        self._groups = dict(groups or {})
        self._stats = dict(stats or {})

    def names(self) -> frozenset[str]:
        """The names of all groups, including those with only disabled or
        invalid rows (they exist, they are just empty)."""
        return frozenset(self._groups)

    def contains(self, group: str, address) -> bool:
        """True if C{address} (str, IPv4Address or IPv6Address) is in
        C{group}; False for an unknown group or an unparsable string.

        A wrong type raises TypeError: a caller bug should not read as
        "not trusted" silently."""
        key = _lookup_key(address)
        flat = self._groups.get(group)
        if flat is None or key is None:
            return False
        family, n = key
        if family == _V4:
            starts, ends = flat.v4_starts, flat.v4_ends
        else:
            starts, ends = flat.v6_starts, flat.v6_ends
        i = bisect_right(starts, n)
        return i > 0 and n <= ends[i - 1]

    def row_count(self, group: str) -> int:
        """Rows of C{group} in effect: enabled and valid (an include counts
        as one row); 0 for an unknown group."""
        stats = self._stats.get(group)
        return stats.entries if stats else 0

    def interval_count(self, group: str) -> int:
        """Merged intervals after flattening (what a lookup bisects)."""
        flat = self._groups.get(group)
        return len(flat.v4_starts) + len(flat.v6_starts) if flat else 0

    def bounds(self, group: str, version: int) -> tuple[list[int], list[int]]:
        """The merged, sorted intervals of C{group} for IP C{version} (4 or
        6; IPv4-mapped IPv6 is folded to 4) as two parallel lists, the
        inclusive starts and ends -- the group's own lists, not copies: do
        not change them.  Empty for an unknown group.  For checks on a
        group's extent (the open-relay check); lookups use L{contains}."""
        flat = self._groups.get(group)
        if flat is None:
            return [], []
        if version == 4:
            return flat.v4_starts, flat.v4_ends
        return flat.v6_starts, flat.v6_ends

    def describe(self, group: str) -> str:
        """A one-line summary for ``mailguard check``, e.g.
        ``Trusted: 3 entries, includes LAN; 1 disabled``."""
        stats = self._stats.get(group)
        if group not in self._groups or stats is None:
            return f"{group}: no such group"
        n = stats.entries
        text = f"{group}: {n} {'entry' if n == 1 else 'entries'}"
        if stats.includes:
            text += ", includes " + ", ".join(stats.includes)
        notes = []
        if stats.disabled:
            notes.append(f"{stats.disabled} disabled")
        if stats.invalid:
            notes.append(f"{stats.invalid} invalid")
        if notes:
            text += "; " + ", ".join(notes)
        return text

    def __repr__(self) -> str:
        return f"<IPGroups {sorted(self._groups)!r}>"


# -- building ------------------------------------------------------------------


def build(rows: Iterable[IpGroupRow]) -> tuple[IPGroups, list[Problem]]:
    """Build the groups from configuration rows, in any order.

    Never raises on bad input: every problem is returned (sorted by place)
    and the offending row is skipped.  Errors: a malformed value, a reversed
    or mixed-family range, an include of an unknown group, an include that
    closes a cycle.  Warnings: a prefix with host bits set (its network is
    used), a malformed value in a disabled row (it does nothing now, but
    will fail once enabled).
    """
    problems: list[Problem] = []
    # group -> {family: [(lo, hi), ...]}: one tuple per row, merged in place
    own: dict[str, dict[int, list[tuple[int, int]]]] = {}
    includes: dict[str, list[tuple[str, str, Where]]] = {}  # -> (name, value, where)
    stats: dict[str, _Stats] = {}

    def report(group: str, message: str, where: Where, severity: str = "error") -> None:
        problems.append(Problem(where, f"IpAddressGroup {_q(group)}: {message}", severity))

    for row in rows:
        group = row.group
        where = row.where
        value = (row.address or "").strip()
        if not group.strip():
            # Nothing could name such a group (RelayControlIpGroup, group:),
            # so it is not made at all.
            report(group, f"row for {_q(value)} has no group name", where)
            continue
        if group not in own:
            own[group] = {_V4: [], _V6: []}
            includes[group] = []
            stats[group] = _Stats()
        st = stats[group]
        if not row.enabled:
            st.disabled += 1
        if not value:
            if row.enabled:
                report(group, "empty Address", where)
                st.invalid += 1
            continue
        if value[: len(_INCLUDE)].lower() == _INCLUDE:
            if not row.enabled:
                # A disabled include is how admins park a deleted group:
                # do not even check that it exists.
                continue
            name = value[len(_INCLUDE):].strip()
            if not name:
                report(group, f"{_q(value)} names no group", where)
                st.invalid += 1
                continue
            includes[group].append((name, value, where))
            continue
        try:
            family, lo, hi, warning = _parse_address(value)
        except _Bad as bad:
            if row.enabled:
                report(group, str(bad), where)
                st.invalid += 1
            else:
                report(group, f"{bad} (row is disabled)", where, "warning")
            continue
        if not row.enabled:
            continue
        if warning:
            report(group, warning, where, "warning")
        own[group][family].append((lo, hi))
        st.entries += 1

    # Unknown includes are found before the walk, so the walk only follows
    # edges between existing groups.
    lower = {}
    for name in own:
        lower.setdefault(name.lower(), name)
    edges: dict[str, list[tuple[str, str, Where]]] = {}
    for group, incs in includes.items():
        kept = []
        for name, value, where in incs:
            if name in own:
                kept.append((name, value, where))
                continue
            hint = lower.get(name.lower())
            extra = f' (did you mean "group:{hint}"?)' if hint else ""
            report(group, f"{_q(value)}: no IP address group is named {_q(name)}{extra}", where)
            stats[group].invalid += 1
        edges[group] = kept

    flats = _flatten(own, edges, stats, report)
    problems.sort(key=lambda p: p.where)  # stable: same line keeps row order
    return IPGroups(flats, stats), problems


def _flatten(own, edges, stats, report) -> dict[str, _Flat]:
    """Resolve includes depth-first (iteratively: a long chain of nested
    groups must not hit the recursion limit).  An include that reaches a
    group still being resolved closes a cycle: it is reported with the path
    and skipped, so each group still gets everything else it names."""
    DONE, ACTIVE = 2, 1
    state: dict[str, int] = {}
    flats: dict[str, _Flat] = {}
    accepted: dict[str, list[str]] = {}

    def finish(group: str) -> None:
        v4, v6 = own[group][_V4], own[group][_V6]
        for child in accepted[group]:
            v4 += flats[child].intervals(_V4)
            v6 += flats[child].intervals(_V6)
        s4, e4 = _merge(v4)
        s6, e6 = _merge(v6)
        own[group] = None  # the rows' tuples are garbage from here on
        flats[group] = _Flat(s4, e4, s6, e6)

    for root in own:  # configuration order: deterministic reports
        if root in state:
            continue
        state[root] = ACTIVE
        accepted[root] = []
        path = [root]
        stack = [iter(edges[root])]
        while stack:
            node = path[-1]
            for child, value, where in stack[-1]:
                st = state.get(child)
                if st == ACTIVE:
                    cycle = " -> ".join(path[path.index(child):] + [child])
                    if child == node:
                        report(node, f"{_q(value)} includes the group itself ({cycle})", where)
                    else:
                        report(node, f"{_q(value)} makes a cycle: {cycle}", where)
                    stats[node].invalid += 1
                    continue
                accepted[node].append(child)
                stats[node].entries += 1
                stats[node].includes.append(child)
                if st == DONE:
                    continue
                state[child] = ACTIVE
                accepted[child] = []
                path.append(child)
                stack.append(iter(edges[child]))
                break
            else:
                stack.pop()
                path.pop()
                finish(node)
                state[node] = DONE
    return flats


def from_mapping(groups: Mapping[str, Iterable[str]]) -> IPGroups:
    """Groups from ``{"Trusted": ["127.0.0.1", "10.0.0.0/8"]}``, for tests and
    embedding; raises L{ConfigError} listing every error (warnings pass)."""
    rows = [IpGroupRow(name, address, where=NOWHERE)
            for name, addresses in groups.items() for address in addresses]
    built, problems = build(rows)
    bad = errors(problems)
    if bad:
        raise ConfigError(bad)
    return built
