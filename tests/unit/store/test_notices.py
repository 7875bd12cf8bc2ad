"""The DSNs mailguard writes itself (mailguard.store.notices): success
notices for local recipients at acceptance, ``relayed`` notices, and where
a notice goes (the sender's Maildir, the queue, or nowhere)."""

from __future__ import annotations

from tests.unit.store.world import parse_report


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
