"""SASL exchanges for SMTP AUTH (RFC 4954) as small objects.

In the shape of ``twisted.mail._cred``: one object per exchange, fed the
client's responses, answering with a value: a L{Challenge} to send, the
credentials to check (L{PlainCredentials}, L{CramMD5Credentials}), or an
outcome (L{MALFORMED}, L{ABORTED}, L{DENIED}).  No I/O: checking the
credentials is the caller's (it may take a thread, for PBKDF2), and the
CRAM-MD5 nonce's clock and randomness are passed in.

Nothing here logs, and no value's repr shows a password.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Callable

from mailguard.smtpd.framing import Marker as _Outcome

__all__ = [
    "ABORTED",
    "DENIED",
    "MALFORMED",
    "Challenge",
    "CramMD5Credentials",
    "PlainCredentials",
    "start",
]


MALFORMED = _Outcome("MALFORMED")  # not base64, or not the mechanism's form: 501
ABORTED = _Outcome("ABORTED")  # the client sent "*" (RFC 4954 4): 501 5.0.0
DENIED = _Outcome("DENIED")  # fails as a wrong password does, without a check


@dataclass(frozen=True)
class Challenge:
    """Send ``334`` and this (base64-encoded); the exchange goes on."""

    data: bytes


@dataclass(frozen=True)
class PlainCredentials:
    """A user name and password to check (PLAIN, LOGIN)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class CramMD5Credentials:
    """A CRAM-MD5 response (RFC 2195): checked against a plain-text secret."""

    username: str
    challenge: bytes
    response: bytes = field(repr=False)

    def check_password(self, secret: str) -> bool:
        expected = hmac.new(secret.encode("utf-8"), self.challenge, "md5").hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.response.lower())


Step = Challenge | PlainCredentials | CramMD5Credentials | _Outcome


def _b64(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _credentials(user: bytes, password: bytes) -> PlainCredentials | _Outcome:
    try:
        return PlainCredentials(user.decode("utf-8"), password.decode("utf-8"))
    except UnicodeDecodeError:
        return DENIED


class _Exchange:
    """One exchange.  L{first} takes the AUTH command's initial response
    (None without one); L{respond} each response line after a challenge."""

    def first(self, initial: bytes | None) -> Step:
        if initial == b"=":  # RFC 4954 4: an initial response of zero length
            return MALFORMED
        return self._first(initial)

    def respond(self, line: bytes) -> Step:
        line = line.strip()
        if line == b"*":
            return ABORTED
        return self._respond(line)

    def _first(self, initial: bytes | None) -> Step:
        raise NotImplementedError

    def _respond(self, line: bytes) -> Step:
        raise NotImplementedError


class Plain(_Exchange):
    """RFC 4616: authzid NUL authcid NUL password.  No proxy authorisation:
    an authzid other than the authcid is denied."""

    def _first(self, initial: bytes | None) -> Step:
        return Challenge(b"") if not initial else self._respond(initial)

    def _respond(self, line: bytes) -> Step:
        decoded = _b64(line)
        if decoded is None:
            return MALFORMED
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return MALFORMED
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            return DENIED
        return _credentials(authcid, password)


class Login(_Exchange):
    """The LOGIN mechanism (draft-murchison-sasl-login): user, then password."""

    def __init__(self) -> None:
        self._user: bytes | None = None

    def _first(self, initial: bytes | None) -> Step:
        if not initial:
            return Challenge(b"Username:")
        return self._respond(initial)

    def _respond(self, line: bytes) -> Step:
        decoded = _b64(line)
        if decoded is None:
            return MALFORMED
        if self._user is None:
            self._user = decoded
            return Challenge(b"Password:")
        return _credentials(self._user, decoded)


class CramMD5(_Exchange):
    """RFC 2195.  The nonce is unique and unpredictable, in msg-id form.

    @param hostname: ends the nonce.
    @param now: the time (seconds); a clock's C{seconds}.
    @param token: random hex; C{secrets.token_hex} unless a test fixes it.
    """

    def __init__(self, hostname: str, now: float,
                 token: Callable[[int], str] = secrets.token_hex) -> None:
        self.nonce = f"<{token(12)}.{int(now)}@{hostname}>".encode("ascii")

    def _first(self, initial: bytes | None) -> Step:
        return Challenge(self.nonce)  # an initial response is ignored

    def _respond(self, line: bytes) -> Step:
        decoded = _b64(line)
        if decoded is None:
            return MALFORMED
        user, _, digest = decoded.rpartition(b" ")
        try:
            name = user.decode("utf-8")
        except UnicodeDecodeError:
            return DENIED
        return CramMD5Credentials(name, self.nonce, digest)


def start(mechanism: str, *, hostname: str, now: float,
          token: Callable[[int], str] = secrets.token_hex) -> _Exchange:
    """A new exchange for C{mechanism} ("PLAIN", "LOGIN" or "CRAM-MD5")."""
    if mechanism == "PLAIN":
        return Plain()
    if mechanism == "LOGIN":
        return Login()
    if mechanism == "CRAM-MD5":
        return CramMD5(hostname, now, token)
    raise ValueError(f"unknown SASL mechanism {mechanism!r}")
