"""SMTP AUTH (PLAIN, LOGIN, CRAM-MD5) and TLS (STARTTLS, implicit TLS).

The AUTH exchanges run over a StringTransport with a task.Clock (the
slow-down is a call on the clock); TLS runs over real sockets against a
real ``twistd -n mailguard`` with a certificate made by ``tests/certs.py``.
"""

from __future__ import annotations

import re

import dataclasses

import base64
import hashlib
import hmac
import smtplib
import socket
import ssl

import pytest
from twisted.python import usage
from zope.interface import implementer

from mailguard import replies as R
from mailguard.interfaces import IPasswordChecker
from mailguard.smtpd.extensions import AUTH_FAILURE_LIMIT
from mailguard.policy.passwords import make_sha_password
from mailguard.tap import Options
from tests.certs import make_certs
from tests.conftest import free_port, wait_for_port
from mailguard.testing import LogCapture, b64, connect
from tests.helpers_context import CRAM_MD5, USERS, maildir_messages, make_context, write_config

TLS = object()  # stand-in TLS context: TLSStringTransport only records it
JOHN = "john@example.com"
PASSWORDS = ["john-secret", "jane-secret", "sam-secret", "former-secret", "wrong-secret"]


def code(reply: R.Reply) -> str:
    return f"{reply.code} {reply.status}".strip()


@pytest.fixture
def ctx(tmp_path):
    """TLS configured: sessions on the fake TLS transport can STARTTLS;
    CRAM-MD5 turned on (SmtpAuthCramMd5Enabled=1)."""
    return make_context(tmp_path, CRAM_MD5, tls=TLS)


def tls_session(ctx, listener="smtp", ip="127.0.0.3"):
    """A session after EHLO, STARTTLS, EHLO: plain-text mechanisms offered."""
    s = connect(ctx, listener=listener, client_ip=ip)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    assert s.codes(s.cmd("STARTTLS")) == []  # the 220 went out before TLS
    assert s.transport.before_tls.startswith(b"220 2.0.0")
    out = s.cmd("EHLO client.test")
    assert b"AUTH CRAM-MD5 PLAIN LOGIN" in out
    return s


def plain(user, password, authzid=""):
    return b64(f"{authzid}\0{user}\0{password}")


def cram_response(challenge_line: bytes, user: str, password: str) -> str:
    assert challenge_line.startswith(b"334 ")
    nonce = base64.b64decode(challenge_line[4:].strip())
    digest = hmac.new(password.encode(), nonce, hashlib.md5).hexdigest()
    return b64(f"{user} {digest}")


def assert_failed_after_delay(s, ctx, seconds: float, out: bytes = b""):
    """A failure is answered only after the slow-down delay."""
    assert out == b"" and s.take() == b""
    ctx.clock.advance(seconds - 0.01)
    assert s.take() == b""
    ctx.clock.advance(0.01)
    assert s.codes(s.take()) == [code(R.AUTH_FAILED)] == ["535 5.7.8"]


# --- mechanisms offered -----------------------------------------------------------


def test_plaintext_mechanisms_not_offered_before_tls(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    out = s.cmd("EHLO client.test")
    assert b"250-AUTH CRAM-MD5\r\n" in out


def test_plain_and_login_refused_before_tls(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == [code(R.AUTH_NEEDS_TLS)] == ["538 5.7.11"]
    assert s.codes(s.cmd("AUTH LOGIN")) == ["538 5.7.11"]
    assert s.proto.session.authenticated is None


def test_cram_md5_not_offered_without_plaintext_passwords(tmp_path):
    sha_only = [(n, d, p if p.startswith("SHA:") else make_sha_password(p), e) for n, d, p, e in USERS]
    ctx = make_context(tmp_path, CRAM_MD5, users=sha_only, tls=TLS)
    s = connect(ctx)
    s.take()  # the greeting
    out = s.cmd("EHLO client.test")
    assert b"AUTH" not in out
    assert s.codes(s.cmd("AUTH CRAM-MD5")) == ["504 5.5.4"]
    s.cmd("STARTTLS")
    assert b"250-AUTH PLAIN LOGIN\r\n" in s.cmd("EHLO client.test")


def test_smtps_offers_plaintext_mechanisms_at_once(ctx):
    s = connect(ctx, listener="smtps")
    s.take()  # the greeting
    assert b"250-AUTH CRAM-MD5 PLAIN LOGIN\r\n" in s.cmd("EHLO client.test")
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]


def test_auth_not_advertised_once_authenticated(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))
    assert b"AUTH" not in s.cmd("EHLO client.test")


# --- PLAIN ------------------------------------------------------------------------


def test_plain_with_initial_response(ctx):
    s = tls_session(ctx)
    with LogCapture() as logs:
        assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == [code(R.AUTH_OK)] == ["235 2.7.0"]
    assert s.proto.session.authenticated == JOHN
    assert re.search(r"^auth session=\w{12} ip=127\.0\.0\.3 mechanism=PLAIN result=ok user=john@example\.com$",
                     logs.text(), re.M)


def test_plain_with_challenge(ctx):
    s = tls_session(ctx)
    assert s.cmd("AUTH PLAIN") == b"334 \r\n"
    assert s.codes(s.cmd(plain(JOHN, "john-secret"))) == ["235 2.7.0"]


def test_plain_with_matching_authzid(ctx):
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret", authzid=JOHN))) == ["235 2.7.0"]


def test_plain_with_other_authzid_fails(ctx):
    s = tls_session(ctx)
    out = s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret", authzid="jane@example.com"))
    assert_failed_after_delay(s, ctx, 1, out)
    assert s.proto.session.authenticated is None


def test_plain_wrong_password(ctx):
    s = tls_session(ctx)
    assert_failed_after_delay(s, ctx, 1, s.cmd("AUTH PLAIN " + plain(JOHN, "wrong-secret")))


def test_plain_bare_user_name_and_domain_alias(ctx):
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN " + plain("john", "john-secret"))) == ["235 2.7.0"]
    assert s.proto.session.authenticated == JOHN
    s2 = tls_session(ctx)
    assert s2.codes(s2.cmd("AUTH PLAIN " + plain("JOHN@example.net", "john-secret"))) == ["235 2.7.0"]
    assert s2.proto.session.authenticated == JOHN


def test_sha_password_user_logs_in(ctx):
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN " + plain("sam@example.com", "sam-secret"))) == ["235 2.7.0"]
    assert s.proto.session.authenticated == "sam@example.com"


def test_sha_password_user_wrong_password(ctx):
    s = tls_session(ctx)
    assert_failed_after_delay(s, ctx, 1, s.cmd("AUTH PLAIN " + plain("sam@example.com", "john-secret")))


def test_disabled_user_cannot_log_in(ctx):
    s = tls_session(ctx)
    assert_failed_after_delay(s, ctx, 1, s.cmd("AUTH PLAIN " + plain("former@example.com", "former-secret")))
    assert s.proto.session.authenticated is None
    out = s.cmd("AUTH LOGIN " + b64("former@example.com"))
    assert out == b"334 " + b64("Password:").encode() + b"\r\n"
    assert_failed_after_delay(s, ctx, 2, s.cmd(b64("former-secret")))


def test_disabled_user_cannot_use_cram_md5(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    challenge = s.cmd("AUTH CRAM-MD5")
    assert_failed_after_delay(s, ctx, 1, s.cmd(cram_response(challenge, "former@example.com", "former-secret")))


def test_unknown_user_fails(ctx):
    s = tls_session(ctx)
    assert_failed_after_delay(s, ctx, 1, s.cmd("AUTH PLAIN " + plain("nobody@example.com", "x")))


@pytest.mark.parametrize("payload", ["not base64!", "am9obg", b64("john\0john-secret"), b64("a\0b\0c\0d")])
def test_plain_malformed(ctx, payload):
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN " + payload)) == ["501 5.5.4"]
    assert s.proto.smtp.mode == "COMMAND"
    assert s.codes(s.cmd("NOOP")) == ["250 2.0.0"]


def test_plain_empty_initial_response_is_malformed(ctx):
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN =")) == ["501 5.5.4"]


def test_plain_abort(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH PLAIN")
    assert s.codes(s.cmd("*")) == [code(R.AUTH_ABORTED)] == ["501 5.0.0"]
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]


# --- LOGIN ------------------------------------------------------------------------


def test_login_two_steps(ctx):
    s = tls_session(ctx)
    assert s.cmd("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert s.cmd(b64(JOHN)) == b"334 UGFzc3dvcmQ6\r\n"
    assert s.codes(s.cmd(b64("john-secret"))) == ["235 2.7.0"]


def test_login_with_initial_response(ctx):
    s = tls_session(ctx)
    assert s.cmd("AUTH LOGIN " + b64("jane@example.com")) == b"334 UGFzc3dvcmQ6\r\n"
    with LogCapture() as logs:
        assert s.codes(s.cmd(b64("jane-secret"))) == ["235 2.7.0"]
    assert s.proto.session.authenticated == "jane@example.com"
    assert re.search(r"^auth session=\w{12} ip=127\.0\.0\.3 mechanism=LOGIN result=ok user=jane@example\.com$",
                     logs.text(), re.M)  # the mechanism chosen


def test_login_sha_user(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH LOGIN")
    s.cmd(b64("sam"))
    assert s.codes(s.cmd(b64("sam-secret"))) == ["235 2.7.0"]


def test_login_abort_at_each_step(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH LOGIN")
    assert s.codes(s.cmd("*")) == ["501 5.0.0"]
    s.cmd("AUTH LOGIN")
    s.cmd(b64(JOHN))
    assert s.codes(s.cmd("*")) == ["501 5.0.0"]
    assert s.proto.session.authenticated is None


def test_login_malformed_base64(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH LOGIN")
    assert s.codes(s.cmd("%%%")) == ["501 5.5.4"]
    assert s.codes(s.cmd("AUTH LOGIN ###")) == ["501 5.5.4"]


# --- CRAM-MD5 -----------------------------------------------------------------------


def test_cram_md5_success_without_tls(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    challenge = s.cmd("AUTH CRAM-MD5")
    nonce = base64.b64decode(challenge[4:].strip())
    assert nonce.startswith(b"<") and nonce.endswith(b"@mx.example.com>")
    with LogCapture() as logs:
        assert s.codes(s.cmd(cram_response(challenge, "john", "john-secret"))) == ["235 2.7.0"]
    assert s.proto.session.authenticated == JOHN
    assert re.search(r"^auth session=\w{12} ip=127\.0\.0\.3 mechanism=CRAM-MD5 result=ok user=john@example\.com$",
                     logs.text(), re.M)


def test_cram_md5_challenges_differ(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    first = s.cmd("AUTH CRAM-MD5")
    s.cmd("*")
    assert s.cmd("AUTH CRAM-MD5") != first  # same clock second, still unique


def test_cram_md5_wrong_password(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    challenge = s.cmd("AUTH CRAM-MD5")
    assert_failed_after_delay(s, ctx, 1, s.cmd(cram_response(challenge, JOHN, "jane-secret")))


def test_cram_md5_replayed_response_fails(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    old = cram_response(s.cmd("AUTH CRAM-MD5"), JOHN, "john-secret")
    s.cmd(old)
    s2 = connect(ctx)
    s2.take()  # the greeting
    s2.cmd("EHLO client.test")
    s2.cmd("AUTH CRAM-MD5")
    assert_failed_after_delay(s2, ctx, 1, s2.cmd(old))


def test_cram_md5_sha_user_cannot_use_it(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    challenge = s.cmd("AUTH CRAM-MD5")
    assert_failed_after_delay(s, ctx, 1, s.cmd(cram_response(challenge, "sam@example.com", "sam-secret")))


def test_cram_md5_abort_and_malformed(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    s.cmd("AUTH CRAM-MD5")
    assert s.codes(s.cmd("*")) == ["501 5.0.0"]
    s.cmd("AUTH CRAM-MD5")
    assert s.codes(s.cmd("!!!")) == ["501 5.5.4"]


# --- the AUTH command itself --------------------------------------------------------


def test_auth_sequence_errors(ctx):
    s = connect(ctx, listener="smtps")
    s.take()  # the greeting
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["503 5.5.1"]  # before EHLO
    s.cmd("EHLO client.test")
    assert s.codes(s.cmd("AUTH")) == ["501 5.5.4"]
    assert s.codes(s.cmd("AUTH DIGEST-MD5")) == ["504 5.5.4"]
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["503 5.5.1"]  # in a transaction
    s.cmd("RSET")
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["503 5.5.1"]  # already


def test_auth_line_may_exceed_512_octets(ctx):
    s = tls_session(ctx)
    line = "AUTH PLAIN " + plain(JOHN, "x" * 3000)
    assert len(line) > 512
    assert_failed_after_delay(s, ctx, 1, s.cmd(line))  # a wrong password, not "line too long"


def test_auth_line_over_12288_octets_is_refused(ctx):
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN " + "A" * 13000)) == ["500 5.5.2"]


def test_auth_response_over_12288_octets_cancels_the_exchange(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH PLAIN")
    out = s.send("A" * 7000)
    out += s.send("A" * 7000)
    out += s.send("\r\nNOOP\r\n")
    assert s.codes(out) == ["500 5.5.2", "250 2.0.0"]
    assert s.proto.smtp.mode == "COMMAND"


def test_commands_pipelined_behind_auth_wait_for_its_answer(ctx):
    s = tls_session(ctx)
    out = s.send("AUTH PLAIN " + plain(JOHN, "bad") + "\r\nNOOP\r\n")
    assert out == b""
    ctx.clock.advance(1)
    assert s.codes(s.take()) == ["535 5.7.8", "250 2.0.0"]


# --- slow-down, then close --------------------------------------------------------


def test_repeated_failures_slow_down_then_close(ctx):
    s = tls_session(ctx)
    for n in range(1, AUTH_FAILURE_LIMIT):
        assert_failed_after_delay(s, ctx, n, s.cmd("AUTH PLAIN " + plain(JOHN, f"bad{n}")))
    out = s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret-not"))
    assert s.codes(out) == ["421 4.7.0"] and s.closed
    s.lose()
    ctx.clock.advance(0)  # the security log's lines are written
    assert ctx.clock.getDelayedCalls() == []


def test_auth_failure_limit_is_a_setting(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxAuthFailures": "2", **CRAM_MD5}, tls=TLS)
    s = tls_session(ctx)
    assert_failed_after_delay(s, ctx, 1, s.cmd("AUTH PLAIN " + plain(JOHN, "bad1")))
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "bad2"))) == ["421 4.7.0"] and s.closed


def test_disconnect_during_slow_down(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH PLAIN " + plain(JOHN, "bad"))
    s.lose()
    ctx.clock.advance(0)  # the security log's line is written
    assert ctx.clock.getDelayedCalls() == []


def test_success_after_a_failure(ctx):
    s = tls_session(ctx)
    assert_failed_after_delay(s, ctx, 1, s.cmd("AUTH PLAIN " + plain(JOHN, "bad")))
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]


# --- credentials never reach a log ------------------------------------------------


@implementer(IPasswordChecker)
class ExplodingPasswords:
    """A checker that fails with the credentials in its exception text."""

    def check_password(self, username, password):
        raise ValueError(f"cannot check {username}:{password}")

    def plaintext_password(self, username):
        raise ValueError(f"cannot read {username}")

    def has_plaintext_passwords(self):
        return True


def secrets_of(*passwords):
    out = []
    for p in passwords:
        out += [p, b64(p), b64(f"\0{JOHN}\0{p}"), b64(f"\0john\0{p}")]
    return out


def test_credentials_never_reach_the_log(ctx):
    with LogCapture() as logs:
        s = tls_session(ctx)
        s.cmd("AUTH PLAIN " + plain(JOHN, "wrong-secret"))
        ctx.clock.advance(1)
        s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))
        s2 = tls_session(ctx)
        s2.cmd("AUTH LOGIN")
        s2.cmd(b64("jane@example.com"))
        s2.cmd(b64("jane-secret"))
        s3 = tls_session(ctx)
        s3.cmd("AUTH PLAIN " + plain("sam", "sam-secret"))
        s4 = tls_session(ctx)
        s4.cmd("AUTH PLAIN " + plain("former@example.com", "former-secret"))
        ctx.clock.advance(1)
        s5 = tls_session(ctx)
        s5.cmd("AUTH PLAIN")
        s5.cmd("A" * 13000)  # an over-long response
        s5.cmd("AUTH PLAIN " + b64("\0john\0wrong-secret\0extra"))  # malformed
    text = logs.text()
    assert "result=ok user=john@example.com" in text  # the log works...
    for secret in secrets_of(*PASSWORDS):
        assert secret not in text  # ...and holds no credential


def test_internal_error_in_auth_logs_no_credentials(ctx):
    ctx.policies = dataclasses.replace(ctx.policies, passwords=ExplodingPasswords())
    with LogCapture() as logs:
        s = tls_session(ctx)
        assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == [code(R.AUTH_TEMPORARY)]
        assert s.cmd("AUTH LOGIN " + b64(JOHN)).startswith(b"334 ")
        assert s.codes(s.cmd(b64("jane-secret"))) == ["454 4.7.0"]
        challenge = s.cmd("AUTH CRAM-MD5")
        assert s.codes(s.cmd(cram_response(challenge, JOHN, "sam-secret"))) == ["454 4.7.0"]
        assert s.codes(s.cmd("NOOP")) == ["250 2.0.0"]
    text = logs.text()
    assert "internal error in AUTH: ValueError" in text
    for secret in secrets_of("john-secret", "jane-secret", "sam-secret"):
        assert secret not in text


# --- what AUTH grants -------------------------------------------------------------


def test_submission_requires_auth_before_mail(ctx):
    s = tls_session(ctx, listener="submission")
    assert s.codes(s.cmd("MAIL FROM:<john@example.com>")) == [code(R.AUTH_REQUIRED)] == ["530 5.7.0"]
    s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))
    assert s.codes(s.cmd("MAIL FROM:<john@example.com>")) == ["250 2.1.0"]


def test_submission_with_cram_md5_without_tls(ctx):
    s = connect(ctx, listener="submission")
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    assert s.codes(s.cmd("MAIL FROM:<>")) == ["530 5.7.0"]
    challenge = s.cmd("AUTH CRAM-MD5")
    s.cmd(cram_response(challenge, JOHN, "john-secret"))
    assert s.codes(s.cmd("MAIL FROM:<>")) == ["250 2.1.0"]


def test_authenticated_client_may_relay(ctx):
    s = tls_session(ctx)
    s.cmd("MAIL FROM:<john@example.com>")
    assert s.codes(s.cmd("RCPT TO:<user@elsewhere.test>")) == ["554 5.7.1"]
    s.cmd("RSET")
    s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))
    s.cmd("MAIL FROM:<john@example.com>")
    assert s.codes(s.cmd("RCPT TO:<user@elsewhere.test>")) == ["250 2.1.5"]


def test_auth_does_not_grant_relay_when_disabled(tmp_path):
    ctx = make_context(tmp_path, {"RelayControlAuthEnabled": "0", **CRAM_MD5}, tls=TLS)
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]
    s.cmd("MAIL FROM:<john@example.com>")
    assert s.codes(s.cmd("RCPT TO:<user@elsewhere.test>")) == ["554 5.7.1"]


def test_received_header_marks_authenticated_sessions(ctx):
    s = tls_session(ctx)
    s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))
    s.send("MAIL FROM:<john@example.com>\r\nRCPT TO:<jane@example.com>\r\nDATA\r\nhi\r\n.\r\n")
    assert b" with ESMTPSA id " in maildir_messages(ctx, "jane@example.com")[0]
    s2 = connect(ctx)
    s2.take()  # the greeting
    s2.cmd("EHLO client.test")
    s2.cmd(cram_response(s2.cmd("AUTH CRAM-MD5"), JOHN, "john-secret"))
    s2.send("MAIL FROM:<john@example.com>\r\nRCPT TO:<jane@example.com>\r\nDATA\r\nhi\r\n.\r\n")
    stored = maildir_messages(ctx, "jane@example.com")
    assert any(b" with ESMTPA id " in m for m in stored)
    # The Received header names no user (the Return-Path before it is the
    # envelope sender, which the client chose).
    assert all(b"john" not in m[m.index(b"Received:"):].split(b";")[0] for m in stored)


def test_starttls_forgets_authentication(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    s.cmd(cram_response(s.cmd("AUTH CRAM-MD5"), JOHN, "john-secret"))
    assert s.proto.session.authenticated == JOHN
    s.cmd("STARTTLS")
    assert s.proto.session.authenticated is None


# --- real sockets: STARTTLS, implicit TLS, submission ---------------------------------


@pytest.fixture
def tls_server(twistd, tmp_path):
    certs = make_certs(tmp_path / "certs")
    cfg = write_config(tmp_path / "mailserver.cfg", CRAM_MD5)
    smtps, submission = free_port(), free_port()
    server = twistd("--tls-cert", certs.cert, "--tls-key", certs.key,
                    "--smtps", f"tcp:{smtps}:interface=127.0.0.1",
                    "--submission", f"tcp:{submission}:interface=127.0.0.1", config=cfg)
    wait_for_port("127.0.0.1", smtps, server.proc)
    wait_for_port("127.0.0.1", submission, server.proc)
    server.smtps, server.submission, server.certs = smtps, submission, certs
    return server


def client_context(certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certs.ca)


def test_starttls_real_socket(tls_server):
    s = tls_server
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert c.has_extn("starttls")
        assert c.esmtp_features["auth"].split() == ["CRAM-MD5"]
        code_, _ = c.starttls(context=client_context(s.certs))
        assert code_ == 220
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert c.sock.getpeercert()["subjectAltName"][0] == ("DNS", "mx.example.com")
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        assert c.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]
        assert c.login(JOHN, "john-secret")[0] == 235
        c.sendmail(JOHN, ["jane@example.com"], b"Subject: tls\r\n\r\nover TLS\r\n")
    stored = s.maildir_files("jane@example.com")[0].read_bytes()
    assert b" with ESMTPSA id " in stored
    s.stop()
    log = s.output()
    assert "result=ok user=john@example.com" in log
    for secret in secrets_of("john-secret"):
        assert secret not in log


PROTOCOL_VERSION_ALERT = 70  # RFC 5246 7.2: protocol_version
SUPPORTED_VERSIONS = 0x002B  # RFC 8446 4.2.1: the extension that offers TLS 1.3/1.2


def old_client_hello() -> tuple[bytes, ssl.SSLObject, ssl.MemoryBIO]:
    """A ClientHello that offers TLS 1.0 and 1.1 only, made by Python's
    ``ssl`` on memory BIOs.  The client's OpenSSL would refuse these
    versions at its default security level, so the context says so
    explicitly (``@SECLEVEL=0``); the bytes are checked, so the test
    cannot pass on a client that offered something newer."""
    import warnings

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert offered_versions(hello) == (0x0302, False), "the client did not offer TLS 1.1 at most"
    return hello, tls, incoming


def offered_versions(record: bytes) -> tuple[int, bool]:
    """The ClientHello's legacy version, and whether it carries the
    supported_versions extension (which is how TLS 1.2+ is offered)."""
    assert record[0] == 0x16 and record[5] == 0x01  # handshake record, ClientHello
    body = record[9:]
    version = int.from_bytes(body[0:2], "big")
    i = 2 + 32  # version, random
    i += 1 + body[i]  # session id
    i += 2 + int.from_bytes(body[i:i + 2], "big")  # cipher suites
    i += 1 + body[i]  # compression methods
    end = i + 2 + int.from_bytes(body[i:i + 2], "big")
    i += 2
    kinds = []
    while i < end:
        kinds.append(int.from_bytes(body[i:i + 2], "big"))
        i += 4 + int.from_bytes(body[i + 2:i + 4], "big")
    return version, SUPPORTED_VERSIONS in kinds


def test_tls_older_than_1_2_is_refused(tls_server):
    """The server itself refuses TLS 1.0/1.1: a client that offers only
    those gets a fatal protocol_version alert from the server, on the wire
    (not a refusal by the client's own OpenSSL, which would send nothing)."""
    hello, tls, incoming = old_client_hello()
    with socket.create_connection(("127.0.0.1", tls_server.smtps), timeout=10,
                                  source_address=("127.0.0.3", 0)) as raw:
        raw.sendall(hello)
        answer = b""
        while len(answer) < 7:
            chunk = raw.recv(7 - len(answer))
            if not chunk:
                break
            answer += chunk
    # An alert record (21), two bytes: fatal (2), protocol_version (70).
    assert answer[:1] == b"\x15" and answer[3:7] == bytes([0, 2, 2, PROTOCOL_VERSION_ALERT]), answer.hex()
    incoming.write(answer)
    with pytest.raises(ssl.SSLError) as refused:
        tls.do_handshake()
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # received from the peer


def test_smtps_implicit_tls_real_socket(tls_server):
    s = tls_server
    with smtplib.SMTP_SSL("127.0.0.1", s.smtps, source_address=("127.0.0.3", 0), timeout=10,
                          context=client_context(s.certs)) as c:
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        assert "PLAIN" in c.esmtp_features["auth"].split()
        assert c.login("sam@example.com", "sam-secret")[0] == 235  # a SHA: password
        refused = c.sendmail("sam@example.com", ["john@example.com"], b"Subject: smtps\r\n\r\nhi\r\n")
        assert refused == {}
    assert b" with ESMTPSA id " in s.maildir_files(JOHN)[0].read_bytes()


def test_submission_requires_auth_real_socket(tls_server):
    s = tls_server
    with smtplib.SMTP("127.0.0.1", s.submission, source_address=("127.0.0.3", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("john@example.com") == (530, b"5.7.0 Authentication required")
        c.rset()
        c.starttls(context=client_context(s.certs))
        c.ehlo("client.test")
        assert c.docmd("AUTH", "PLAIN " + plain(JOHN, "wrong-secret")) == (535, b"5.7.8 Authentication credentials invalid")
        assert c.login(JOHN, "john-secret")[0] == 235
        assert c.sendmail(JOHN, ["jane@example.com"], b"Subject: sub\r\n\r\nhi\r\n") == {}
    assert len(s.maildir_files("jane@example.com")) == 1


def recv_line(sock) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def recv_reply(sock) -> bytes:
    out = b""
    while True:
        line = recv_line(sock)
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


def test_starttls_injection_on_the_wire(tls_server):
    """CVE-2011-0411 style: commands sent in the same packet as STARTTLS
    must not run inside TLS, and the pre-TLS EHLO does not carry over."""
    s = tls_server
    raw = socket.create_connection(("127.0.0.1", s.port), timeout=10, source_address=("127.0.0.3", 0))
    try:
        assert recv_reply(raw).startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        assert b"STARTTLS" in recv_reply(raw)
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\n")
        assert recv_line(raw) == b"220 2.0.0 Ready to start TLS\r\n"
        tls = client_context(s.certs).wrap_socket(raw, server_hostname="mx.example.com")
        tls.sendall(b"NOOP\r\n")
        assert recv_reply(tls) == b"250 2.0.0 OK\r\n"  # the first reply inside TLS is NOOP's
        tls.sendall(b"MAIL FROM:<a@b.test>\r\n")
        assert recv_reply(tls).startswith(b"503 5.5.1")  # EHLO again first
        tls.sendall(b"QUIT\r\n")
        assert recv_reply(tls).startswith(b"221")
        tls.close()
    finally:
        raw.close()


# --- TLS options --------------------------------------------------------------------


def test_tls_key_must_match_certificate(tmp_path):
    certs = make_certs(tmp_path)
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--tls-cert", certs.cert, "--tls-key", certs.other_key])


def test_tls_files_must_exist(tmp_path):
    with pytest.raises(usage.UsageError, match="missing"):
        Options().parseOptions(["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "k.pem")])


def test_tls_context_is_tls_1_2_or_newer(tmp_path):
    from OpenSSL import SSL

    from mailguard.smtpd.tls import load_context

    certs = make_certs(tmp_path)
    ctx = load_context(certs.cert, certs.key).getContext()
    options = ctx.set_options(0)  # OpenSSL returns the options in force
    # SSLv2 is gone from OpenSSL itself (its flag is 0); every other flag
    # must exist and be set: a missing one fails here, it is not skipped.
    assert SSL.OP_NO_SSLv2 == 0 or options & SSL.OP_NO_SSLv2
    for old in ("OP_NO_SSLv3", "OP_NO_TLSv1", "OP_NO_TLSv1_1"):
        flag = getattr(SSL, old)
        assert flag and options & flag == flag, old


# --- CRAM-MD5 off (SmtpAuthCramMd5Enabled=0, the default) ------------------------------


@pytest.fixture
def default_ctx(tmp_path):
    """The default: TLS configured, CRAM-MD5 off, users with plain-text
    and SHA: passwords."""
    return make_context(tmp_path, tls=TLS)


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_default_offers_no_auth_before_tls(default_ctx, listener):
    """Postfix's SASL client and Twisted's ESMTPSenderFactory take CRAM-MD5
    whenever it is offered: with it off, nothing is offered in plain text."""
    s = connect(default_ctx, listener=listener)
    s.take()  # the greeting
    out = s.cmd("EHLO client.test")
    assert b"AUTH" not in out and b"250-STARTTLS\r\n" in out
    assert s.codes(s.cmd("AUTH CRAM-MD5")) == [code(R.AUTH_MECHANISM_UNKNOWN)] == ["504 5.5.4"]
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["538 5.7.11"]
    assert s.proto.session.authenticated is None


def test_default_offers_plain_and_login_after_starttls(default_ctx):
    s = connect(default_ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    s.cmd("STARTTLS")
    assert b"250-AUTH PLAIN LOGIN\r\n" in s.cmd("EHLO client.test")
    assert s.codes(s.cmd("AUTH CRAM-MD5")) == ["504 5.5.4"]  # not after TLS either
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]


def test_default_smtps_offers_plain_and_login_only(default_ctx):
    s = connect(default_ctx, listener="smtps")
    s.take()  # the greeting
    assert b"250-AUTH PLAIN LOGIN\r\n" in s.cmd("EHLO client.test")


def test_default_refused_cram_md5_is_not_an_auth_failure(default_ctx):
    """A 504 for an unoffered mechanism is a client error, not a failed
    login: it does not count toward SmtpMaxAuthFailures or slow down."""
    s = connect(default_ctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    for _ in range(3):
        assert s.codes(s.cmd("AUTH CRAM-MD5")) == ["504 5.5.4"]
    assert s.proto.smtp.auth_failures == 0
