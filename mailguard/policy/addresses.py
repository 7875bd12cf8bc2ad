"""Strict RFC 5321 envelope addresses: paths, MAIL/RCPT arguments, VRFY.

Everything here is pure: text (``str`` or ``bytes``) in, values out, and
every refusal is an L{AddressError} carrying the reply the protocol sends.
The grammar is RFC 5321 section 4.1.2 with these deliberate decisions:

- **Angle brackets.** ``<user@domain>`` is the standard form.  For interop
  with the many broken clients Postfix tolerates (``strict_rfc821_envelopes
  = no``), a *bare* mailbox ``user@domain`` is accepted too, but only a plain
  mailbox: no whitespace, no source route, no null path.  In MAIL/RCPT a bare
  path ends at the first space.
- **Source routes** ``<@a,@b:user@c>`` are parsed (the route domains must be
  valid domain names) and the route is ignored, as RFC 5321 section 3.6.1
  and Appendix C allow.  The mailbox after the route is what every later
  decision sees, so a route "via" a local domain gains nothing.
- **ASCII only.** mailguard does not advertise SMTPUTF8, so RFC 6531
  addresses are refused (``501``): any non-ASCII character or byte is a
  syntax error.  Control characters are refused everywhere, quoted strings
  included (``qtextSMTP``/``quoted-pairSMTP`` allow only %d32-126).
- **Quoted local parts** are unescaped.  When the unescaped text is a valid
  dot-string the quotes were only decoration (``"john"@x`` is ``john@x``):
  the L{Mailbox} holds the dot-string with ``quoted=False``.  An empty quoted
  local part (``""@x``) is refused: nothing can deliver to it.
- **Lengths** (RFC 5321 section 4.5.3.1): local part at most 64 octets as
  written (quotes and escapes included), each domain label at most 63, the
  domain at most 255, the whole path at most 256 octets.
- **Domains** are LDH labels (letter/digit at both ends, hyphens inside),
  compared and stored in lower case; one trailing dot is tolerated and
  stripped.  A domain whose last label is all digits (``user@127.0.0.1``
  without brackets) is refused: no top-level domain is numeric (RFC 1123
  section 2.1), so such a "domain" is always an IP address in disguise.
- **Address literals**: ``[1.2.3.4]`` (dotted quad, no leading zeros) and
  ``[IPv6:...]`` (no zone index), stored in canonical form
  (``[IPv6:2001:db8::1]``).  Other general address literals are refused.
  An address literal is never a local domain (see ``mailguard.policy.decide``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailguard.replies import (
    BAD_ADDRESS_SYNTAX,
    BAD_SENDER_SYNTAX,
    SYNTAX_ERROR,
    Reply,
)

__all__ = [
    "AddressError",
    "Mailbox",
    "HIDDEN_DESTINATION_CHARACTERS",
    "command_injection",
    "hidden_destination",
    "parse_mail_from",
    "parse_path",
    "parse_etrn_argument",
    "parse_rcpt_to",
    "parse_vrfy_argument",
]

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_LABEL = 63
MAX_PATH = 256

# RFC 5322 atext, the characters of an unquoted atom.
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_DOT_STRING = re.compile(f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DIGITS = re.compile(r"[0-9]+")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
# esmtp-keyword ["=" esmtp-value] (RFC 5321 section 4.1.2)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")

#: Characters that, in a local part, can make some MTA route the message to
#: another destination: ``@`` (nested address), ``%`` (the percent hack),
#: ``!`` (UUCP bang path), ``:`` and ``,`` (source routes, DECnet ``::``),
#: ``;`` (X.400/group syntax), ``<>[]()`` (angle addresses, literals, RFC 5322
#: comments) and ``"``/``\\`` (quoting that a careless re-quoting step can
#: break).  Only ``%`` and ``!`` can appear unquoted; the rest need quotes.
HIDDEN_DESTINATION_CHARACTERS = frozenset('@%!:,;<>[]()"\\')


class AddressError(ValueError):
    """An address or MAIL/RCPT argument that mailguard refuses.

    C{reply} is the L{Reply} to send (``501 5.1.3`` for RCPT, ``501 5.1.7``
    for MAIL, ``501 5.5.4`` for malformed parameters); C{str(error)} says
    why, for the log only: the client sees the named reply text.
    """

    def __init__(self, message: str, reply: Reply = BAD_ADDRESS_SYNTAX):
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Mailbox:
    """One parsed mailbox.

    @ivar local: the local part as given, case kept; unescaped and without
        quotes when C{quoted} is true, and without the quotes of a quoted
        string that was equivalent to a dot-string.
    @ivar domain: lower case, no trailing dot; an address literal is kept in
        brackets, canonical (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).
    @ivar quoted: True when the local part needs quoting on the wire.
    """

    local: str
    domain: str
    quoted: bool = False

    @property
    def wire_local(self) -> str:
        """The local part as it must be written in SMTP (quoted if needed)."""
        if not self.quoted:
            return self.local
        escaped = self.local.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'

    @property
    def address(self) -> str:
        """``local@domain`` in RFC 5321 form: the local part is quoted when
        it must be, so the text is unambiguous and parses back to this
        mailbox."""
        return f"{self.wire_local}@{self.domain}"

    @property
    def is_ip_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def ip_literal(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address of an address-literal domain, else None."""
        if not self.is_ip_literal:
            return None
        text = self.domain[1:-1]
        if text[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(text[5:])
        return ipaddress.IPv4Address(text)

    def __str__(self) -> str:
        return self.address


# --- the grammar ------------------------------------------------------------

def _text(value: str | bytes, reply: Reply) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise AddressError("non-ASCII bytes (SMTPUTF8 is not supported)", reply) from None
    if not isinstance(value, str):
        raise TypeError(f"expected str or bytes, got {type(value).__name__}")
    if not value.isascii():
        raise AddressError("non-ASCII characters (SMTPUTF8 is not supported)", reply)
    return value


def _scan_quoted(s: str, start: int, reply: Reply) -> tuple[str, int]:
    """Scan the quoted string at C{s[start] == '"'}; return its unescaped
    content and the index just past the closing quote."""
    out = []
    i = start + 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 >= n or not (32 <= ord(s[i + 1]) <= 126):
                raise AddressError("bad quoted pair in local part", reply)
            out.append(s[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        elif 32 <= ord(c) <= 126:
            out.append(c)
            i += 1
        else:
            raise AddressError("control character in quoted local part", reply)
    raise AddressError("unterminated quoted local part", reply)


def _parse_local(s: str, start: int, reply: Reply) -> tuple[str, bool, int]:
    """Parse the local part at C{s[start:]}; return (local, quoted, end)."""
    if s.startswith('"', start):
        content, end = _scan_quoted(s, start, reply)
        if not content:
            raise AddressError("empty quoted local part", reply)
        quoted = _DOT_STRING.fullmatch(content) is None
        local = content
    else:
        m = _DOT_STRING.match(s, start)
        if m is None:
            raise AddressError("empty or malformed local part", reply)
        end = m.end()
        local, quoted = m.group(), False
    if end - start > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} octets", reply)
    return local, quoted, end


def _parse_domain_name(s: str, reply: Reply) -> str:
    name = s[:-1] if s.endswith(".") and len(s) > 1 else s
    if not name:
        raise AddressError("empty domain", reply)
    if len(name) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} octets", reply)
    labels = name.split(".")
    for label in labels:
        if _LABEL.fullmatch(label) is None:
            raise AddressError(f"bad domain label {label!r}", reply)
    if _DIGITS.fullmatch(labels[-1]):
        raise AddressError("numeric top-level label (an IP address needs brackets)", reply)
    return name.lower()


def _parse_literal(s: str, reply: Reply) -> str:
    if len(s) < 3 or not s.endswith("]"):
        raise AddressError("malformed address literal", reply)
    inner = s[1:-1]
    if inner[:5].lower() == "ipv6:":
        text = inner[5:]
        if _IPV6_CHARS.fullmatch(text) is None:
            raise AddressError("malformed IPv6 address literal", reply)
        try:
            return f"[IPv6:{ipaddress.IPv6Address(text).compressed}]"
        except ValueError:
            raise AddressError("malformed IPv6 address literal", reply) from None
    if _IPV4.fullmatch(inner) is None:
        raise AddressError("unsupported or malformed address literal", reply)
    try:
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("malformed IPv4 address literal", reply) from None


def _parse_domain(s: str, reply: Reply) -> str:
    if s.startswith("["):
        return _parse_literal(s, reply)
    return _parse_domain_name(s, reply)


def _parse_mailbox(s: str, reply: Reply) -> Mailbox:
    local, quoted, end = _parse_local(s, 0, reply)
    if not s.startswith("@", end):
        raise AddressError("missing @domain", reply)
    return Mailbox(local, _parse_domain(s[end + 1:], reply), quoted)


def parse_path(text: str | bytes, *, allow_null: bool,
               reply: Reply = BAD_ADDRESS_SYNTAX) -> Mailbox | None:
    """Parse an RFC 5321 Path (``<[route:]mailbox>``) or a bare mailbox.

    @param allow_null: accept ``<>`` (the null reverse-path), returning None.
    @param reply: the reply an L{AddressError} carries (``501 5.1.3`` by
        default; L{parse_mail_from} passes ``501 5.1.7``).
    @raise AddressError: for anything else.
    """
    s = _text(text, reply)
    if len(s) > MAX_PATH:
        raise AddressError(f"path longer than {MAX_PATH} octets", reply)
    if not s.startswith("<"):
        # The bare form, for interop: a plain mailbox and nothing else.
        if not s:
            raise AddressError("empty path", reply)
        if " " in s:
            raise AddressError("whitespace in a path without angle brackets", reply)
        return _parse_mailbox(s, reply)
    if not s.endswith(">") or len(s) < 2:
        raise AddressError("unbalanced angle brackets", reply)
    inner = s[1:-1]
    if not inner:
        if allow_null:
            return None
        raise AddressError("null path not allowed here", reply)
    if inner.startswith("@"):
        # A-d-l = At-domain *( "," At-domain ) ":"; At-domain = "@" Domain
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("source route without ':'", reply)
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("malformed source route", reply)
            _parse_domain_name(hop[1:], reply)
    return _parse_mailbox(inner, reply)


# --- MAIL FROM / RCPT TO ------------------------------------------------------

def _split_path(rest: str, reply: Reply) -> tuple[str, str]:
    """Split C{rest} into the path and what follows it."""
    if not rest.startswith("<"):
        path, sep, tail = rest.partition(" ")
        return path, sep + tail
    i, n = 1, len(rest)
    while i < n:
        c = rest[i]
        if c == '"':
            _, i = _scan_quoted(rest, i, reply)
            continue
        if c == ">":
            return rest[: i + 1], rest[i + 1:]
        i += 1
    raise AddressError("unbalanced angle brackets", reply)


def _parse_params(tail: str) -> dict[str, str | None]:
    if tail and not tail.startswith(" "):
        raise AddressError("text after the path", SYNTAX_ERROR)
    params: dict[str, str | None] = {}
    for item in tail.split(" "):
        if not item:
            continue
        m = _PARAM.fullmatch(item)
        if m is None:
            raise AddressError(f"malformed parameter {item!r}", SYNTAX_ERROR)
        key = m.group(1).upper()
        if key in params:
            raise AddressError(f"duplicate parameter {key}", SYNTAX_ERROR)
        params[key] = m.group(2)
    return params


def _split_command(arg: str | bytes, keyword: str, reply: Reply) -> tuple[str, str]:
    s = _text(arg, reply).lstrip(" ").rstrip(" ")
    if s[: len(keyword)].upper() != keyword:
        raise AddressError(f"expected {keyword}", SYNTAX_ERROR)
    rest = s[len(keyword):].lstrip(" ")
    if not rest:
        raise AddressError("missing path", reply)
    return _split_path(rest, reply)


def parse_mail_from(arg: str | bytes) -> tuple[Mailbox | None, dict[str, str | None]]:
    """Parse the argument of MAIL: ``FROM:<a@b> SIZE=123 BODY=8BITMIME``.

    The keyword is case-insensitive and spaces may follow the colon.
    Parameters are ``KEY=VALUE`` or ``KEY``; keys are upper-cased, a key
    without a value maps to None, values are kept as sent (xtext is the
    caller's business).  Whether a parameter is supported is the caller's
    business too (``555``).

    @return: (the sender, or None for the null path ``<>``; the parameters)
    @raise AddressError: ``501 5.1.7`` for a bad path, ``501 5.5.4`` for a
        bad keyword or parameter.
    """
    path, tail = _split_command(arg, "FROM:", BAD_SENDER_SYNTAX)
    sender = parse_path(path, allow_null=True, reply=BAD_SENDER_SYNTAX)
    return sender, _parse_params(tail)


def parse_rcpt_to(arg: str | bytes, *, postmaster_domain: str | None = None
                  ) -> tuple[Mailbox, dict[str, str | None]]:
    """Parse the argument of RCPT: ``TO:<a@b> NOTIFY=NEVER``.

    RFC 5321 requires ``RCPT TO:<Postmaster>`` (no domain, any case) to be
    accepted; pass C{postmaster_domain} (the primary local domain) and it
    becomes ``Postmaster@that-domain``.  Without it, it is a syntax error.

    @raise AddressError: ``501 5.1.3`` for a bad or null path, ``501 5.5.4``
        for a bad keyword or parameter.
    """
    path, tail = _split_command(arg, "TO:", BAD_ADDRESS_SYNTAX)
    if path.lower() == "<postmaster>" and postmaster_domain:
        rcpt = Mailbox(path[1:-1], _parse_domain_name(postmaster_domain, BAD_ADDRESS_SYNTAX))
    else:
        rcpt = parse_path(path, allow_null=False, reply=BAD_ADDRESS_SYNTAX)
    assert rcpt is not None
    return rcpt, _parse_params(tail)


# --- what the policy must know ---------------------------------------------------

def hidden_destination(mailbox: Mailbox) -> bool:
    """True when the local part can hide another destination.

    ``user%other@local``, ``other!user@local``, ``"user@other"@local``,
    ``"@a:user@other"@local`` and their kin: a downstream MTA (or an alias
    expansion, or a careless re-quoting) may route them elsewhere.  The
    policy delivers such an address only to an exact local account and
    never relays it.  See L{HIDDEN_DESTINATION_CHARACTERS}.
    """
    return any(c in HIDDEN_DESTINATION_CHARACTERS for c in mailbox.local)


_DISPLAY_NAME_BAD = frozenset("<>\\")


def parse_vrfy_argument(text: str | bytes) -> str | None:
    """The user a VRFY argument names, or None when empty or malformed.

    Accepted forms: ``user``, ``"user name"`` (RFC 5321's own ``VRFY
    String``), ``user@domain``, ``<user@domain>``, ``<user>``, ``Full Name
    <user@domain>``, ``"Full Name" <user@domain>``.  Surrounding whitespace
    is ignored; otherwise the address itself follows the rules of
    L{parse_path} (so a bare ``user@domain`` holds no whitespace).  Returns ``user`` or
    ``user@domain`` with the domain in lower case and the local part quoted
    only where it must be.  Never raises for bad input.
    """
    try:
        s = _text(text, BAD_ADDRESS_SYNTAX).strip(" \t")
        if not s:
            return None
        if s.endswith(">"):
            # Skip a display name: the first '<' outside a quoted string.
            i, n = 0, len(s)
            while i < n and s[i] != "<":
                c = s[i]
                if c == '"':
                    _, i = _scan_quoted(s, i, BAD_ADDRESS_SYNTAX)
                    continue
                if c in _DISPLAY_NAME_BAD or not (32 <= ord(c) <= 126 or c == "\t"):
                    return None
                i += 1
            s = s[i + 1:-1]
            bracketed = True
        else:
            bracketed = False
            if (" " in s or "\t" in s) and not _is_one_quoted_string(s):
                return None
        if not s:
            return None
        if not s.startswith("@"):
            local, quoted, end = _parse_local(s, 0, BAD_ADDRESS_SYNTAX)
            if end == len(s):
                return Mailbox(local, "", quoted).wire_local
        mailbox = parse_path(f"<{s}>" if bracketed else s, allow_null=False)
    except AddressError:
        return None
    assert mailbox is not None
    return mailbox.address


def _is_one_quoted_string(s: str) -> bool:
    if not s.startswith('"'):
        return False
    try:
        _, end = _scan_quoted(s, 0, BAD_ADDRESS_SYNTAX)
    except AddressError:
        return False
    return end == len(s)


def parse_etrn_argument(text: str) -> str | None:
    """The node an ETRN argument names (RFC 1985): ``domain`` itself,
    ``@domain`` (it and its subdomains), or ``#queue`` -> None (the one
    queue there is: all of it).  ValueError for anything else."""
    from mailguard.config.values import parse_hostname

    target = text.strip()
    if target.startswith("#"):
        if len(target) < 2 or " " in target:
            raise ValueError(f"bad queue name {target!r}")
        return None
    at = "@" if target.startswith("@") else ""
    return at + parse_hostname(target[len(at):])


_LINE_BREAKING = re.compile("[\r\n\0]")


def command_injection(line: str) -> bool:
    """Whether C{line}, a command mailguard is about to send to another
    server (the relay queue's MAIL and RCPT, the gateway's VRFY and
    probes), holds CR, LF or NUL: written out, it would end the command
    early and start another (``RCPT TO:<x>\r\nDATA``).  The configuration
    and the SMTP parser refuse such addresses already; this is the last
    line of defence, and such a command is never sent."""
    return _LINE_BREAKING.search(line) is not None
