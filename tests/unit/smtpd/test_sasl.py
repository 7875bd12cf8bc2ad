"""SASL exchanges as values: responses in, a challenge, credentials or an
outcome out.  No transport, no password checker."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from mailguard.smtpd import sasl
from mailguard.smtpd.sasl import (
    ABORTED,
    DENIED,
    MALFORMED,
    Challenge,
    CramMD5Credentials,
    PlainCredentials,
)


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def exchange(mech: str, token=lambda n: "ab" * n, now=1234.9):
    return sasl.start(mech, hostname="mx.example.com", now=now, token=token)


# --- PLAIN ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload, step", [
    (b64("\0john\0secret"), PlainCredentials("john", "secret")),
    (b64("john\0john\0secret"), PlainCredentials("john", "secret")),
    (b64("jane\0john\0secret"), DENIED),  # no proxy authorisation
    (b64(b"\0\xff\0secret"), DENIED),  # not UTF-8: fails like a wrong password
    (b"not base64!", MALFORMED),
    (b"am9obg", MALFORMED),
    (b64("john\0secret"), MALFORMED),
    (b64("a\0b\0c\0d"), MALFORMED),
    (b"=", MALFORMED),  # RFC 4954 4: a zero-length initial response
])
def test_plain_initial_response(payload, step):
    assert exchange("PLAIN").first(payload) == step


def test_plain_with_a_challenge():
    ex = exchange("PLAIN")
    assert ex.first(None) == Challenge(b"")
    assert ex.respond(b"  " + b64("\0john\0secret") + b" ") == PlainCredentials("john", "secret")


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_star_aborts_every_mechanism(mech):
    ex = exchange(mech)
    assert isinstance(ex.first(None), Challenge)
    assert ex.respond(b"*") is ABORTED


# --- LOGIN ---------------------------------------------------------------------------


def test_login_two_steps():
    ex = exchange("LOGIN")
    assert ex.first(None) == Challenge(b"Username:")
    assert ex.respond(b64("john@example.com")) == Challenge(b"Password:")
    assert ex.respond(b64("secret")) == PlainCredentials("john@example.com", "secret")


def test_login_with_initial_response():
    ex = exchange("LOGIN")
    assert ex.first(b64("jane")) == Challenge(b"Password:")
    assert ex.respond(b64("pw")) == PlainCredentials("jane", "pw")


@pytest.mark.parametrize("first, responses, last", [
    (b"###", [], MALFORMED),
    (None, [b"%%%"], MALFORMED),
    (b64("john"), [b"%%%"], MALFORMED),
    (b64("john"), [b"*"], ABORTED),
    (b64(b"\xff"), [b64("pw")], DENIED),
])
def test_login_outcomes(first, responses, last):
    ex = exchange("LOGIN")
    step = ex.first(first)
    for response in responses:
        step = ex.respond(response)
    assert step == last


# --- CRAM-MD5 ------------------------------------------------------------------------


def test_cram_md5_nonce_is_msg_id_shaped_from_the_injected_sources():
    challenge = exchange("CRAM-MD5", token=lambda n: "c0ffee" * (n // 3), now=1234.9).first(None)
    assert challenge == Challenge(b"<" + b"c0ffee" * 4 + b".1234@mx.example.com>")


def test_cram_md5_nonces_differ_within_a_second():
    assert exchange("CRAM-MD5", token=sasl.secrets.token_hex).first(None) != \
        exchange("CRAM-MD5", token=sasl.secrets.token_hex).first(None)


def test_cram_md5_initial_response_is_ignored_but_empty_is_malformed():
    assert isinstance(exchange("CRAM-MD5").first(b"whatever"), Challenge)
    assert exchange("CRAM-MD5").first(b"=") is MALFORMED


def test_cram_md5_response_is_checked_against_the_secret():
    ex = exchange("CRAM-MD5")
    nonce = ex.first(None).data
    digest = hmac.new(b"john-secret", nonce, hashlib.md5).hexdigest()
    creds = ex.respond(b64(f"john@example.com {digest.upper()}"))
    assert isinstance(creds, CramMD5Credentials)
    assert creds.username == "john@example.com" and creds.challenge == nonce
    assert creds.check_password("john-secret")
    assert not creds.check_password("jane-secret")


@pytest.mark.parametrize("response, step", [
    (b"!!!", MALFORMED),
    (b64(b"\xff 0123"), DENIED),
])
def test_cram_md5_outcomes(response, step):
    ex = exchange("CRAM-MD5")
    ex.first(None)
    assert ex.respond(response) is step


def test_no_password_in_a_repr():
    assert "secret" not in repr(PlainCredentials("john", "secret"))
    assert "deadbeef" not in repr(CramMD5Credentials("john", b"<n>", b"deadbeef"))


def test_unknown_mechanism():
    with pytest.raises(ValueError):
        exchange("DIGEST-MD5")
