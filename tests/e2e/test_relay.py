"""Relay control on the wire: a real ``twistd -n mailguard``, Python's
smtplib bound to loopback source addresses.

127.0.0.3 is an ordinary (untrusted) client; 127.0.0.2 is in the relay IP
group "Trusted".  The open-relay test addresses are the same table the
policy's unit tests use (``tests/unit/policy/test_decide.py``), plus its address-literal
tests pointed at the address the server really listens on.
"""

from __future__ import annotations

import re

import smtplib

import pytest

from tests.conftest import Twistd, free_port
from tests.helpers_context import write_config
from tests.unit.policy.test_decide import OUR_IP, RELAY_TESTS

SERVER_IP = "127.0.0.1"
UNTRUSTED = "127.0.0.3"
TRUSTED = "127.0.0.2"

# The table, and each of its literal tests aimed at this server's own address.
WIRE_TESTS = list(dict.fromkeys(
    RELAY_TESTS + [arg.replace(OUR_IP, SERVER_IP) for arg in RELAY_TESTS if OUR_IP in arg]))

# Who the untrusted client claims to be: none of it makes it trusted.
IDENTITIES = [
    ("client.test", "<a@sender.test>"),
    ("client.test", "<>"),  # the null sender
    ("client.test", "<john@example.com>"),  # a sender in our local domain
    ("mx.example.com", "<postmaster@example.com>"),  # our own name in EHLO, too
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay")
    # Hundreds of refused relay attempts from one address: past the
    # per-address error budget (tested in test_abuse.py) that address would
    # be locked out, and these tests are about each refusal's code.
    cfg = write_config(tmp / "mailserver.cfg", {"SmtpMaxErrorsPerIp": "0"})
    port = free_port()
    s = Twistd(tmp, ["--config", str(cfg), "--smtp", f"tcp:{port}:interface={SERVER_IP}"], port)
    yield s
    s.stop()


def rcpt(server, source: str, arg: str, helo="client.test", sender="<a@sender.test>") -> tuple[int, bytes]:
    with smtplib.SMTP(SERVER_IP, server.port, source_address=(source, 0), timeout=10) as c:
        assert c.ehlo(helo)[0] == 250
        assert c.docmd("MAIL", f"FROM:{sender}")[0] == 250
        return c.docmd("RCPT", arg)


def test_the_table_is_long_enough():
    assert len(WIRE_TESTS) >= 25


@pytest.mark.parametrize("helo, sender", IDENTITIES, ids=["plain", "null-sender", "local-sender", "our-helo"])
@pytest.mark.parametrize("arg", WIRE_TESTS)
def test_open_relay_test_refused_from_untrusted_client(server, arg, helo, sender):
    code, text = rcpt(server, UNTRUSTED, arg, helo, sender)
    assert code != 250 and code >= 500, (arg, code, text)
    assert (code, text[:5]) in {(554, b"5.7.1"), (550, b"5.1.1"), (501, b"5.1.3"), (501, b"5.5.4")}, (arg, code, text)


def test_relay_denied_is_logged(server):
    assert rcpt(server, UNTRUSTED, "TO:<logged@evil.test>") == (554, b"5.7.1 Relay access denied")
    server_log = server.output()
    assert re.search(r'reject session=\w{12} ip=127\.0\.0\.3 command=RCPT code=554 status=5\.7\.1 '
                     r'reason="Relay access denied" .*to=logged@evil\.test detail="relay denied[^"]*"$',
                     server_log, re.M)


def test_trusted_client_relays_a_plain_non_local_address(server):
    assert rcpt(server, TRUSTED, "TO:<someone@evil.test>") == (250, b"2.1.5 Recipient OK")
    assert rcpt(server, TRUSTED, "TO:<someone@elsewhere.test>", sender="<>")[0] == 250


def test_untrusted_client_is_refused_the_same_plain_address(server):
    assert rcpt(server, UNTRUSTED, "TO:<someone@evil.test>") == (554, b"5.7.1 Relay access denied")


@pytest.mark.parametrize("arg", [
    "TO:<user%evil.test@example.com>",
    'TO:<"user@evil.test"@example.com>',
    "TO:<evil.test!user@example.com>",
    f"TO:<user@[{SERVER_IP}]>",
])
def test_trusted_client_cannot_relay_hidden_destinations(server, arg):
    code, _ = rcpt(server, TRUSTED, arg)
    assert code in (550, 554), arg


def test_local_recipients_still_work_for_untrusted_clients(server):
    assert rcpt(server, UNTRUSTED, "TO:<john@example.com>")[0] == 250
    assert rcpt(server, UNTRUSTED, "TO:<JOHN@example.net>")[0] == 250
    assert rcpt(server, UNTRUSTED, "TO:<nobody@example.com>")[:2] == (550, b"5.1.1 Recipient address rejected: user unknown")
