"""The relay queue's SMTP client (mailguard.store.relayclient) on the wire:
dot-stuffing, one connection for several entries, EHLO/HELO, the ESMTP
parameters it passes on, and how it reads the next hop's refusals.

The queue drives it as in production; the next hop is the in-memory
back-end of ``mailguard.testing`` (see ``world.py``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.store.world import World, parse_report


def test_dot_stuffing_across_chunk_boundaries(world):
    # FileSender reads 16 KiB chunks: put a dot-line at every boundary.
    line = b"x" * 62 + b"\r\n"
    body = b"Subject: dots\r\n\r\n" + (line * 300 + b".dot\r\n") * 10 + b".\r\n..\r\n"
    world.accept(body=body)
    world.run()
    assert world.net.messages[0].data == body


@given(lines=st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a.b", b"x" * 50]), max_size=40),
       cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8))
def test_transform_chunk_stuffs_like_rfc5321(lines, cuts):
    """However the file is cut into chunks, the bytes on the wire are the
    RFC 5321 4.5.2 dot-stuffed message."""
    from mailguard.store.folding import LineFolder
    from mailguard.store.relayclient import RelayClient

    message = b"".join(line + b"\r\n" for line in lines)
    client = RelayClient.__new__(RelayClient)
    client.__dict__.update(_folder=LineFolder())
    client.resetTimeout = lambda: None
    out, i, k = [], 0, 0
    while i < len(message):
        n = cuts[k % len(cuts)]
        out.append(client.transformChunk(message[i:i + n]))
        i, k = i + n, k + 1
    expected = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    assert b"".join(out) == expected


def test_long_lines_are_folded_when_forwarded(world):
    """Stored unchanged, folded on the wire as Postfix's SMTP client folds
    them (smtp_line_length_limit = 998): CRLF SPACE after 998 octets."""
    from mailguard.testing import LogCapture

    body = b"Subject: long\r\n\r\n" + b"h" * 1200 + b"\r\n.end\r\n"
    mid = world.accept(body=body)
    with LogCapture() as logs:
        world.run()
    [tx] = world.net.messages
    assert tx.data == b"Subject: long\r\n\r\n" + b"h" * 998 + b"\r\n " + b"h" * 202 + b"\r\n.end\r\n"
    assert max(len(line) for line in tx.data.split(b"\r\n")) == 998
    from mailguard.store.envelope import queue_id

    assert f"relay-folded queue={queue_id(mid)} relay=relay.test limit=998 folds=1" in logs.text()


@pytest.mark.parametrize("concurrency, connections", [(1, 1), (10, 3)])
def test_several_entries_share_a_connection(tmp_path, concurrency, connections):
    """Three entries due together: with one connection allowed they all go
    over it, one transaction after another, and one QUIT ends it; with ten
    (the default) each gets a connection of its own."""
    world = World(tmp_path, concurrency=concurrency)
    world.queue.startService()
    for _ in range(3):
        world.accept()
    world.run()
    assert len(world.net.messages) == 3
    assert world.net.attempts == connections
    assert world.net.commands.count("QUIT") == connections
    world.queue.stopService()


def test_8bit_message_is_sent_with_body_8bitmime(world):
    body = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode("utf-8")
    world.accept(body=body, mail_params={"BODY": "8BITMIME"})
    world.run()
    assert " BODY=8BITMIME" in world.net.messages[0].mail


def test_dsn_parameters_passed_to_a_dsn_next_hop(world):
    world.net.extensions.append("DSN")
    world.accept(mail_params={"RET": "HDRS", "ENVID": "id+2B1"},
                 rcpt_params={"x@remote.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;x@remote.test"}})
    world.run()
    [tx] = world.net.messages
    assert tx.mail.endswith(" RET=HDRS ENVID=id+2B1")
    assert tx.rcpts == ["RCPT TO:<x@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@remote.test"]
    assert world.maildir("john@example.com") == []  # the next hop reports success


def test_ehlo_refused_falls_back_to_helo(world):
    world.net.overrides["EHLO"] = b"502 5.5.1 no ESMTP here\r\n"
    world.accept()
    world.run()
    assert any(c.startswith("HELO") for c in world.net.commands)
    assert "SIZE=" not in world.net.messages[0].mail


def test_greeting_refusal_is_temporary(world):
    world.net.greeting = "421 4.3.2 busy"
    world.accept()
    world.run()
    assert world.net.messages == []
    [entry] = world.queue.entries.values()
    assert entry.attempts == 1 and "421" in entry.recipients[0].diagnostic
    world.net.greeting = "220 relay.test ESMTP"
    world.run(300)
    assert len(world.net.messages) == 1


def test_data_refused_after_the_dot_bounces_every_recipient(world):
    world.net.data_reply = lambda tx: "554 5.7.1 content rejected"
    world.accept(relay=("x@remote.test", "y@remote.test"))
    world.run()
    [bounce] = world.maildir("john@example.com")
    _, _, _, rcpts = parse_report(bounce.read_bytes())
    assert [r["Final-Recipient"] for r in rcpts] == ["rfc822; x@remote.test", "rfc822; y@remote.test"]
    assert world.active() == []


def test_the_return_path_stays_here(world):
    """A stored message starts with Return-Path (final delivery, RFC 5321
    4.4): the next hop gets everything after it, and nothing else is cut."""
    body = b"Received: from client.test\r\n\tby mx.example.com; Mon, 1 Jan 2026 00:00:00 +0000\r\nSubject: rp\r\n\r\nhi\r\n"
    world.accept(body=b"Return-Path: <john@example.com>\r\n" + body)
    world.accept(body=b"Subject: no return path\r\n\r\nReturn-Path: <in the body>\r\n")
    world.run()
    assert [m.data for m in world.net.messages] == [
        body, b"Subject: no return path\r\n\r\nReturn-Path: <in the body>\r\n"]


@pytest.mark.parametrize("bind, expected", [("127.0.0.2", ("127.0.0.2", 0)), ("", None)])
def test_the_relay_connection_leaves_from_the_bind_address(bind, expected):
    """RelayHostBindAddress (or the gateway's address): the source of the
    queue's connections to the relay host."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactorClock

    from mailguard.store.relayclient import endpoint_connector

    reactor = MemoryReactorClock()
    endpoint_connector(reactor, "127.0.0.1", 2525, 30, bind_address=bind)(Factory.forProtocol(Protocol))
    reactor.advance(0)
    [(host, port, _, timeout, source)] = reactor.tcpClients
    assert (host, port, timeout, source) == ("127.0.0.1", 2525, 30, expected)


# --- command injection: defence in depth -----------------------------------------------------
#
# The configuration (FILE:LINE errors) and the SMTP parser keep CR, LF and
# NUL out of addresses; these entries are made past both, straight into the
# store, as a hostile configuration value once reached the wire.

INJECTED = "\r\nRCPT TO:<injected@evil.test>"


def test_relay_recipient_with_crlf_is_never_sent(world):
    world.accept(relay=("x@remote.test", "y@remote.test>" + INJECTED))
    world.run()
    assert not any("injected" in c for c in world.net.commands)
    [tx] = world.net.messages  # the other recipient is delivered
    assert tx.rcpts == ["RCPT TO:<x@remote.test>"]
    [bounce] = world.maildir("john@example.com")  # the hostile one fails for good
    _, _, _, rcpts = parse_report(bounce.read_bytes())
    assert [r["Status"] for r in rcpts] == ["5.5.4"]
    assert world.active() == []


def test_relay_sender_with_nul_or_crlf_is_never_sent(world):
    world.accept(sender="a\x00b@example.com")
    world.accept(sender="john@example.com>" + INJECTED)
    world.run(3600)
    assert not any("injected" in c or "\x00" in c for c in world.net.commands)
    # Neither was sent; only a bounce was tried (to the hostile sender: refused the same way).
    assert all(c.startswith("MAIL FROM:<>") for c in world.net.verbs("MAIL"))
    assert world.net.messages == [] and world.active() == []
