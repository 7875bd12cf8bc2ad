"""The DSNs mailguard writes itself (mailguard.store.notices): success
notices for local recipients at acceptance, ``relayed`` notices, and where
a notice goes (the sender's Maildir, the queue, or nowhere)."""

from __future__ import annotations

from tests.unit.store.world import BODY, parse_report


def test_delivered_dsn_for_a_local_recipient(world):
    world.accept(sender="someone@example.com".replace("someone", "jane"), relay=(), local=("john@example.com",),
                 rcpt_params={"john@example.com": {"NOTIFY": "SUCCESS"}})
    [notice] = world.maildir("jane@example.com")
    _, _, _, [r] = parse_report(notice.read_bytes())
    assert r["Action"] == "delivered" and r["Final-Recipient"] == "rfc822; john@example.com"


def test_relayed_dsn_when_the_next_hop_has_no_dsn(world):
    world.accept(rcpt_params={"x@remote.test": {"NOTIFY": "SUCCESS"}})
    world.run()
    [tx] = world.net.messages
    assert "NOTIFY" not in tx.rcpts[0]
    [notice] = world.maildir("john@example.com")
    msg, parts, _, [r] = parse_report(notice.read_bytes())
    assert r["Action"] == "relayed" and r["Status"] == "2.0.0"
    assert parts[2].get_content_type() == "text/rfc822-headers"


def test_bounce_to_a_remote_sender_is_queued_with_the_null_sender(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(sender="someone@elsewhere.test", relay=("bad@remote.test",))
    world.run()
    [tx] = world.net.messages
    assert tx.mail.startswith("MAIL FROM:<>")
    assert tx.rcpts == ["RCPT TO:<someone@elsewhere.test>"]
    parse_report(tx.data)


def test_bounce_to_an_unknown_local_sender_is_dropped(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(sender="nobody@example.com", relay=("bad@remote.test",))
    world.run()
    assert world.active() == [] and world.net.messages == []


TRACED = (b"Return-Path: <john@example.com>\r\nReceived: from client.test ([127.0.0.2])\r\n"
          b"\tby mx.example.com with ESMTP id 1; Tue, 14 Nov 2023 22:13:20 +0000\r\n")


def test_local_notices_carry_the_null_return_path_and_return_no_return_path(world):
    """A notice's final delivery records the null sender (Return-Path: <>);
    the headers it returns are the original's without mailguard's own
    Return-Path (the original's Received stays)."""
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(relay=("bad@remote.test",), local=("jane@example.com",), body=TRACED + BODY,
                 rcpt_params={"jane@example.com": {"NOTIFY": "SUCCESS"}})
    world.run()
    notices = [p.read_bytes() for p in world.maildir("john@example.com")]
    assert len(notices) == 2  # delivered (to jane) and failed (to bad@)
    for data in notices:
        assert data.startswith(b"Return-Path: <>\r\nFrom: Mail Delivery System <MAILER-DAEMON@")
        assert data.count(b"Return-Path:") == 1
        assert b"Received: from client.test ([127.0.0.2])" in data
        parse_report(data)


def test_a_forwarded_notice_leaves_its_return_path_behind(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(sender="someone@elsewhere.test", relay=("bad@remote.test",), body=TRACED + BODY)
    world.run()
    [tx] = world.net.messages
    assert tx.mail.startswith("MAIL FROM:<>")
    assert b"Return-Path" not in tx.data  # neither the notice's nor the original's
    assert tx.data.startswith(b"From: Mail Delivery System <MAILER-DAEMON@mx.example.com>")


def test_remote_mta_of_an_address_is_a_literal(tmp_path):
    from tests.unit.store.world import World

    world = World(tmp_path, relay_host=("127.0.0.1", 25))
    world.queue.startService()
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(relay=("bad@remote.test",))
    world.run()
    [bounce] = world.maildir("john@example.com")
    _, _, _, [r] = parse_report(bounce.read_bytes())
    assert r["Remote-MTA"] == "dns; [127.0.0.1]"
    world.queue.stopService()
