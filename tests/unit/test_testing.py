"""The in-memory SMTP back-end of mailguard.testing: it keeps the contracts
it claims (an C{IStreamClientEndpoint}; a real protocol that a real SMTP
client can deliver through), and every knob of its script does what its
docstring says.  The queue and gateway tests rely on all of it."""

from __future__ import annotations

import re

from io import BytesIO

import pytest
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.mail import smtp
from twisted.protocols.basic import LineReceiver
from zope.interface.verify import verifyObject

from mailguard.testing import FakeSMTPBackend, FakeSMTPServer, Transaction, result_of


class Lines(LineReceiver):
    """A bare client: sends what the test says, keeps every reply line."""

    delimiter = b"\r\n"

    def __init__(self):
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line.decode())


def dial(backend):
    """A connected L{Lines} client (greeting flushed) and a C{say} function
    that sends lines and returns the reply lines they caused."""
    client = result_of(backend.connect(protocol.Factory.forProtocol(Lines)))
    backend.flush()

    def say(*lines):
        client.lines.clear()
        for line in lines:
            client.sendLine(line.encode())
        backend.flush()
        return list(client.lines)

    return client, say


def test_contracts():
    backend = FakeSMTPBackend()
    assert verifyObject(IStreamClientEndpoint, backend)
    assert verifyObject(IProtocol, FakeSMTPServer(backend))


def test_a_real_twisted_client_delivers_through_it():
    """Twisted's own ESMTP sender, over the fake's in-memory connection."""
    backend = FakeSMTPBackend()
    sent = defer.Deferred()
    message = b"Subject: hi\n\n.dot line\nbody\n"  # Twisted's client sends LF lines as CRLF
    factory = smtp.ESMTPSenderFactory(None, None, "a@client.test", ["b@backend.test", "c@backend.test"],
                                      BytesIO(message), sent, timeout=None,
                                      requireAuthentication=False, requireTransportSecurity=False)
    backend.connect(factory)
    backend.flush()
    assert result_of(sent) == (2, [(b"b@backend.test", 250, b"2.1.5 Recipient OK"),
                                   (b"c@backend.test", 250, b"2.1.5 Recipient OK")])
    [tx] = backend.messages
    assert tx == Transaction("MAIL FROM:<a@client.test>",
                             ["RCPT TO:<b@backend.test>", "RCPT TO:<c@backend.test>"],
                             message.replace(b"\n", b"\r\n"))
    assert [c.split()[0] for c in backend.commands] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "QUIT"]
    assert backend.servers == []  # QUIT closed it


def test_greeting_and_ehlo_are_scripted():
    backend = FakeSMTPBackend(hostname="relay.test", extensions=["DSN"])
    client, say = dial(backend)
    assert client.lines == ["220 relay.test ESMTP"]
    assert say("EHLO c.test") == ["250-relay.test", "250 DSN"]
    assert say("HELO c.test") == ["250 relay.test"]
    quiet = FakeSMTPBackend()
    quiet.greeting = ""
    client, _ = dial(quiet)
    assert client.lines == []


def test_users_decide_vrfy_and_rcpt():
    backend = FakeSMTPBackend({"John@example.com"})
    _, say = dial(backend)
    assert say("VRFY john@example.com", "VRFY <nobody@example.com>") == [
        "250 2.1.5 <john@example.com>", "550 5.1.1 User unknown"]
    assert say("RCPT TO:<john@example.com>") == ["503 5.5.1 Need MAIL first"]
    assert say("MAIL FROM:<>", "MAIL FROM:<>") == ["250 2.1.0 Sender OK", "503 5.5.1 Sender already specified"]
    assert say("RCPT TO:<JOHN@example.com>", "RCPT TO:<x@example.com> NOTIFY=NEVER") == [
        "250 2.1.5 Recipient OK", "550 5.1.1 Recipient address rejected: user unknown"]
    assert say("RSET", "NOOP", "WHAT") == ["250 2.0.0 Reset state", "250 2.0.0 OK", "500 5.5.2 Command not recognized"]
    backend.vrfy = "252"
    assert say("VRFY john@example.com") == ["252 2.1.5 Verification not supported"]
    backend.vrfy = "502"
    assert say("VRFY john@example.com") == ["502 5.5.1 VRFY command is disabled"]


def test_data_is_unstuffed_and_recorded_only_when_accepted():
    backend = FakeSMTPBackend()
    _, say = dial(backend)
    assert say("DATA") == ["554 5.5.1 No valid recipients"]
    say("MAIL FROM:<a@b.test> SIZE=10", "RCPT TO:<x@y.test>")
    assert say("DATA", "..a", "b", ".") == ["354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 queued as X"]
    assert backend.messages == [Transaction("MAIL FROM:<a@b.test> SIZE=10", ["RCPT TO:<x@y.test>"], b".a\r\nb\r\n")]
    backend.data_reply = lambda tx: "554 5.7.1 no"
    say("MAIL FROM:<a@b.test>", "RCPT TO:<x@y.test>")
    assert say("DATA", "c", ".")[-1] == "554 5.7.1 no"
    assert len(backend.messages) == 1
    assert backend.verbs("rcpt") == ["RCPT TO:<x@y.test>", "RCPT TO:<x@y.test>"]


def test_overrides_silence_and_per_address_replies():
    backend = FakeSMTPBackend()
    _, say = dial(backend)
    backend.overrides["EHLO"] = b"502 5.5.1 no\r\n"
    backend.overrides["VRFY"] = lambda arg: b"252 maybe\r\n" if "a@" in arg else None
    backend.rcpt_replies["busy@y.test"] = "451 4.2.1 busy"
    backend.silent.add("NOOP")
    assert say("EHLO c.test", "VRFY a@x.test", "VRFY b@x.test", "NOOP") == [
        "502 5.5.1 no", "252 maybe", "250 2.1.5 <b@x.test>"]
    assert say("MAIL FROM:<>", "RCPT TO:<busy@y.test>") == ["250 2.1.0 Sender OK", "451 4.2.1 busy"]
    assert backend.commands[-1] == "RCPT TO:<busy@y.test>"  # silent and overridden ones are recorded too
    assert "NOOP" in backend.commands


def test_refused_hanging_and_dropped_connections():
    backend = FakeSMTPBackend()
    factory = protocol.Factory.forProtocol(Lines)
    backend.up = False
    assert result_of(backend.connect(factory)).check(ConnectionRefusedError)
    backend.up, backend.hang = True, True
    hanging = backend.connect(factory)
    assert not hanging.called
    hanging.cancel()
    assert result_of(hanging).check(defer.CancelledError)
    backend.hang = False
    client, _ = dial(backend)
    assert len(backend.servers) == 1
    backend.drop_all()
    assert backend.servers == [] and client.transport.disconnected
    assert backend.attempts == 3


def test_result_of():
    assert result_of(defer.succeed(1)) == 1
    assert result_of(defer.fail(ValueError("x"))).check(ValueError)
    with pytest.raises(AssertionError, match="not fired"):
        result_of(defer.Deferred())


# --- the session driver ------------------------------------------------------


def test_the_session_driver_drives_a_real_session(tmp_path):
    from mailguard.smtpd.protocol import MailguardESMTP
    from mailguard.testing import LogCapture, TLSStringTransport, b64, connect, make_context

    import dataclasses

    from mailguard.config import settings

    config = dataclasses.replace(settings.load(None), greeting_delay=0.0)
    ctx = make_context(config, spool=str(tmp_path), tls=object())
    s = connect(ctx, "::ffff:127.0.0.3", 4321, listener="smtp")
    proto, transport = s  # unpacks for tests that drive the protocol directly
    assert isinstance(proto, MailguardESMTP) and proto.session.client_ip == "127.0.0.3"
    assert isinstance(transport, TLSStringTransport)
    assert s.take().startswith(b"220 ") and s.take() == b""
    with LogCapture() as logs:
        assert s.codes(s.send("EHLO c\r\nNOOP\r\n")) == ["250 HELP", "250 2.0.0"]
        assert s.send("STARTTLS\r\nNOOP\r\n") == b""  # the 220 went out before TLS
    assert transport.before_tls == b"220 2.0.0 Ready to start TLS\r\n" and transport.tls_context is ctx.tls
    assert s.codes(s.cmd("EHLO c")) == ["250 HELP"]
    assert s.codes(s.cmd("AUTH PLAIN " + b64("\0john@example.com\0nope")) + s.cmd("QUIT")) == []
    assert not s.closed  # the failed AUTH is answered after a delay
    ctx.clock.advance(1)
    assert s.codes(s.take()) == ["535 5.7.8", "221 2.0.0"] and s.closed
    s.lose()
    assert ctx.clock.getDelayedCalls() == [] and ctx.connections.total == 0
    assert re.search(r"discarded 6 bytes pipelined after STARTTLS session=\w{12} ip=127\.0\.0\.3", logs.text())
