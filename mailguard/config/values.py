"""Every ``str -> value`` parser of mailguard, in one leaf module.

Each parser takes the text of a setting (or of a command-line option) and
returns a typed value or raises ``ValueError`` with a message that says
what was expected.  The configuration loader (``settings.SCALARS``), the
command line (``mailguard.tap``), the relay queue and the gateway all use
these: there is one grammar for ``HOST:PORT``, not three.

This module imports nothing from mailguard.
"""

from __future__ import annotations

import ipaddress
import re


def parse_bool(text: str) -> bool:
    t = text.strip()
    if t in ("1", "0"):
        return t == "1"
    raise ValueError(f"expected 0 or 1, got {text!r}")


def parse_uint(text: str) -> int:
    t = text.strip()
    if not t.isdigit() or not t.isascii():
        raise ValueError(f"expected a non-negative decimal number, got {text!r}")
    return int(t)


def parse_seconds(text: str) -> float:
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value < 86400 * 365) or t.lower() in ("nan", "inf"):
        raise ValueError(f"expected a number of seconds, got {text!r}")
    return value


def parse_hostname(text: str) -> str:
    t = text.strip().rstrip(".")
    if not t or len(t) > 253 or any(
        not label or len(label) > 63 or not all(c.isalnum() or c == "-" for c in label)
        or label.startswith("-") or label.endswith("-") or not label.isascii()
        for label in t.split(".")
    ):
        raise ValueError(f"not a valid host name: {text!r}")
    return t.lower()


def parse_text(text: str) -> str:
    return text.strip()


def parse_list(text: str) -> tuple[str, ...]:
    """Comma- (or semicolon-) separated items, lower case, blanks dropped."""
    return tuple(p.strip().lower() for p in text.replace(";", ",").split(",") if p.strip())


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port).

    The one grammar for ``--relay-host``, ``GatewayBackend`` and anything
    else that names a peer.  HOST is an IPv4 address, a host name, or an
    IPv6 address in brackets; PORT is 1 to 65535."""
    t = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", t)
    if m is None:
        raise ValueError(f"expected HOST:PORT (or [IPv6]:PORT), got {text!r}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    port_n = int(port)
    if not 0 < port_n < 65536:
        raise ValueError(f"port out of range in {text!r}")
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in {text!r}") from None
        return host, port_n
    try:
        return str(ipaddress.IPv4Address(host)), port_n
    except ValueError:
        pass
    if host.rpartition(".")[2].isdigit():
        raise ValueError(f"not an IPv4 address or a host name in {text!r}")
    return parse_hostname(host), port_n


def parse_optional_host_port(text: str) -> tuple[str, int] | None:
    """Like L{parse_host_port}; empty text is None (not set)."""
    return parse_host_port(text) if text.strip() else None


def parse_bind_address(text: str) -> str:
    """An IPv4 or IPv6 address (the source of outgoing connections), or
    empty for "let the system choose"."""
    t = text.strip()
    if not t:
        return ""
    try:
        return str(ipaddress.ip_address(t))
    except ValueError:
        raise ValueError(f"expected an IP address, got {text!r}") from None


def parse_domain_list(text: str) -> tuple[str, ...]:
    """Comma- (or semicolon-) separated domain names, lower case, no duplicates."""
    out = []
    for part in text.replace(";", ",").split(","):
        if part.strip():
            out.append(parse_hostname(part))
    return tuple(dict.fromkeys(out))


def parse_timeout(text: str) -> float:
    """Seconds, more than 0 and at most 300."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        value = -1.0
    if not 0 < value <= 300:
        raise ValueError(f"expected a number of seconds from 0 (excluded) to 300, got {text!r}")
    return value


def parse_connections(text: str) -> int:
    """A pool size: 1 to 100 connections."""
    t = text.strip()
    if not (t.isdigit() and t.isascii() and 1 <= int(t) <= 100):
        raise ValueError(f"expected a number of connections from 1 to 100, got {text!r}")
    return int(t)
