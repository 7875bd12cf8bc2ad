"""The rules that catch a dangerous configuration: one function, run by
``python -m mailguard check``, by ``twistd mailguard`` at start-up (and by a
configuration reload).

A configuration can be well formed and still wrong: a misspelt name is
silently ignored (a real Kerio file holds hundreds of names mailguard does
not use, so unknown names cannot all be reported), a relay group that takes
in the whole Internet makes an open relay.  L{findings} looks at the loaded
configuration and its tables and returns what it finds as L{Problem}s:

  - error: the relay IP group (``RelayControlIpGroupEnabled=1``) covers all
    of IPv4 or IPv6 or a huge share of the public addresses (L{open_relay})
    and ``RelayControlOpenRelayIntended`` is not 1;
  - error: gateway mode with no domain to guard (no ``GatewayDomains`` and
    an empty Domain table);
  - error at start-up, warning in ``check``: gateway mode without a relay
    host (``check`` cannot know ``--relay-host``; it warns unless
    ``GatewayBackend`` is set);
  - warnings: a name one edit away from a mailguard name (L{near_miss}); a
    greeting delay over 300 s; ``VRFYEnabled=1`` with nobody trusted;
    ``SmtpAuthCramMd5Enabled=1`` with accounts whose only password is a
    ``SHA:`` hash.

Plain values in, values out: no I/O.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from ipaddress import ip_network

from mailguard.config.problems import Problem, Where
from mailguard.config.settings import SCALAR_NAMES, Configuration
from mailguard.policy.passwords import password_form

__all__ = ["GREETING_DELAY_WARN", "findings", "near_miss", "open_relay"]

#: RFC 5321 4.5.3.2.1: a client waits 5 minutes for the greeting.
GREETING_DELAY_WARN = 300.0


def _where(config: Configuration, *names: str) -> Where:
    """Where the first of C{names} that is set was set, else the file."""
    for name in names:
        where = config.where(name)
        if where is not None:
            return where
    return Where(config.source, 0)


# --- misspelt names --------------------------------------------------------------

_BY_LENGTH: dict[int, list[tuple[str, str]]] = {}
for _name in sorted(SCALAR_NAMES):
    _BY_LENGTH.setdefault(len(_name), []).append((_name.lower(), _name))


def _one_edit(a: str, b: str) -> bool:
    """True if C{a} becomes C{b} by at most one insertion, deletion,
    substitution or swap of two neighbouring characters."""
    if len(a) > len(b):
        a, b = b, a
    if len(b) - len(a) > 1:
        return False
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    if i >= len(a) - 1:
        return True
    return a[i + 1:] == b[i + 1:] or (a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2:] == b[i + 2:])


def near_miss(name: str) -> str | None:
    """The mailguard name C{name} is probably a misspelling of, or None.

    A near miss differs only in case, or by one edit (L{_one_edit}) once
    case is ignored: C{SmtpGreetingDelai}, C{SmtpMaxConectionsPerIp},
    C{QueueLifeTime}.  Kerio's own names are further away from mailguard's
    than that, so the hundreds of them in a real file pass in silence."""
    if name in SCALAR_NAMES:
        return None
    lower = name.lower()
    for length in (len(name) - 1, len(name), len(name) + 1):
        for known_lower, known in _BY_LENGTH.get(length, ()):
            if _one_edit(lower, known_lower):
                return known
    return None


def _near_misses(config: Configuration) -> list[Problem]:
    out = []
    if config.document is None:
        return out
    for var, section in config.document.settings():
        meant = near_miss(var.name)
        if meant is None:
            continue
        place = f' in section "{section}"' if section else ""
        why = "names are case-sensitive" if var.name.lower() == meant.lower() else "mailguard does not know it"
        out.append(Problem(var.where, f'variable "{var.name}"{place} is ignored ({why}): '
                                      f'did you mean "{meant}"?', "warning"))
    return out


# --- open relay ---------------------------------------------------------------------

def _ranges(*cidrs: str) -> list[tuple[int, int]]:
    nets = [ip_network(c) for c in cidrs]
    return sorted((int(n.network_address), int(n.broadcast_address)) for n in nets)


# Addresses that are not on the public Internet (RFC 6890 and the IANA
# special-purpose registries): a relay group may hold all of them without
# opening the server to the world.
_NOT_PUBLIC_V4 = _ranges(
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/3")
# IPv6: only 2000::/3 is global unicast; 2001:db8::/32 is for documentation.
_PUBLIC_V6 = _ranges("2000::/3")
_NOT_PUBLIC_V6_INSIDE = _ranges("2001:db8::/32")

#: More public addresses than this in the relay group is an open relay:
#: a /8 of IPv4 (16,777,216 addresses, 1/256 of the space) ...
OPEN_RELAY_V4 = 1 << 24
#: ... or a /16 of IPv6 (2**112 addresses; a large provider holds a /19).
OPEN_RELAY_V6 = 1 << 112


def _count(starts: list[int], ends: list[int]) -> int:
    return sum(ends) - sum(starts) + len(starts)


def _overlap(starts: list[int], ends: list[int], lo: int, hi: int) -> int:
    """How many addresses of the sorted, disjoint intervals lie in
    [C{lo}, C{hi}]."""
    i = bisect_right(starts, lo) - 1  # the last interval starting at or before lo
    if i < 0 or ends[i] < lo:
        i += 1  # ... ends before it: the overlap starts with the next one
    j = bisect_right(starts, hi)  # [i, j): the intervals that overlap
    if i >= j:
        return 0
    total = _count(starts[i:j], ends[i:j])
    total -= max(lo - starts[i], 0)  # what the first has before lo
    total -= max(ends[j - 1] - hi, 0)  # what the last has after hi
    return total


def open_relay(config: Configuration, tables) -> str | None:
    """How the relay IP group opens the server to the Internet -- "all of
    IPv4", or how many public addresses it holds -- or None when it does
    not (or relaying by IP group is off)."""
    if not config.relay_ip_group_enabled or not config.relay_ip_group:
        return None
    s4, e4 = tables.ip_groups.bounds(config.relay_ip_group, 4)
    s6, e6 = tables.ip_groups.bounds(config.relay_ip_group, 6)
    if s4 == [0] and e4 == [(1 << 32) - 1]:
        return "all of IPv4"
    if s6 == [0] and e6 == [(1 << 128) - 1]:
        return "all of IPv6"
    public4 = _count(s4, e4) - sum(_overlap(s4, e4, lo, hi) for lo, hi in _NOT_PUBLIC_V4)
    if public4 > OPEN_RELAY_V4:
        return f"{public4:,} public IPv4 addresses, more than a /8 ({OPEN_RELAY_V4:,})"
    public6 = sum(_overlap(s6, e6, lo, hi) for lo, hi in _PUBLIC_V6)
    public6 -= sum(_overlap(s6, e6, lo, hi) for lo, hi in _NOT_PUBLIC_V6_INSIDE)
    if public6 > OPEN_RELAY_V6:
        return f"about 2**{round(math.log2(public6))} public IPv6 addresses, more than a /16 (2**112)"
    return None


def _open_relay(config: Configuration, tables) -> list[Problem]:
    extent = open_relay(config, tables)
    if extent is None or config.open_relay_intended:
        return []
    return [Problem(
        _where(config, "RelayControlIpGroup", "RelayControlIpGroupEnabled"),
        f'the relay IP group "{config.relay_ip_group}" covers {extent}: this is an open relay '
        "(anyone may send mail anywhere through this server); narrow the group, or set "
        "RelayControlOpenRelayIntended to 1 if that is really meant")]


# --- the smaller rules --------------------------------------------------------------

def _greeting_delay(config: Configuration) -> list[Problem]:
    if config.greeting_delay <= GREETING_DELAY_WARN:
        return []
    return [Problem(
        _where(config, "SmtpGreetingDelay"),
        f"SmtpGreetingDelay is {config.greeting_delay:g} s, longer than the 5 minutes "
        "RFC 5321 (4.5.3.2.1) tells a client to wait for the greeting: legitimate "
        "servers will give up too", "warning")]


def _can_authenticate(config: Configuration) -> bool:
    return any(u.enabled and password_form(u.password) in ("plain", "sha", "d3s")
               for u in config.users)


def _vrfy_nobody_trusted(config: Configuration, tables) -> list[Problem]:
    if not config.vrfy_enabled:
        return []
    reasons = []
    if not config.relay_ip_group_enabled:
        reasons.append("RelayControlIpGroupEnabled is 0")
    elif not tables.ip_groups.interval_count(config.relay_ip_group):
        reasons.append(f'the relay IP group "{config.relay_ip_group}" holds no address')
    else:
        return []
    if not config.relay_auth_enabled:
        reasons.append("RelayControlAuthEnabled is 0")
    elif not _can_authenticate(config):
        reasons.append("no enabled user has a password mailguard can verify")
    else:
        return []
    return [Problem(
        _where(config, "VRFYEnabled"),
        f"VRFYEnabled is 1 but nobody is trusted ({'; '.join(reasons)}): "
        "every VRFY is answered 252", "warning")]


def _gateway_relay_host(config: Configuration, relay_host, startup: bool) -> list[Problem]:
    if not config.gateway_enabled or relay_host:
        return []
    where = _where(config, "GatewayEnabled")
    if startup:
        return [Problem(where, "GatewayEnabled is 1 but there is no --relay-host: accepted "
                               "mail could not be forwarded to the back-end (see docs/gateway.md)")]
    if config.gateway_backend is not None:
        return []
    return [Problem(where, "GatewayEnabled is 1 and GatewayBackend is not set: twistd "
                           "must be given --relay-host, the back-end asked with VRFY and "
                           "sent the accepted mail", "warning")]


def _gateway_domains(config: Configuration) -> list[Problem]:
    if not config.gateway_enabled or config.gateway_domain_names:
        return []
    return [Problem(_where(config, "GatewayEnabled"),
                    "GatewayEnabled is 1 but no domain is listed: set GatewayDomains "
                    "(or list the domains in the Domain table)")]


def _cram_md5(config: Configuration) -> list[Problem]:
    if not config.cram_md5_enabled:
        return []
    hashed = [u for u in config.users if u.enabled and password_form(u.password) == "sha"]
    if not hashed:
        return []
    n = len(hashed)
    who = "1 enabled user has" if n == 1 else f"{n} enabled users have"
    return [Problem(
        _where(config, "SmtpAuthCramMd5Enabled"),
        f"SmtpAuthCramMd5Enabled is 1 but {who} only a SHA: password hash, which "
        f"CRAM-MD5 cannot use (first: {hashed[0].address} at {hashed[0].where}); "
        "they can log in with PLAIN or LOGIN only", "warning")]


def findings(config: Configuration, tables, *, relay_host: str | None = None,
             startup: bool = False) -> list[Problem]:
    """Every dangerous thing about C{config} and its L{Tables
    <mailguard.policy.build.Tables>}, errors and warnings, by place.

    @param relay_host: the ``--relay-host`` given to twistd, if any.
    @param startup: True when twistd is starting (or reloading): it knows
        whether there is a relay host; ``check`` does not.
    """
    out = (_open_relay(config, tables) + _gateway_domains(config)
           + _gateway_relay_host(config, relay_host, startup)
           + _near_misses(config) + _greeting_delay(config)
           + _vrfy_nobody_trusted(config, tables) + _cram_md5(config))
    out.sort(key=lambda p: p.where)
    return out
