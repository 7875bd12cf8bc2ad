"""The relay queue (mailguard.store.queue): relaying, bounces, retries and
back-off, expiry, the relay host down, concurrency, restarts and crash
recovery, ETRN, and the settings that reach it.

Unit tests drive the queue with a ``task.Clock`` and the in-memory SMTP
back-end of ``mailguard.testing`` (see ``world.py``).  The end-to-end tests
with real ``twistd`` processes are ``tests/e2e/test_queue.py``.
"""

from __future__ import annotations

import email.utils
import json
import os
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from mailguard.config import settings as config_mod
from mailguard.policy import build
from mailguard.interfaces import IRelayIntake, IRelayQueue
from tests.conftest import write_config
from tests.unit.store.world import BODY, T0, World, parse_report


def test_verify_object(world):
    assert verifyObject(IRelayQueue, world.queue)
    assert verifyObject(IRelayIntake, world.queue)


# --- relaying and bouncing ---------------------------------------------------------------


def test_relays_and_removes_the_entry(world):
    mid = world.accept(relay=("x@remote.test", "y@remote.test"))
    assert world.active() == [f"{mid}.eml", f"{mid}.env"]
    world.run()
    [tx] = world.net.messages
    assert tx.mail.startswith("MAIL FROM:<john@example.com> SIZE=")
    assert tx.rcpts == ["RCPT TO:<x@remote.test>", "RCPT TO:<y@remote.test>"]
    assert tx.data == BODY  # dot-stuffed on the wire, unstuffed by the server
    assert world.active() == []
    assert world.queue.entries == {}


def test_permanent_failure_bounces_to_a_local_sender(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 <bad@remote.test>: user unknown"
    mid = world.accept(relay=("bad@remote.test", "good@remote.test"),
                       mail_params={"ENVID": "env+2B1", "RET": "HDRS"},
                       rcpt_params={"bad@remote.test": {"ORCPT": "rfc822;Bad+2Bx@remote.test"}})
    world.run()
    assert len(world.net.messages) == 1  # the good one went
    [bounce] = world.maildir("john@example.com")
    data = bounce.read_bytes()
    msg, parts, per_message, per_rcpt = parse_report(data)
    assert msg["To"] == "<john@example.com>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    assert per_message["Original-Envelope-Id"] == "env+1"
    [r] = per_rcpt
    assert r["Final-Recipient"] == "rfc822; bad@remote.test"
    assert r["Original-Recipient"] == "rfc822;Bad+x@remote.test"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; relay.test"
    assert r["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    # RET=HDRS: the headers only
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"Hello." not in data and b"Message-ID: <m1@example.com>" in data
    assert world.active() == []
    assert mid not in world.queue.entries


def test_bounce_returns_the_full_message_by_default(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(relay=("bad@remote.test",))
    world.run()
    [bounce] = world.maildir("john@example.com")
    msg, parts, _, _ = parse_report(bounce.read_bytes())
    assert parts[2].get_content_type() == "message/rfc822"
    assert b".leading dot" in bounce.read_bytes()


def test_notify_never_means_no_bounce(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(relay=("bad@remote.test",), rcpt_params={"bad@remote.test": {"NOTIFY": "NEVER"}})
    world.run()
    assert world.maildir("john@example.com") == []
    assert world.active() == []


def test_no_bounce_for_the_null_sender(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(sender="", relay=("bad@remote.test",))
    world.run()
    assert world.maildir("john@example.com") == []
    assert world.active() == []
    assert world.net.messages == []


# --- retries, expiry, the relay host down ------------------------------------------------


def test_temporary_failure_retries_with_backoff(world):
    world.net.rcpt_replies["x@remote.test"] = "451 4.3.0 try later"
    mid = world.accept()
    attempts = []
    for delay in (0, 300, 600, 1200):
        world.run(delay)
        attempts.append(sum(1 for c in world.net.commands if c.startswith("RCPT")))
    assert attempts == [1, 2, 3, 4]
    entry = json.loads(Path(world.queue.disk.env_path(mid)).read_bytes())
    assert entry["attempts"] == 4
    assert entry["recipients"][0]["status"] == "4.3.0"
    assert entry["next_attempt"] == pytest.approx(world.clock.seconds() + 2400)
    world.run(2399)
    assert sum(1 for c in world.net.commands if c.startswith("RCPT")) == 4
    del world.net.rcpt_replies["x@remote.test"]
    world.run(1)
    assert len(world.net.messages) == 1
    assert world.active() == []


def test_expiry_bounces_with_4_4_7(tmp_path):
    w = World(tmp_path, lifetime=3600, retry_min=300, retry_max=1000)
    w.queue.startService()
    w.net.up = False
    w.accept(mail_params={"ENVID": "E1"})
    w.run()
    for _ in range(20):
        w.run(300)
    assert w.active() == []
    [bounce] = w.maildir("john@example.com")
    msg, parts, per_message, [r] = parse_report(bounce.read_bytes())
    assert r["Action"] == "failed" and r["Status"] == "4.4.7"
    assert "refused" in r["Diagnostic-Code"]
    assert per_message["Original-Envelope-Id"] == "E1"
    assert per_message["Arrival-Date"]
    # the last attempt was made at expiry (arrival + 3600), not later
    assert msg["Date"] == email.utils.formatdate(T0 + 3600, localtime=True)
    w.queue.stopService()


def test_relay_host_down_defers_without_a_connection_each(world):
    world.net.up = False
    for _ in range(5):
        world.accept()
    world.run()
    assert world.net.attempts <= 2
    assert all(e.attempts == 1 and not e.in_flight for e in world.queue.entries.values())
    world.net.up = True
    world.run(300)
    assert len(world.net.messages) == 5


def test_concurrency_limit(tmp_path):
    w = World(tmp_path, concurrency=3)
    w.queue.startService()
    w.net.hang = True
    for _ in range(10):
        w.accept()
    assert w.net.attempts == 3
    w.queue.stopService()


def test_a_reload_reconfigures_the_running_queue(tmp_path):
    """RelayQueue.reconfigure (a configuration reload): the name in EHLO,
    the concurrency and the DSN routing change; the entries carry on."""
    from mailguard.store.notices import directory_router
    from tests.conftest import USERS

    w = World(tmp_path, concurrency=1)
    w.queue.startService()
    w.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    w.accept(sender="newbie@example.com", relay=("bad@remote.test",))
    w.run()
    assert w.net.verbs("EHLO") == ["EHLO mx.example.com"]
    assert w.maildir("newbie@example.com") == []  # no such user yet: the DSN went nowhere
    config, tables = build.load(str(write_config(tmp_path / "new.cfg", users=USERS + (
        ("newbie", "example.com", "pw", True),))))
    w.queue.reconfigure(hostname="new.example.com", lifetime=3600, retry_min=0, retry_max=10,
                        concurrency=3, router=directory_router(tables.directory))
    assert (w.queue.lifetime, w.queue.retry_min, w.queue.retry_max, w.queue.concurrency) == (3600, 1, 10, 3)
    assert w.queue.notices.hostname == "new.example.com"
    w.accept(sender="newbie@example.com", relay=("bad@remote.test",))
    w.run()
    assert w.net.verbs("EHLO")[-1] == "EHLO new.example.com"
    [dsn] = w.maildir("newbie@example.com")
    assert b"Reporting-MTA: dns; new.example.com" in dsn.read_bytes()
    w.net.hang = True
    for _ in range(5):
        w.accept()
    assert w.net.attempts == 2 + 3  # the two before, then three at once
    w.queue.stopService()


def test_no_relay_host_holds_then_bounces(tmp_path):
    w = World(tmp_path, relay_host=None, lifetime=1000)
    w.queue.startService()
    w.accept()
    w.run()
    assert w.net.attempts == 0
    assert len(w.active()) == 2
    for _ in range(10):
        w.run(300)
    assert w.active() == []
    [bounce] = w.maildir("john@example.com")
    _, _, _, [r] = parse_report(bounce.read_bytes())
    assert "no relay host" in r["Diagnostic-Code"]
    w.queue.stopService()


# --- restarts, crash recovery, ETRN ------------------------------------------------------


def test_queue_survives_a_restart(world):
    world.net.up = False
    mid = world.accept(rcpt_params={"x@remote.test": {"NOTIFY": "FAILURE", "ORCPT": "rfc822;x@remote.test"}})
    world.run()
    world.net.up = True
    world.restart()  # a queue run at start
    world.run()
    [tx] = world.net.messages
    assert tx.data == BODY
    assert world.active() == []
    assert mid not in world.queue.entries


def test_a_delivery_in_flight_at_the_stop_is_left_intact_for_the_next_start(world):
    """A graceful stop (mailguard.lifecycle) stops the queue after the
    sessions: a delivery still talking to the relay host is cut off, and
    its entry stays on disk as it was."""
    world.net.silent.add("DATA")  # the relay host never answers DATA: the delivery hangs
    mid = world.accept()
    world.run()
    assert world.net.verbs("DATA") and world.net.messages == []
    env = Path(world.queue.disk.active) / f"{mid}.env"
    before = env.read_bytes()
    world.queue.stopService()
    world.run()
    assert env.read_bytes() == before  # no attempt recorded
    world.net.silent.clear()
    world.restart()
    world.run()
    [tx] = world.net.messages
    assert tx.data == BODY and world.active() == []


def test_recover_cleans_crash_leftovers(world):
    world.net.up = False
    mid = world.accept()
    world.queue.stopService()
    active = Path(world.queue.disk.active)
    (active / "orphan.eml").write_bytes(b"never acknowledged")
    (Path(world.queue.disk.tmp) / "x.1").write_bytes(b"{")
    (Path(world.spool) / "incoming" / "partial").write_bytes(b"half")
    world.start()
    assert world.active() == [f"{mid}.eml", f"{mid}.env"]
    assert os.listdir(world.queue.disk.tmp) == []
    assert os.listdir(Path(world.spool) / "incoming") == []
    assert list(world.queue.entries) == [mid]


def test_the_constructor_touches_nothing_on_disk(tmp_path):
    """The queue's directories are made by open() (or startService), never
    by the constructor."""
    from twisted.internet.task import Clock

    from mailguard.store.queue import RelayQueue

    spool = tmp_path / "spool"
    queue = RelayQueue(str(spool), Clock(), relay_host=("relay.test", 25))
    assert not spool.exists()
    queue.startService()
    assert sorted(os.listdir(spool / "queue")) == ["active", "tmp"]
    queue.stopService()


def test_etrn_kick_runs_the_queue_now(world):
    world.net.up = False
    world.accept(relay=("x@remote.test",))
    world.accept(relay=("y@other.test",))
    world.run()
    world.net.up = True
    assert world.queue.kick("sub.remote.test") == 0
    assert world.queue.kick("remote.test") == 1
    world.run()
    assert [tx.rcpts for tx in world.net.messages] == [["RCPT TO:<x@remote.test>"]]
    assert world.queue.kick("@test") == 1  # subdomains
    world.run()
    assert len(world.net.messages) == 2


# --- settings and wiring -----------------------------------------------------------------


def test_settings_reach_the_queue(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from mailguard.service import build_context

    cfg = write_config(tmp_path / "mailserver.cfg", {
        "QueueLifetime": "86400", "QueueRetryMin": "60", "QueueRetryMax": "3600",
        "QueueConcurrency": "0", "RelayHostTlsVerify": "0"})
    config = config_mod.load(str(cfg))
    assert (config.queue_lifetime, config.queue_retry_min, config.queue_retry_max,
            config.queue_concurrency) == (86400, 60, 3600, 0)
    ctx = build_context(config, {"spool": str(tmp_path / "spool"), "relay-host": "[::1]:2525"},
                        MemoryReactorClock())
    q = ctx.queue
    assert (q.lifetime, q.retry_min, q.retry_max, q.concurrency) == (86400, 60, 3600, 1)
    assert q.relay_host == ("::1", 2525) and q.tls is not None and not q.tls_required
    # one way: the store hands relayed mail to the queue; the queue stores
    # its DSNs through the store's inject, as the composition root wired it
    assert ctx.dsn and ctx.store.relay is q and q.deliver == ctx.store.inject
    assert ctx.store.notices is q.notices and ctx.store.syncer is q.disk.syncer


def test_default_settings():
    config = config_mod.load(None)
    assert (config.queue_lifetime, config.queue_retry_min, config.queue_retry_max,
            config.queue_concurrency, config.relay_tls_verify) == (432000, 300, 14400, 10, False)


def test_malformed_setting_names_file_and_line(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"QueueLifetime": "five days"})
    config, problems = config_mod.read(str(cfg))
    assert config is None
    assert any('"QueueLifetime"' in str(p) and str(cfg) in str(p) for p in problems)


# --- the protocol: DSN parameters, ETRN, EHLO --------------------------------------------


def test_protocol_advertises_and_checks_dsn_and_etrn(world):
    from mailguard.testing import connect, make_context

    ctx = make_context(world.config, clock=world.clock, spool=world.spool, store=world.store,
                       queue=world.queue, dsn=True)
    proto, transport = connect(ctx, "127.0.0.2")
    transport.clear()
    proto.dataReceived(b"ETRN remote.test\r\n")
    assert transport.value().startswith(b"503 5.5.1")  # EHLO first
    transport.clear()
    proto.dataReceived(b"EHLO client.test\r\n")
    ehlo = transport.value()
    assert b"250-ETRN\r\n" in ehlo and b"250-DSN\r\n" in ehlo
    world.net.up = False
    for line, code in [
        (b"MAIL FROM:<john@example.com> RET=SOME\r\n", b"501 5.5.4"),
        (b"MAIL FROM:<john@example.com> ENVID=a=b\r\n", b"501 5.5.4"),
        (b"MAIL FROM:<john@example.com> RET=HDRS ENVID=abc\r\n", b"250"),
        (b"RCPT TO:<x@remote.test> NOTIFY=NEVER,SUCCESS\r\n", b"501 5.5.4"),
        (b"RCPT TO:<x@remote.test> ORCPT=nonsense\r\n", b"501 5.5.4"),
        (b"RCPT TO:<x@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@remote.test\r\n", b"250"),
        (b"ETRN remote.test\r\n", b"503 5.5.1"),  # not inside a transaction
        (b"DATA\r\n", b"354"),
        (b"Subject: x\r\n\r\nhi\r\n.\r\n", b"250"),
        (b"ETRN bad..domain\r\n", b"501"),
        (b"ETRN\r\n", b"501"),
        (b"ETRN #\r\n", b"501"),
        (b"ETRN #queue\r\n", b"250 2.0.0"),
        (b"ETRN @test\r\n", b"250 2.0.0"),
    ]:
        transport.clear()
        proto.dataReceived(line)
        assert transport.value().startswith(code), (line, transport.value())
    # the envelope kept the DSN parameters
    [entry] = world.queue.entries.values()
    assert (entry.ret, entry.envid) == ("HDRS", "abc")
    assert entry.recipients[0].notify == ["SUCCESS", "FAILURE"]
    assert entry.recipients[0].orcpt == "rfc822;x@remote.test"
    # ETRN for the domain: a queue run now, not at the back-off time
    world.net.up = True
    transport.clear()
    proto.dataReceived(b"ETRN remote.test\r\n")
    assert transport.value() == b"250 2.0.0 Queuing started\r\n"
    world.run()
    [tx] = world.net.messages
    assert tx.rcpts == ["RCPT TO:<x@remote.test>"]
