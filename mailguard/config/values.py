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
import json
import re
import unicodedata


def shown(text: str, limit: int = 40) -> str:
    """C{text} quoted for a message: every character that is not printable
    (CR, LF, NUL, bidi overrides...) escaped, so a hostile value cannot
    garble ``check`` output or a log line, and cut to C{limit} characters,
    saying how long it was."""
    out = json.dumps(text[:limit], ensure_ascii=False)
    if not out.isprintable():
        out = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in out)
    if len(text) > limit:
        return out[:-1] + f'..." ({len(text)} characters)'
    return out


def parse_bool(text: str) -> bool:
    t = text.strip()
    if t in ("1", "0"):
        return t == "1"
    raise ValueError(f"expected 0 or 1, got {shown(text)}")


# Numbers are ASCII decimal: int() and float() also take other scripts'
# digits ("\u0663" is 3), underscores, exponents, "inf" and "nan", and
# int() of a 5,000-digit string fails with a message about
# sys.set_int_max_str_digits().  The grammar is checked first, on a
# length-capped string, so none of that is reachable.
_UINT = re.compile(r"[0-9]{1,20}")
_DECIMAL = re.compile(r"([0-9]{1,12})(?:\.([0-9]{1,6}))?")


def _fmt(n: float) -> str:
    return f"{n:,}".replace(",", "") if isinstance(n, int) else f"{n:g}"


class Number:
    """A parser of a whole number in [C{lo}, C{hi}]; C{range} is the text
    the documentation and the messages show."""

    def __init__(self, lo: int, hi: int, what: str = "a non-negative decimal number") -> None:
        self.lo, self.hi, self.what = lo, hi, what
        self.range = f"{_fmt(lo)} to {_fmt(hi)}"

    def __call__(self, text: str) -> int:
        t = text.strip()
        if _UINT.fullmatch(t) is not None:
            value = int(t)
            if self.lo <= value <= self.hi:
                return value
        raise ValueError(f"expected {self.what} from {self.range}, got {shown(text)}")

    def __repr__(self) -> str:
        return f"<Number {self.range}>"


class Seconds:
    """A parser of a number of seconds in [C{lo}, C{hi}] (C{lo} excluded
    when C{open_lo}), fractions allowed: ``25``, ``0.5``."""

    def __init__(self, lo: float, hi: float, open_lo: bool = False) -> None:
        self.lo, self.hi, self.open_lo = lo, hi, open_lo
        self.range = f"{_fmt(lo)}{' (excluded)' if open_lo else ''} to {_fmt(hi)}"

    def __call__(self, text: str) -> float:
        t = text.strip()
        if _DECIMAL.fullmatch(t) is not None:
            value = float(t)
            if (self.lo < value if self.open_lo else self.lo <= value) and value <= self.hi:
                return value
        raise ValueError(f"expected a number of seconds from {self.range}, got {shown(text)}")

    def __repr__(self) -> str:
        return f"<Seconds {self.range}>"


#: The general parsers (a setting with its own range builds its own).
parse_uint = Number(0, 2**63 - 1)
parse_seconds = Seconds(0, 86400 * 365)
#: Seconds, more than 0 and at most 300.
parse_timeout = Seconds(0, 300, open_lo=True)
#: A pool size: 1 to 100 connections.
parse_connections = Number(1, 100, "a number of connections")


def parse_hostname(text: str) -> str:
    t = text.strip().rstrip(".")
    if not t or len(t) > 253 or any(
        not label or len(label) > 63 or not all(c.isalnum() or c == "-" for c in label)
        or label.startswith("-") or label.endswith("-") or not label.isascii()
        for label in t.split(".")
    ):
        raise ValueError(f"not a valid host name: {shown(text)}")
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
        raise ValueError(f"expected HOST:PORT (or [IPv6]:PORT), got {shown(text)}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    port_n = int(port)
    if not 0 < port_n < 65536:
        raise ValueError(f"port out of range in {shown(text)}")
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in {shown(text)}") from None
        return host, port_n
    try:
        return str(ipaddress.IPv4Address(host)), port_n
    except ValueError:
        pass
    if host.rpartition(".")[2].isdigit():
        raise ValueError(f"not an IPv4 address or a host name in {shown(text)}")
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
        raise ValueError(f"expected an IP address, got {shown(text)}") from None


def parse_domain_list(text: str) -> tuple[str, ...]:
    """Comma- (or semicolon-) separated domain names, lower case, no duplicates."""
    out = []
    for part in text.replace(";", ",").split(","):
        if part.strip():
            out.append(parse_hostname(part))
    return tuple(dict.fromkeys(out))


# --- names and addresses -------------------------------------------------------
#
# A user's name becomes a directory (its Maildir) and every name and address
# may be written on the wire (the relay queue, DSNs, the gateway), so the
# configuration refuses what has no business there: control characters
# (CR and LF are SMTP command injection; NUL truncates C strings), spaces,
# path separators, "." and ".." as whole names, and "@" inside a local part.

# The common case, checked at C speed: RFC 5322 atext and dots.
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+=?^_`{|}~.\-]{1,64}")
_BAD_CATEGORIES = {"Cc": "a control character", "Cf": "a format control character",
                   "Zl": "a line separator", "Zp": "a paragraph separator", "Zs": "a space"}
MAX_LOCAL_OCTETS = 64  # RFC 5321 section 4.5.3.1.1


def _bad_character(text: str) -> str | None:
    """What is wrong with the first unacceptable character of C{text}."""
    for c in text:
        if c == "/" or c == "\\":
            return f'a path separator ("{c}")'
        what = _BAD_CATEGORIES.get(unicodedata.category(c))
        if what is not None or c.isspace():
            return f"{what or 'a space'} (U+{ord(c):04X})"
    return None


def _local_problem(t: str) -> str | None:
    """What is wrong with the local part C{t}, or None."""
    if _PLAIN_LOCAL.fullmatch(t) is not None and t != "." and t != "..":
        return None
    if not t:
        return "is empty"
    bad = _bad_character(t)
    if bad is not None:
        return f"contains {bad}"
    if t in (".", ".."):
        return "is not allowed (it names a directory)"
    if "@" in t:
        return 'contains "@"'
    if len(t.encode("utf-8")) > MAX_LOCAL_OCTETS:
        return f"is longer than {MAX_LOCAL_OCTETS} octets"
    return None


def parse_local_part(text: str, what: str = "name") -> str:
    """A local part as the configuration names it (a user, an alias, the
    local part of an address), stripped, case kept.

    Refused: empty, longer than 64 octets, "." or "..", "@", control
    characters, spaces and path separators ("/", "\\").  C{what} names the
    value in the message."""
    t = text.strip()
    problem = _local_problem(t)
    if problem is not None:
        raise ValueError(f"{what} {shown(t)} {problem}" if t else f"{what} {problem}")
    return t


def parse_address(text: str, what: str = "address") -> str:
    """``local@domain``: a local part as L{parse_local_part} takes it and a
    host name (L{parse_hostname}, lower-cased)."""
    t = text.strip()
    bad = _bad_character(t)
    if bad is not None:
        raise ValueError(f"{what} {shown(t)} contains {bad}")
    local, at, domain = t.rpartition("@")
    if not at:
        raise ValueError(f"{what} {shown(t)} has no domain")
    if "@" in local:
        raise ValueError(f'{what} {shown(t)} contains more than one "@"')
    problem = _local_problem(local)
    if problem is not None:
        raise ValueError(f"{what} {shown(t)}: the local part {problem}")
    try:
        domain = parse_hostname(domain)
    except ValueError:
        raise ValueError(f"{what} {shown(t)}: {shown(domain)} is not a valid domain name") from None
    return f"{local}@{domain}"


def parse_name_or_address(text: str, what: str = "name") -> str:
    """A local part, or a whole address when C{text} holds an "@"."""
    if "@" in text:
        return parse_address(text, what)
    return parse_local_part(text, what)
