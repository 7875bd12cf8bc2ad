"""VRFY on the wire (SPEC "Replies"): the seed's anti-spam gateway gets the
truth, everyone else learns nothing."""

from __future__ import annotations

import dataclasses
import smtplib

import pytest

from mailguard.config import settings as config_mod
from mailguard import replies as R
from mailguard.testing import connect, make_context
from tests.conftest import write_config

TRUSTED, UNTRUSTED = "127.0.0.2", "127.0.0.3"
ARGS_KNOWN = ["john@example.com", "<john@example.com>", "John Doe <john@example.com>",
              '"John Doe" <JOHN@Example.NET>', "john", "sales@example.com"]
ARGS_UNKNOWN = ["nobody@example.com", "<nobody@example.com>", "nobody", "someone@elsewhere.test"]
ARGS_MALFORMED = ["", "<", "a@b@c", "<john@example.com", "@@"]


@pytest.fixture
def config(tmp_path):
    return config_mod.load(str(write_config(tmp_path / "mailserver.cfg")))


def _session(config, ip, tmp_path):
    proto, transport = connect(make_context(config, spool=str(tmp_path / "spool")), client_ip=ip)
    transport.clear()
    proto.dataReceived(b"EHLO client.test\r\n")
    ehlo = transport.value()
    transport.clear()
    return proto, transport, ehlo


def _vrfy(proto, transport, arg: str) -> bytes:
    transport.clear()
    proto.dataReceived(b"VRFY " + arg.encode() + b"\r\n" if arg else b"VRFY\r\n")
    return transport.value()


@pytest.mark.parametrize("arg", ARGS_KNOWN)
def test_trusted_known(config, tmp_path, arg):
    proto, t, ehlo = _session(config, TRUSTED, tmp_path)
    answer = _vrfy(proto, t, arg)
    assert answer.startswith(b"250 2.1.5 <")
    expected = b"sales@example.com" if arg.startswith("sales") else b"john@example.com"
    assert answer == b"250 2.1.5 <" + expected + b">\r\n"


@pytest.mark.parametrize("arg", ARGS_UNKNOWN)
def test_trusted_unknown(config, tmp_path, arg):
    proto, t, _ = _session(config, TRUSTED, tmp_path)
    assert _vrfy(proto, t, arg).startswith(b"550 5.1.1 ")


@pytest.mark.parametrize("arg", ARGS_MALFORMED)
def test_malformed_argument(config, tmp_path, arg):
    for ip in (TRUSTED, UNTRUSTED):
        proto, t, _ = _session(config, ip, tmp_path)
        assert _vrfy(proto, t, arg).startswith(b"501 5.5.4 ")


def test_untrusted_same_answer_for_every_address(config, tmp_path):
    proto, t, ehlo = _session(config, UNTRUSTED, tmp_path)
    answers = {_vrfy(proto, t, a) for a in ARGS_KNOWN + ARGS_UNKNOWN + ["former@example.com"]}
    assert answers == {R.VRFY_WITHHELD.to_bytes()}
    assert answers == {b"252 2.1.5 Verification not supported\r\n"}


@pytest.mark.parametrize("ip", [TRUSTED, UNTRUSTED])
def test_disabled_vrfy(config, tmp_path, ip):
    config = dataclasses.replace(config, vrfy_enabled=False)
    proto, t, ehlo = _session(config, ip, tmp_path)
    assert b"VRFY" not in ehlo
    for a in ARGS_KNOWN[:2] + ARGS_UNKNOWN[:2]:
        answer = _vrfy(proto, t, a)
        assert answer == R.VRFY_DISABLED.to_bytes()
        assert answer == b"502 5.5.1 VRFY command is disabled\r\n"  # on the wire, not the constant


def test_enabled_vrfy_is_advertised(config, tmp_path):
    _, _, ehlo = _session(config, UNTRUSTED, tmp_path)
    assert b"250-VRFY\r\n" in ehlo
    assert b"250-ENHANCEDSTATUSCODES\r\n" in ehlo


def test_untrusted_vrfy_budget_then_421(config, tmp_path):
    proto, t, _ = _session(config, UNTRUSTED, tmp_path)
    for _ in range(config.vrfy_limit):
        assert _vrfy(proto, t, "john").startswith(b"252 ")
    assert _vrfy(proto, t, "john").startswith(b"421 4.7.0")
    assert t.disconnecting


def test_trusted_has_no_vrfy_budget(config, tmp_path):
    proto, t, _ = _session(config, TRUSTED, tmp_path)
    for _ in range(config.vrfy_limit + 5):
        assert _vrfy(proto, t, "john").startswith(b"250 ")


def test_expn_not_implemented(config, tmp_path):
    proto, t, _ = _session(config, TRUSTED, tmp_path)
    t.clear()
    proto.dataReceived(b"EXPN sales\r\n")
    assert t.value().startswith(b"502 5.5.1 ")


def test_rcpt_unknown_and_disabled(config, tmp_path):
    proto, t, _ = _session(config, UNTRUSTED, tmp_path)
    proto.dataReceived(b"MAIL FROM:<a@sender.test>\r\n")
    t.clear()
    proto.dataReceived(b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<former@example.com>\r\n"
                       b"RCPT TO:<john@example.com>\r\n")
    assert t.value().splitlines() == [
        R.UNKNOWN_USER.to_bytes().rstrip(), R.DISABLED_USER.to_bytes().rstrip(),
        R.RECIPIENT_OK.to_bytes().rstrip()]


# --- end to end: a real twistd, gateways on 127.0.0.2, strangers on 127.0.0.3 --

def test_vrfy_end_to_end(twistd, tmp_path):
    server = twistd(config=write_config(tmp_path / "mailserver.cfg"))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(TRUSTED, 0), timeout=10) as gw:
        gw.ehlo("gateway.test")
        assert gw.has_extn("vrfy")
        assert gw.verify("john@example.com") == (250, b"2.1.5 <john@example.com>")
        assert gw.verify("nobody@example.com")[0] == 550
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(UNTRUSTED, 0), timeout=10) as c:
        c.ehlo("stranger.test")
        known = c.verify("john@example.com")
        unknown = c.verify("nobody@example.com")
        assert known == unknown == (252, b"2.1.5 Verification not supported")
