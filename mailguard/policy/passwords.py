"""Passwords of configured users: the forms Kerio stores, and SMTP AUTH.

Kerio writes a user's C{Password} in one of these forms:

  - C{D3S:} + hex: Kerio's reversible form, what real ``users.cfg`` files
    hold.  Triple-DES in ECB mode under a fixed, published key; the
    plaintext is 10 bytes of salt, the UTF-8 password and PKCS#5 padding
    (documented in John the Ripper's "Auditing Kerio Connect").  mailguard
    decodes it when the configuration is loaded (L{decode_d3s}, with the
    C{cryptography} package) and from then on holds a plain-text secret.
  - C{SHA:} + 16 hex digits (an 8-byte salt) + 40 hex digits (the 20-byte
    PBKDF2-HMAC-SHA1 digest of the UTF-8 password, 10000 iterations, over
    the salt bytes).  mailguard verifies it.  (Real files hold this form in
    C{PasswordHistory}, which mailguard never reads.)
  - C{NUL:}: no password; that account never authenticates.
  - any other C{SCHEME:} tag, or a malformed C{SHA:}/C{D3S:} value:
    mailguard cannot verify it; C{mailguard check} warns, one line per
    form (L{password_warnings}), and that user cannot authenticate.  A
    value that starts with an upper-case tag and a colon (C{ABC:}) is
    never taken as plain text.
  - anything else: plain text (mailguard's convenience for hand-written
    files).
  - absent or empty: no password; the user cannot authenticate.

Plain-text secrets (plain and decoded C{D3S:}) are compared in constant
time, serve CRAM-MD5 where it is enabled, and are never logged or printed:
a decoded one is held in a L{_Secret}, whose C{repr} and C{str} say
C{<secret>}.

L{PasswordChecker} does the same work for every attempt: exactly one
PBKDF2 run (the user's own for C{SHA:}, a dummy one otherwise: unknown,
disabled, plain-text, C{D3S:} or password-less users), so the time AUTH
takes does not tell which users exist.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from collections import Counter
from collections.abc import Iterable

from zope.interface import implementer

from mailguard.policy.directory import normalise_domain
from mailguard.interfaces import IPasswordChecker
from mailguard.config.problems import Problem, Where
from mailguard.config.records import UserRecord

__all__ = [
    "PasswordChecker",
    "SHA_ITERATIONS",
    "decode_d3s",
    "make_d3s_password",
    "make_sha_password",
    "password_form",
    "password_forms",
    "password_warnings",
    "verify_password",
]

SHA_ITERATIONS = 10000
_SALT_BYTES = 8
_SHA = re.compile(r"SHA:([0-9A-Fa-f]{16})([0-9A-Fa-f]{40})")
_D3S = re.compile(r"D3S:((?:[0-9A-Fa-f]{16}){2,64})")
_SCHEME = re.compile(r"([A-Z][A-Z0-9]{1,7}):")
# Kerio's fixed D3S: key, as published: 8 bytes, then sixteen 0x80 bytes.
D3S_KEY = bytes.fromhex("61d0e54954733b80") + b"\x80" * 16
_D3S_PREFIX = 10  # bytes of salt before the password

#: What each form is called in ``check`` output, in the order shown.
FORM_NAMES = {
    "d3s": "D3S: (Kerio's reversible form)",
    "sha": "SHA: (PBKDF2)",
    "plain": "plain text",
    "nul": "NUL: (no password)",
    "none": "empty (no password)",
    "unsupported": "unverifiable",
}


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _parse_sha(stored: str) -> tuple[bytes, bytes] | None:
    match = _SHA.fullmatch(stored)
    if match is None:
        return None
    return bytes.fromhex(match.group(1)), bytes.fromhex(match.group(2))


def _sha_digest(password: str | bytes, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha1", _bytes(password), salt, SHA_ITERATIONS)


@functools.cache
def _cipher():
    """Triple-DES/ECB under Kerio's key, from the C{cryptography} package
    (imported on first use: a configuration without C{D3S:} never pays)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    except ImportError:  # cryptography < 43
        from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES
    return Cipher(TripleDES(D3S_KEY), modes.ECB())


def decode_d3s(stored: str) -> str | None:
    """The password a C{D3S:} value holds, or None if C{stored} is not a
    well-formed one (bad hex, a length that is not whole blocks, bad
    padding).  Bytes that are not UTF-8 are kept (surrogate escapes), so
    the password compares byte for byte."""
    match = _D3S.fullmatch(stored)
    if match is None:
        return None
    decryptor = _cipher().decryptor()
    plain = decryptor.update(bytes.fromhex(match.group(1))) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= 8 or len(plain) - pad < _D3S_PREFIX or plain[-pad:] != bytes([pad]) * pad:
        return None
    return plain[_D3S_PREFIX:-pad].decode("utf-8", "surrogateescape")


def make_d3s_password(password: str | bytes, salt: bytes | None = None) -> str:
    """Kerio's C{D3S:} form of C{password} (for tests and tools); a random
    10-byte salt unless given."""
    if salt is None:
        salt = os.urandom(5).hex().encode()
    if len(salt) != _D3S_PREFIX:
        raise ValueError(f"the salt must be {_D3S_PREFIX} bytes, not {len(salt)}")
    data = salt + _bytes(password)
    pad = 8 - len(data) % 8
    encryptor = _cipher().encryptor()
    return "D3S:" + (encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize()).hex()


class _Secret:
    """A decoded password: compared in constant time, never shown."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def matches(self, offered: str | bytes) -> bool:
        return hmac.compare_digest(_bytes(self.value), _bytes(offered))

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def password_form(stored: str | None) -> str:
    """C{"plain"}, C{"sha"}, C{"d3s"}, C{"nul"}, C{"unsupported"} or
    C{"none"} (the keys of L{FORM_NAMES})."""
    if not stored:
        return "none"
    if stored.startswith("NUL:"):
        return "nul"
    if _parse_sha(stored) is not None:
        return "sha"
    if stored.startswith("D3S:") and decode_d3s(stored) is not None:
        return "d3s"
    if _SCHEME.match(stored):
        return "unsupported"
    return "plain"


def verify_password(stored: str | None, offered: str | bytes) -> bool:
    """True if C{offered} is the password C{stored} describes.

    Unsupported forms, malformed C{SHA:} and C{D3S:} values, C{NUL:} and
    an absent or empty C{stored} never verify.
    """
    form = password_form(stored)
    if form == "sha":
        salt, digest = _parse_sha(stored)
        return hmac.compare_digest(_sha_digest(offered, salt), digest)
    if form == "plain":
        # compare_digest refuses non-ASCII str: compare the UTF-8 bytes.
        return hmac.compare_digest(_bytes(stored), _bytes(offered))
    if form == "d3s":
        return _Secret(decode_d3s(stored)).matches(offered)
    return False


def make_sha_password(password: str | bytes, salt: bytes | None = None) -> str:
    """Kerio's C{SHA:} form of C{password}; a random salt unless given."""
    if salt is None:
        salt = os.urandom(_SALT_BYTES)
    if len(salt) != _SALT_BYTES:
        raise ValueError(f"the salt must be {_SALT_BYTES} bytes, not {len(salt)}")
    return f"SHA:{salt.hex()}{_sha_digest(password, salt).hex()}"


def password_forms(users: Iterable[UserRecord]) -> Counter[str]:
    """How many enabled users have a password in each form (L{FORM_NAMES})."""
    return Counter(password_form(u.password) for u in users if u.enabled)


def _unverifiable(stored: str) -> str:
    """Why C{stored}, an unsupported form, cannot be used."""
    scheme = _SCHEME.match(stored).group(1)
    if scheme == "SHA":
        return "in SHA: form that is malformed (expected 56 hex digits)"
    if scheme == "D3S":
        return "in D3S: form that cannot be decoded (bad length, hex or padding)"
    return f"in {scheme}: form, which mailguard cannot verify"


def password_warnings(users: Iterable[UserRecord]) -> list[Problem]:
    """One warning per kind of password mailguard cannot verify, with how
    many enabled users have it and the first of them: a real users.cfg has
    thousands of users, and ``check`` must stay readable.

    Disabled users cannot authenticate anyway and are not counted; neither
    are users without a password (C{NUL:} or none: accounts authenticated
    elsewhere, or not at all).
    """
    seen: dict[str, tuple[int, Where, str]] = {}
    for user in users:
        if not user.enabled or password_form(user.password) != "unsupported":
            continue
        what = _unverifiable(user.password)
        n, where, first = seen.get(what, (0, user.where, user.address))
        seen[what] = (n + 1, where, first)
    problems = []
    for what, (n, where, first) in seen.items():
        who = "1 enabled user has" if n == 1 else f"{n} enabled users have"
        they = "this user cannot" if n == 1 else "they cannot"
        problems.append(Problem(
            where, f"{who} a password {what} (first: {first}); {they} authenticate",
            severity="warning"))
    return problems


class _Disabled:
    def __repr__(self) -> str:
        return "<disabled>"


_DISABLED = _Disabled()
_MISSING = object()


@implementer(IPasswordChecker)
class PasswordChecker:
    """Checks SMTP AUTH credentials against the configured users.

    @param users: the L{UserRecord}s.
    @param directory: optional; its C{canonical_domain(domain)} maps domain
        aliases onto primary domains, and users it does not hold a domain
        for are left out (as the directory leaves them out).  Without it,
        user domains are taken as written.

    A username is C{user@domain} (the domain may be a domain alias) or a
    bare C{user} when exactly one account, enabled or not, has that name.
    Only the account name logs in, not a user's extra alias names (as
    Kerio).  When two records name the same account the first wins, as in
    the directory.
    """

    def __init__(self, users: Iterable[UserRecord], directory=None):
        self._canonical_domain = getattr(directory, "canonical_domain", None)
        # canonical address -> stored password (str), None (no usable
        # password) or _DISABLED
        self._accounts: dict[str, object] = {}
        domains: dict[str, None] = {}
        plaintext = False
        for user in users:
            domain = self._domain(user.domain.strip())
            name = user.name.strip()
            if domain is None or not name:
                continue
            key = f"{name.lower()}@{domain}"
            if key in self._accounts:
                continue
            domains[domain] = None
            if not user.enabled:
                self._accounts[key] = _DISABLED
                continue
            form = password_form(user.password)
            if form == "d3s":
                self._accounts[key] = _Secret(decode_d3s(user.password))
            else:
                self._accounts[key] = user.password if form in ("sha", "plain") else None
            plaintext = plaintext or form in ("plain", "d3s")
        self._domains = tuple(domains)
        self._plaintext = plaintext
        # A fresh random dummy per checker: its cost is that of a real one.
        self._dummy = make_sha_password(os.urandom(16).hex())

    def _domain(self, domain: str) -> str | None:
        if self._canonical_domain is not None:
            return self._canonical_domain(domain)
        return normalise_domain(domain) or None

    def _find(self, username: str) -> tuple[str | None, object]:
        """(canonical address, stored value) or (None, None); probes every
        candidate domain for a bare name, so the work does not depend on
        which exist."""
        local, sep, domain = username.strip().rpartition("@")
        if sep:
            primary = self._domain(domain) or normalise_domain(domain)
            candidates = (f"{local.lower()}@{primary}",)
        else:
            lower = domain.lower()
            candidates = tuple(f"{lower}@{d}" for d in self._domains)
        hits = [
            (key, value)
            for key in candidates
            if (value := self._accounts.get(key, _MISSING)) is not _MISSING
        ]
        if len(hits) != 1:
            return None, None
        return hits[0]

    def check_password(self, username: str, password: str | bytes) -> str | None:
        canonical, stored = self._find(username)
        usable = isinstance(stored, str)
        if usable and password_form(stored) == "sha":
            ok = verify_password(stored, password)
        else:
            verify_password(self._dummy, password)  # the same work, discarded
            if isinstance(stored, _Secret):
                ok = stored.matches(password)
            else:
                ok = usable and verify_password(stored, password)
        return canonical if ok else None

    def canonical(self, username: str) -> str | None:
        """The canonical address of the enabled account C{username} names
        (as L{check_password} resolves it), or None.  For CRAM-MD5, which
        checks the password itself with L{plaintext_password}."""
        canonical, stored = self._find(username)
        return None if stored is _DISABLED else canonical

    def plaintext_password(self, username: str) -> str | None:
        _, stored = self._find(username)
        if isinstance(stored, _Secret):
            return stored.value
        if isinstance(stored, str) and password_form(stored) == "plain":
            return stored
        return None

    def has_plaintext_passwords(self) -> bool:
        return self._plaintext

    def __len__(self) -> int:
        return len(self._accounts)
