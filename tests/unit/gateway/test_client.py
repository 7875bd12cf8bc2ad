"""The gateway's client protocol (mailguard.gateway.client), bytes in and
out over a StringTransport, on a task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailguard.gateway.client import BackendUnavailable, Outcome, VrfyClient
from mailguard.testing import result_of


def connected_client(clock, **kw):
    client = VrfyClient(clock, kw.get("timeout", 5.0), kw.get("idle_timeout", 30.0), "gw.example.com")
    tr = StringTransport()
    client.makeConnection(tr)
    return client, tr


def ready_client(clock, ehlo=b"250-backend\r\n250-VRFY\r\n250 PIPELINING\r\n", **kw):
    client, tr = connected_client(clock, **kw)
    client.dataReceived(b"220 backend ESMTP\r\n")
    assert tr.value() == b"EHLO gw.example.com\r\n"
    tr.clear()
    client.dataReceived(ehlo)
    assert result_of(client.ready) is client
    return client, tr


def test_client_greeting_and_ehlo(clock):
    client, tr = ready_client(clock)
    assert client.extensions == {"VRFY": "", "PIPELINING": ""}
    assert client.usable
    assert tr.value() == b""


def test_client_waits_out_a_multiline_greeting(clock):
    client, tr = connected_client(clock)
    client.dataReceived(b"220-backend ESMTP\r\n")
    assert tr.value() == b""
    clock.advance(3)
    client.dataReceived(b"220 backend ESMTP\r\n")
    assert tr.value() == b"EHLO gw.example.com\r\n"


def test_client_falls_back_to_helo(clock):
    client, tr = connected_client(clock)
    client.dataReceived(b"220 old\r\n")
    tr.clear()
    client.dataReceived(b"502 5.5.1 no EHLO here\r\n")
    assert tr.value() == b"HELO gw.example.com\r\n"
    client.dataReceived(b"250 old\r\n")
    assert result_of(client.ready) is client


def test_client_refused_greeting_fails_ready(clock):
    client, tr = connected_client(clock)
    client.dataReceived(b"554 5.7.1 go away\r\n")
    failure = result_of(client.ready)
    assert isinstance(failure, Failure) and failure.check(BackendUnavailable)
    assert "554" in failure.getErrorMessage()
    assert tr.disconnecting


def test_client_greeting_timeout(clock):
    client, tr = connected_client(clock, timeout=5.0)
    clock.advance(5)
    assert tr.disconnecting  # StringTransport: abortConnection sets disconnecting
    client.connectionLost(None)
    failure = result_of(client.ready)
    assert failure.check(BackendUnavailable)
    assert "within 5 s" in failure.getErrorMessage()
    assert clock.getDelayedCalls() == []


def test_client_vrfy_known_unknown(clock):
    client, tr = ready_client(clock)
    d1 = client.verify("john@example.com")
    d2 = client.verify("nobody@example.com")
    # One command on the wire at a time.
    assert tr.value() == b"VRFY john@example.com\r\n"
    tr.clear()
    client.dataReceived(b"250 2.1.5 <john@example.com>\r\n")
    answer = result_of(d1)
    assert (answer.outcome, answer.reply.code, answer.via) == (Outcome.KNOWN, 250, "VRFY")
    assert tr.value() == b"VRFY nobody@example.com\r\n"
    client.dataReceived(b"550 5.1.1 User unknown\r\n")
    answer = result_of(d2)
    assert (answer.outcome, answer.reply.code) == (Outcome.UNKNOWN, 550)


def test_client_quotes_a_local_part_with_spaces(clock):
    client, tr = ready_client(clock)
    client.verify('"john smith"@example.com')
    assert tr.value() == b'VRFY <"john smith"@example.com>\r\n'


@pytest.mark.parametrize("vrfy_reply", [b"252 2.1.5 Verification not supported", b"502 5.5.1 VRFY command is disabled"])
def test_client_probes_with_rcpt_when_vrfy_tells_nothing(clock, vrfy_reply):
    client, tr = ready_client(clock)
    d = client.verify("john@example.com")
    tr.clear()
    client.dataReceived(vrfy_reply + b"\r\n")
    assert tr.value() == b"MAIL FROM:<>\r\n"
    tr.clear()
    client.dataReceived(b"250 2.1.0 OK\r\n")
    assert tr.value() == b"RCPT TO:<john@example.com>\r\n"
    tr.clear()
    client.dataReceived(b"250 2.1.5 OK\r\n")
    answer = result_of(d)
    assert (answer.outcome, answer.via) == (Outcome.KNOWN, "RCPT")
    assert tr.value() == b"RSET\r\n"  # the answer does not wait for the RSET reply
    tr.clear()
    client.dataReceived(b"250 2.0.0 Reset\r\n")
    # This connection no longer asks VRFY.
    d = client.verify("nobody@example.com")
    assert tr.value() == b"MAIL FROM:<>\r\n"
    client.dataReceived(b"250 OK\r\n550 5.1.1 unknown\r\n")
    assert result_of(d).outcome is Outcome.UNKNOWN


@pytest.mark.parametrize("rcpt_reply", [b"554 5.7.1 Relay access denied", b"451 4.3.0 try later", b"452 4.5.3 too many"])
def test_client_probe_answers_that_are_not_about_the_user_are_temporary(clock, rcpt_reply):
    client, tr = ready_client(clock)
    client.use_vrfy = False
    d = client.verify("john@example.com")
    client.dataReceived(b"250 OK\r\n" + rcpt_reply + b"\r\n")
    answer = result_of(d)
    assert answer.outcome is Outcome.TEMPFAIL


def test_client_null_sender_refused_is_temporary(clock):
    client, tr = ready_client(clock)
    client.use_vrfy = False
    d = client.verify("john@example.com")
    client.dataReceived(b"550 5.7.1 no null sender\r\n")
    answer = result_of(d)
    assert (answer.outcome, answer.via) == (Outcome.TEMPFAIL, "MAIL")
    assert tr.value().endswith(b"RSET\r\n")


def test_client_vrfy_temporary_failure(clock):
    client, tr = ready_client(clock)
    d = client.verify("john@example.com")
    client.dataReceived(b"450 4.2.1 mailbox busy\r\n")
    assert result_of(d).outcome is Outcome.TEMPFAIL


def test_client_reply_timeout_aborts(clock):
    client, tr = ready_client(clock, timeout=5.0)
    d = client.verify("john@example.com")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert tr.disconnecting
    client.connectionLost(None)
    failure = result_of(d)
    assert failure.check(BackendUnavailable)
    assert failure.value.retry is False
    assert clock.getDelayedCalls() == []


def test_client_421_reply_means_retry_elsewhere(clock):
    client, tr = ready_client(clock)
    d = client.verify("john@example.com")
    client.dataReceived(b"421 4.4.2 Timeout, closing connection\r\n")
    failure = result_of(d)
    assert failure.check(BackendUnavailable) and failure.value.retry
    assert tr.disconnecting and not client.usable


def test_client_unsolicited_421_closes(clock):
    client, tr = ready_client(clock)
    client.dataReceived(b"421 4.4.2 Timeout, closing connection\r\n")
    assert tr.disconnecting and not client.usable


def test_client_connection_lost_fails_pending_with_retry(clock):
    client, tr = ready_client(clock)
    d1 = client.verify("john@example.com")
    d2 = client.verify("jane@example.com")
    lost = client.when_lost()
    client.connectionLost(None)
    for d in (d1, d2):
        failure = result_of(d)
        assert failure.check(BackendUnavailable) and failure.value.retry
    assert result_of(lost) is None
    assert client.command("NOOP").called  # fails at once now


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"25 short\r\n", b"250x\r\n", b"x" * 5000 + b"\r\n"])
def test_client_malformed_reply_aborts(clock, garbage):
    client, tr = ready_client(clock)
    d = client.verify("john@example.com")
    client.dataReceived(garbage)
    assert tr.disconnecting
    client.connectionLost(None)
    assert result_of(d).check(BackendUnavailable)


def test_client_idle_says_quit(clock):
    client, tr = ready_client(clock, idle_timeout=30.0)
    d = client.verify("john@example.com")
    clock.advance(2)
    client.dataReceived(b"250 2.1.5 ok\r\n")
    result_of(d)
    tr.clear()
    clock.advance(29)
    assert tr.value() == b""
    clock.advance(1)
    assert tr.value() == b"QUIT\r\n"
    assert not client.usable
    client.dataReceived(b"221 2.0.0 Bye\r\n")
    assert tr.disconnecting


@pytest.mark.parametrize("reply,outcome", [
    (b"550 5.1.1 User unknown", Outcome.UNKNOWN),
    (b"550 User unknown", Outcome.UNKNOWN),
    (b"550 5.2.1 Mailbox disabled", Outcome.UNKNOWN),
    (b"553 5.1.3 Bad address", Outcome.UNKNOWN),
    (b"551 5.1.6 User has moved", Outcome.UNKNOWN),
    (b"550 5.0.0 Recipient rejected", Outcome.UNKNOWN),
    (b"550 5.7.1 Access denied", Outcome.TEMPFAIL),
    (b"550 5.4.4 Unable to route", Outcome.TEMPFAIL),
    (b"554 5.7.1 Relay access denied", Outcome.TEMPFAIL),
    (b"251 2.1.5 will forward", Outcome.KNOWN),
])
def test_client_classifies_rcpt_replies(clock, reply, outcome):
    client, tr = ready_client(clock)
    client.use_vrfy = False
    d = client.verify("john@example.com")
    client.dataReceived(b"250 OK\r\n" + reply + b"\r\n")
    assert result_of(d).outcome is outcome


@pytest.mark.parametrize("address", ["a\r\nRCPT TO:<x@evil.test>@example.com", "a\nb@example.com",
                                     "a\x00b@example.com", "a\rb@example.com"])
def test_an_address_that_would_break_the_line_is_never_sent(clock, address):
    """Defence in depth: the SMTP parser never lets such an address through;
    if one came, the back-end is not asked and nothing is written."""
    client, tr = ready_client(clock)
    failure = result_of(client.verify(address))
    assert isinstance(failure, Failure) and failure.check(BackendUnavailable)
    assert tr.value() == b""
    assert client.usable  # the connection stays good for the next question
