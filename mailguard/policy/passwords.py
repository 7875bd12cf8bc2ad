"""Passwords of configured users: the forms Kerio stores, and SMTP AUTH.

Kerio writes a user's C{Password} in one of these forms:

  - C{SHA:} + 16 hex digits (an 8-byte salt) + 40 hex digits (the 20-byte
    PBKDF2-HMAC-SHA1 digest of the UTF-8 password, 10000 iterations, over
    the salt bytes).  mailguard verifies it.
  - C{D3S:...} (Kerio's reversible scrambling) and any other
    C{SCHEME:} tag: mailguard cannot verify it; C{mailguard check} warns
    (L{password_warnings}) and that user cannot authenticate.  A value that
    starts with an upper-case tag and a colon (C{ABC:}) is never taken as
    plain text, and neither is a malformed C{SHA:} value.
  - anything else: plain text (mailguard's convenience for hand-written
    files), compared in constant time.
  - absent or empty: no password; the user cannot authenticate.

L{PasswordChecker} does the same work for every attempt: exactly one
PBKDF2 run (the user's own for C{SHA:}, a dummy one otherwise: unknown,
disabled, plain-text or password-less users), so the time AUTH takes does
not tell which users exist.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable

from zope.interface import implementer

from mailguard.policy.directory import normalise_domain
from mailguard.interfaces import IPasswordChecker
from mailguard.config.problems import Problem
from mailguard.config.records import UserRecord

__all__ = [
    "PasswordChecker",
    "SHA_ITERATIONS",
    "make_sha_password",
    "password_form",
    "password_warnings",
    "verify_password",
]

SHA_ITERATIONS = 10000
_SALT_BYTES = 8
_SHA = re.compile(r"SHA:([0-9A-Fa-f]{16})([0-9A-Fa-f]{40})")
_SCHEME = re.compile(r"([A-Z][A-Z0-9]{1,7}):")


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _parse_sha(stored: str) -> tuple[bytes, bytes] | None:
    match = _SHA.fullmatch(stored)
    if match is None:
        return None
    return bytes.fromhex(match.group(1)), bytes.fromhex(match.group(2))


def _sha_digest(password: str | bytes, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha1", _bytes(password), salt, SHA_ITERATIONS)


def password_form(stored: str | None) -> str:
    """C{"plain"}, C{"sha"}, C{"unsupported"} or C{"none"}."""
    if not stored:
        return "none"
    if _parse_sha(stored) is not None:
        return "sha"
    if _SCHEME.match(stored):
        return "unsupported"
    return "plain"


def verify_password(stored: str | None, offered: str | bytes) -> bool:
    """True if C{offered} is the password C{stored} describes.

    Unsupported forms, malformed C{SHA:} values and an absent or empty
    C{stored} never verify.
    """
    form = password_form(stored)
    if form == "sha":
        salt, digest = _parse_sha(stored)
        return hmac.compare_digest(_sha_digest(offered, salt), digest)
    if form == "plain":
        # compare_digest refuses non-ASCII str: compare the UTF-8 bytes.
        return hmac.compare_digest(_bytes(stored), _bytes(offered))
    return False


def make_sha_password(password: str | bytes, salt: bytes | None = None) -> str:
    """Kerio's C{SHA:} form of C{password}; a random salt unless given."""
    if salt is None:
        salt = os.urandom(_SALT_BYTES)
    if len(salt) != _SALT_BYTES:
        raise ValueError(f"the salt must be {_SALT_BYTES} bytes, not {len(salt)}")
    return f"SHA:{salt.hex()}{_sha_digest(password, salt).hex()}"


def password_warnings(users: Iterable[UserRecord]) -> list[Problem]:
    """A warning for each enabled user whose password mailguard cannot verify.

    Disabled users cannot authenticate anyway and are not reported; neither
    are users without a password (accounts authenticated elsewhere).
    """
    problems = []
    for user in users:
        if not user.enabled or password_form(user.password) != "unsupported":
            continue
        scheme = _SCHEME.match(user.password).group(1)
        if scheme == "SHA":
            what = "password in SHA: form is malformed (expected 56 hex digits)"
        else:
            what = f"password in {scheme}: form cannot be verified"
        problems.append(
            Problem(
                user.where,
                f"user {user.address}: {what}; this user cannot authenticate",
                severity="warning",
            )
        )
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
            self._accounts[key] = user.password if form in ("sha", "plain") else None
            plaintext = plaintext or form == "plain"
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
        if isinstance(stored, str) and password_form(stored) == "plain":
            return stored
        return None

    def has_plaintext_passwords(self) -> bool:
        return self._plaintext

    def __len__(self) -> int:
        return len(self._accounts)
