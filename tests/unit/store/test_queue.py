"""The relay queue (mailguard.store.queue) and DSNs (mailguard.store.dsn).

Unit tests drive the queue with a ``task.Clock`` and a scripted SMTP server
joined to the queue's real ``RelayClient`` by ``twisted.test.iosim`` (bytes
in, bytes out, no sockets).  The end-to-end tests at the bottom run real
``twistd -n mailguard`` processes and an aiosmtpd back-end on loopback.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.protocols import basic
from twisted.test import iosim
from zope.interface.verify import verifyObject

from mailguard.config import settings as config_mod
from mailguard.policy import build
from mailguard.store import dsn
from mailguard.store.maildir import Envelope, MaildirStore, run_inline
from mailguard.interfaces import IRelayQueue
from mailguard.store.queue import (
    FAILED,
    PENDING,
    SENT,
    Outcome,
    QueueEntry,
    RelayQueue,
    backoff,
    classify,
    directory_router,
)
from tests.conftest import free_port, write_config

T0 = 1_700_000_000.0
BODY = (b"Subject: test\r\nFrom: john@example.com\r\nMessage-ID: <m1@example.com>\r\n\r\n"
        b"Hello.\r\n.leading dot\r\n..two dots\r\n")


# --- a scripted next hop ------------------------------------------------------------

class FakeRelayServer(basic.LineReceiver):
    """A scripted SMTP server; its behaviour comes from the FakeNet."""

    delimiter = b"\r\n"
    MAX_LENGTH = 100000

    def __init__(self, net: "FakeNet") -> None:
        self.net = net
        self.data = None
        self.tx = None

    def connectionMade(self):
        self.send(self.net.greeting)

    def send(self, line: str) -> None:
        self.transport.write(line.encode() + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        net = self.net
        if self.data is not None:
            if line == b".":
                self.tx["data"] = b"".join(self.data)
                self.data = None
                reply = net.data_reply(self.tx)
                if reply.startswith("2"):
                    net.messages.append(self.tx)
                self.send(reply)
            else:
                self.data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        cmd = line.decode()
        verb = cmd.split(" ", 1)[0].upper()
        net.commands.append(cmd)
        if verb == "EHLO":
            ext = "".join(f"250-{e}\r\n" for e in net.extensions)
            self.transport.write(f"250-relay.test\r\n{ext}250 HELP\r\n".encode())
        elif verb == "HELO":
            self.send("250 relay.test")
        elif verb == "MAIL":
            self.tx = {"mail": cmd, "rcpts": []}
            self.send(net.mail_reply(cmd))
        elif verb == "RCPT":
            address = cmd[cmd.index("<") + 1: cmd.index(">")]
            reply = net.rcpt_reply(address)
            if reply.startswith("2"):
                self.tx["rcpts"].append(cmd)
            self.send(reply)
        elif verb == "DATA":
            self.data = []
            self.send("354 go ahead")
        elif verb == "RSET":
            self.send("250 2.0.0 ok")
        elif verb == "QUIT":
            self.send("221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.send("500 5.5.2 what")


class FakeNet:
    """The queue's C{connect}: joins its client to a L{FakeRelayServer}."""

    def __init__(self) -> None:
        self.up = True
        self.hang = False
        self.greeting = "220 relay.test ESMTP"
        self.extensions = ["PIPELINING", "SIZE 1000000", "8BITMIME"]
        self.messages: list[dict] = []
        self.commands: list[str] = []
        self.connects = 0
        self.pumps = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = lambda tx: "250 2.0.0 queued as X"
        self.mail_reply = lambda cmd: "250 2.1.0 ok"
        self.hung: list[defer.Deferred] = []

    def rcpt_reply(self, address: str) -> str:
        return self.rcpt_replies.get(address, "250 2.1.5 ok")

    def connect(self, factory):
        self.connects += 1
        if self.hang:
            d = defer.Deferred()
            self.hung.append(d)
            return d
        if not self.up:
            return defer.fail(error.ConnectionRefusedError("refused"))
        client = factory.buildProtocol(None)
        server = FakeRelayServer(self)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                             iosim.makeFakeClient(client), greet=False)
        self.pumps.append(pump)
        return defer.succeed(client)

    def flush(self) -> None:
        for _ in range(100):
            moved = False
            for pump in list(self.pumps):
                if pump.flush():
                    moved = True
            if not moved:
                return


class World:
    def __init__(self, tmp_path: Path, **kw) -> None:
        self.path = tmp_path
        self.spool = str(tmp_path / "spool")
        self.config, self.tables = build.load(str(write_config(tmp_path / "mailserver.cfg")))
        self.clock = Clock()
        self.clock.advance(T0)
        self.net = FakeNet()
        self.kw = kw
        self.start()

    def start(self) -> None:
        kw = dict(relay_host=("relay.test", 25), hostname="mx.example.com",
                  router=directory_router(self.tables.directory), connect=self.net.connect)
        kw.update(self.kw)
        self.queue = RelayQueue(self.spool, self.clock, **kw)
        self.store = MaildirStore(self.spool, run_inline, queue=self.queue)
        self.store.recover()
        self.queue.recover()

    def restart(self) -> None:
        self.queue.stopService()
        self.start()
        self.queue.startService()

    def accept(self, sender="john@example.com", relay=("x@remote.test",), local=(), body=BODY,
               mail_params=None, rcpt_params=None) -> str:
        env = Envelope(sender, tuple(local), tuple(relay), mail_params or {}, rcpt_params or {},
                       client_ip="127.0.0.2")
        msg = self.store.begin(env)
        msg.write(body)
        results = []
        msg.commit().addBoth(results.append)
        assert results == [env.message_id], results
        return env.message_id

    def run(self, seconds: float = 0.0) -> None:
        self.net.flush()
        if seconds:
            self.clock.advance(seconds)
        self.net.flush()

    def maildir(self, mailbox: str) -> list[Path]:
        local, domain = mailbox.split("@")
        new = Path(self.spool) / "mail" / domain / local / "Maildir" / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def active(self) -> list[str]:
        return sorted(os.listdir(self.queue.active))


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    w.queue.startService()
    yield w
    w.queue.stopService()


def parse_report(data: bytes):
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    blocks = parts[1].get_payload()
    return msg, parts, blocks[0], blocks[1:]


# --- unit: values ---------------------------------------------------------------------

def test_verify_object(world):
    assert verifyObject(IRelayQueue, world.queue)


def test_backoff_doubles_up_to_the_maximum():
    assert [backoff(n, 300, 14400) for n in range(1, 9)] == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]


@pytest.mark.parametrize("outcome, expected", [
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(250, "2.0.0 ok")), (SENT, "2.0.0")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (550, "5.1.1 no such user")}), (FAILED, "5.1.1")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (450, "4.2.0 greylisted")}), (PENDING, "4.2.0")),
    (Outcome(mail=(553, "no")), (FAILED, "5.0.0")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(552, "5.3.4 too big")), (FAILED, "5.3.4")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(451, "4.3.0 later")), (PENDING, "4.3.0")),
    (Outcome(error="connection refused"), (PENDING, "4.4.1")),
    # the end of DATA was acknowledged, then the connection dropped: sent
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(250, "ok"), error="lost"), (SENT, "2.0.0")),
])
def test_classify(outcome, expected):
    assert classify(outcome, "a@x")[:2] == expected


def test_queue_entry_round_trips_json():
    e = QueueEntry("id1", "a@b", [], T0, envid="x+2By", ret="HDRS")
    assert QueueEntry.from_json(e.to_json()) == e


# --- unit: DSN parameters -------------------------------------------------------------

@pytest.mark.parametrize("key, value, ok", [
    ("RET", "FULL", True), ("RET", "hdrs", True), ("RET", "ALL", False), ("RET", None, False),
    ("ENVID", "abc+2B123", True), ("ENVID", "a" * 101, False), ("ENVID", "a=b", False), ("ENVID", "+zz", False),
])
def test_mail_parameters(key, value, ok):
    assert (dsn.check_mail_parameter(key, value) is None) == ok


@pytest.mark.parametrize("key, value, ok", [
    ("NOTIFY", "NEVER", True), ("NOTIFY", "SUCCESS,FAILURE", True), ("NOTIFY", "delay", True),
    ("NOTIFY", "NEVER,SUCCESS", False), ("NOTIFY", "SOMETIMES", False), ("NOTIFY", None, False),
    ("NOTIFY", "FAILURE,FAILURE", False),
    ("ORCPT", "rfc822;a@b.test", True), ("ORCPT", "rfc822;a+2Bb@c", True), ("ORCPT", "rfc822", False),
    ("ORCPT", ";a@b", False), ("ORCPT", "rfc822;", False),
])
def test_rcpt_parameters(key, value, ok):
    assert (dsn.check_rcpt_parameter(key, value) is None) == ok


def test_xtext_round_trip():
    assert dsn.xtext_decode(dsn.xtext_encode("a+b=c d")) == "a+b=c d"
    assert dsn.xtext_encode("a+b") == "a+2Bb"


def test_notify_default_is_failure_only():
    assert dsn.wants(None, "FAILURE") and not dsn.wants(None, "SUCCESS")
    assert not dsn.wants((), "FAILURE")


# --- unit: relaying -------------------------------------------------------------------

def test_relays_and_removes_the_entry(world):
    mid = world.accept(relay=("x@remote.test", "y@remote.test"))
    assert world.active() == [f"{mid}.eml", f"{mid}.env"]
    world.run()
    [tx] = world.net.messages
    assert tx["mail"].startswith("MAIL FROM:<john@example.com> SIZE=")
    assert tx["rcpts"] == ["RCPT TO:<x@remote.test>", "RCPT TO:<y@remote.test>"]
    assert tx["data"] == BODY  # dot-stuffed on the wire, unstuffed by the server
    assert world.active() == []
    assert world.queue.entries == {}


def test_dot_stuffing_across_chunk_boundaries(world):
    # FileSender reads 16 KiB chunks: put a dot-line at every boundary.
    line = b"x" * 62 + b"\r\n"
    body = b"Subject: dots\r\n\r\n" + (line * 300 + b".dot\r\n") * 10 + b".\r\n..\r\n"
    world.accept(body=body)
    world.run()
    assert world.net.messages[0]["data"] == body


@given(lines=st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a.b", b"x" * 50]), max_size=40),
       cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8))
def test_transform_chunk_stuffs_like_rfc5321(lines, cuts):
    """However the file is cut into chunks, the bytes on the wire are the
    RFC 5321 4.5.2 dot-stuffed message."""
    from mailguard.store.queue import RelayClient

    message = b"".join(line + b"\r\n" for line in lines)
    client = RelayClient.__new__(RelayClient)
    client.__dict__.update(_line_start=True)
    client.resetTimeout = lambda: None
    out, i, k = [], 0, 0
    while i < len(message):
        n = cuts[k % len(cuts)]
        out.append(client.transformChunk(message[i:i + n]))
        i, k = i + n, k + 1
    expected = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    assert b"".join(out) == expected


def test_several_entries_share_a_connection(world):
    for _ in range(3):
        world.accept()
    world.run()
    assert len(world.net.messages) == 3
    assert world.net.connects <= 3
    assert world.net.commands.count("QUIT") == world.net.connects


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


def test_bounce_to_a_remote_sender_is_queued_with_the_null_sender(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(sender="someone@elsewhere.test", relay=("bad@remote.test",))
    world.run()
    [tx] = world.net.messages
    assert tx["mail"].startswith("MAIL FROM:<>")
    assert tx["rcpts"] == ["RCPT TO:<someone@elsewhere.test>"]
    parse_report(tx["data"])


def test_bounce_to_an_unknown_local_sender_is_dropped(world):
    world.net.rcpt_replies["bad@remote.test"] = "550 5.1.1 unknown"
    world.accept(sender="nobody@example.com", relay=("bad@remote.test",))
    world.run()
    assert world.active() == [] and world.net.messages == []


def test_temporary_failure_retries_with_backoff(world):
    world.net.rcpt_replies["x@remote.test"] = "451 4.3.0 try later"
    mid = world.accept()
    attempts = []
    for delay in (0, 300, 600, 1200):
        world.run(delay)
        attempts.append(sum(1 for c in world.net.commands if c.startswith("RCPT")))
    assert attempts == [1, 2, 3, 4]
    entry = json.loads(Path(world.queue.env_path(mid)).read_bytes())
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
    assert world.net.connects <= 2
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
    assert w.net.connects == 3
    w.queue.stopService()


def test_queue_survives_a_restart(world):
    world.net.up = False
    mid = world.accept(rcpt_params={"x@remote.test": {"NOTIFY": "FAILURE", "ORCPT": "rfc822;x@remote.test"}})
    world.run()
    world.net.up = True
    world.restart()  # a queue run at start
    world.run()
    [tx] = world.net.messages
    assert tx["data"] == BODY
    assert world.active() == []
    assert mid not in world.queue.entries


def test_recover_cleans_crash_leftovers(world):
    world.net.up = False
    mid = world.accept()
    world.queue.stopService()
    active = Path(world.queue.active)
    (active / "orphan.eml").write_bytes(b"never acknowledged")
    (Path(world.queue.tmp) / "x.1").write_bytes(b"{")
    (Path(world.spool) / "incoming" / "partial").write_bytes(b"half")
    world.start()
    assert world.active() == [f"{mid}.eml", f"{mid}.env"]
    assert os.listdir(world.queue.tmp) == []
    assert os.listdir(Path(world.spool) / "incoming") == []
    assert list(world.queue.entries) == [mid]


def test_etrn_kick_runs_the_queue_now(world):
    world.net.up = False
    world.accept(relay=("x@remote.test",))
    world.accept(relay=("y@other.test",))
    world.run()
    world.net.up = True
    assert world.queue.kick("sub.remote.test") == 0
    assert world.queue.kick("remote.test") == 1
    world.run()
    assert [tx["rcpts"] for tx in world.net.messages] == [["RCPT TO:<x@remote.test>"]]
    assert world.queue.kick("@test") == 1  # subdomains
    world.run()
    assert len(world.net.messages) == 2


def test_no_relay_host_holds_then_bounces(tmp_path):
    w = World(tmp_path, relay_host=None, lifetime=1000)
    w.queue.startService()
    w.accept()
    w.run()
    assert w.net.connects == 0
    assert len(w.active()) == 2
    for _ in range(10):
        w.run(300)
    assert w.active() == []
    [bounce] = w.maildir("john@example.com")
    _, _, _, [r] = parse_report(bounce.read_bytes())
    assert "no relay host" in r["Diagnostic-Code"]
    w.queue.stopService()


def test_dsn_parameters_passed_to_a_dsn_next_hop(world):
    world.net.extensions.append("DSN")
    world.accept(mail_params={"RET": "HDRS", "ENVID": "id+2B1"},
                 rcpt_params={"x@remote.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;x@remote.test"}})
    world.run()
    [tx] = world.net.messages
    assert tx["mail"].endswith(" RET=HDRS ENVID=id+2B1")
    assert tx["rcpts"] == ["RCPT TO:<x@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@remote.test"]
    assert world.maildir("john@example.com") == []  # the next hop reports success


def test_relayed_dsn_when_the_next_hop_has_no_dsn(world):
    world.accept(rcpt_params={"x@remote.test": {"NOTIFY": "SUCCESS"}})
    world.run()
    [tx] = world.net.messages
    assert "NOTIFY" not in tx["rcpts"][0]
    [notice] = world.maildir("john@example.com")
    msg, parts, _, [r] = parse_report(notice.read_bytes())
    assert r["Action"] == "relayed" and r["Status"] == "2.0.0"
    assert parts[2].get_content_type() == "text/rfc822-headers"


def test_delivered_dsn_for_a_local_recipient(world):
    world.accept(sender="someone@example.com".replace("someone", "jane"), relay=(), local=("john@example.com",),
                 rcpt_params={"john@example.com": {"NOTIFY": "SUCCESS"}})
    [notice] = world.maildir("jane@example.com")
    _, _, _, [r] = parse_report(notice.read_bytes())
    assert r["Action"] == "delivered" and r["Final-Recipient"] == "rfc822; john@example.com"


def test_8bit_message_is_sent_with_body_8bitmime(world):
    body = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode("utf-8")
    world.accept(body=body, mail_params={"BODY": "8BITMIME"})
    world.run()
    assert " BODY=8BITMIME" in world.net.messages[0]["mail"]


def test_ehlo_refused_falls_back_to_helo(world):
    orig = FakeRelayServer.lineReceived

    def no_ehlo(self, line):
        if line.upper().startswith(b"EHLO"):
            self.net.commands.append(line.decode())
            return self.send("502 5.5.1 no ESMTP here")
        return orig(self, line)

    FakeRelayServer.lineReceived = no_ehlo
    try:
        world.accept()
        world.run()
    finally:
        FakeRelayServer.lineReceived = orig
    assert any(c.startswith("HELO") for c in world.net.commands)
    assert "SIZE=" not in world.net.messages[0]["mail"]


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


# --- settings and wiring ------------------------------------------------------------

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
    assert ctx.dsn and ctx.store.queue is q and q.store is ctx.store


def test_default_settings():
    config = config_mod.load(None)
    assert (config.queue_lifetime, config.queue_retry_min, config.queue_retry_max,
            config.queue_concurrency, config.relay_tls_verify) == (432000, 300, 14400, 10, False)


def test_malformed_setting_names_file_and_line(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"QueueLifetime": "five days"})
    config, problems = config_mod.read(str(cfg))
    assert config is None
    assert any('"QueueLifetime"' in str(p) and str(cfg) in str(p) for p in problems)


# --- the protocol: DSN parameters, ETRN, EHLO ----------------------------------------

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
    assert tx["rcpts"] == ["RCPT TO:<x@remote.test>"]


# --- end to end: real twistd, aiosmtpd back-end --------------------------------------

BACKEND = r'''
import asyncio, json, os, sys
from aiosmtpd.smtp import SMTP

out, port = sys.argv[1], int(sys.argv[2])

class Handler:
    n = 0
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 <%s>: no such user" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"
    async def handle_DATA(self, server, session, envelope):
        Handler.n += 1
        base = os.path.join(out, "%d-%d" % (os.getpid(), Handler.n))
        with open(base + ".tmp", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json", "w") as f:
            json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                       "tls": session.ssl is not None}, f)
        os.rename(base + ".tmp", base + ".eml")
        return "250 2.0.0 OK"

async def main():
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(Handler(), hostname="backend.test"), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


class Backend:
    def __init__(self, tmp: Path, port: int) -> None:
        self.dir = tmp / "backend"
        self.dir.mkdir(exist_ok=True)
        self.port = port
        script = tmp / "backend.py"
        script.write_text(BACKEND)
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.dir), str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout.readline().strip() == b"ready", self.proc.stdout.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()

    def messages(self) -> list[tuple[dict, bytes]]:
        out = []
        for eml in sorted(self.dir.glob("*.eml")):
            meta = json.loads(eml.with_suffix(".json").read_text())
            out.append((meta, eml.read_bytes()))
        return out

    def wait(self, n: int, timeout: float = 20.0) -> list[tuple[dict, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"back-end got {len(self.messages())} message(s), expected {n}")


@pytest.fixture
def backend(tmp_path):
    started = []

    def start(port=None):
        b = Backend(tmp_path, port or free_port())
        started.append(b)
        return b

    yield start
    for b in started:
        if b.proc.poll() is None:
            b.stop()


def relay_config(tmp_path, **variables):
    return write_config(tmp_path / "mailserver.cfg", {k: str(v) for k, v in variables.items()})


def send(server, sender, rcpts, body, source="127.0.0.2", **kw):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(source, 0), timeout=10) as c:
        c.ehlo("client.test")
        return c.sendmail(sender, rcpts, body, **kw)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_e2e_trusted_client_relays_to_the_backend(twistd, backend, tmp_path):
    b = backend()
    server = twistd("--relay-host", f"127.0.0.1:{b.port}", config=relay_config(tmp_path))
    body = b"Subject: relay\r\nMessage-ID: <e2e-1@client.test>\r\n\r\nrelayed\r\n.dot\r\n"
    assert send(server, "john@example.com", ["x@remote.test"], body) == {}
    [(meta, data)] = b.wait(1)
    assert meta["from"] == "john@example.com" and meta["to"] == ["x@remote.test"]
    assert data.startswith(b"Received: from client.test ([127.0.0.2])")
    assert data.endswith(body)
    assert b"Twisted" not in data
    assert wait_for(lambda: not os.listdir(server.spool / "queue" / "active"))


def test_e2e_backend_down_then_up_retries(twistd, backend, tmp_path):
    port = free_port()
    server = twistd("--relay-host", f"127.0.0.1:{port}",
                    config=relay_config(tmp_path, QueueRetryMin=1, QueueRetryMax=2))
    send(server, "john@example.com", ["x@remote.test"], b"Subject: retry\r\n\r\nlater\r\n")
    time.sleep(1.5)
    assert len(os.listdir(server.spool / "queue" / "active")) == 2
    b = backend(port)
    [(meta, data)] = b.wait(1)
    assert b"later" in data


def test_e2e_queue_survives_a_restart(twistd, backend, tmp_path):
    port = free_port()
    cfg = relay_config(tmp_path)  # QueueRetryMin 300 s: only the restart retries it
    server = twistd("--relay-host", f"127.0.0.1:{port}", config=cfg)
    send(server, "john@example.com", ["x@remote.test"], b"Subject: restart\r\n\r\nkept\r\n")
    assert wait_for(lambda: "deferred" in server.output())
    server.stop()
    assert len(os.listdir(server.spool / "queue" / "active")) == 2
    b = backend(port)
    server2 = twistd("--relay-host", f"127.0.0.1:{port}", config=cfg)
    [(meta, data)] = b.wait(1)
    assert b"kept" in data
    assert wait_for(lambda: not os.listdir(server2.spool / "queue" / "active"))


def test_e2e_etrn_starts_a_queue_run(twistd, backend, tmp_path):
    port = free_port()
    server = twistd("--relay-host", f"127.0.0.1:{port}",
                    config=relay_config(tmp_path, QueueRetryMin=3600))
    send(server, "john@example.com", ["x@remote.test"], b"Subject: etrn\r\n\r\nnow\r\n")
    assert wait_for(lambda: "deferred" in server.output())
    b = backend(port)
    time.sleep(0.5)
    assert b.messages() == []
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        code, text = c.ehlo("stranger.test")
        assert b"ETRN" in text and b"DSN" in text
        # An untrusted client cannot end the back-off (it could hammer the
        # relay host and the disk).
        assert c.docmd("ETRN", "remote.test") == (458, b"4.5.0 Unable to queue messages for node: ETRN is for trusted clients")
    time.sleep(0.5)
    assert b.messages() == []
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
        c.ehlo("gateway.test")
        assert c.docmd("ETRN", "remote.test")[0] == 250
    [(meta, data)] = b.wait(1, timeout=10)
    assert b"now" in data


def test_e2e_backend_rejection_bounces_into_the_sender_maildir(twistd, backend, tmp_path):
    b = backend()
    server = twistd("--relay-host", f"127.0.0.1:{b.port}", config=relay_config(tmp_path))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("john@example.com", ["RET=HDRS", "ENVID=QQ+2B1"])[0] == 250
        assert c.rcpt("reject@remote.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;reject@remote.test"])[0] == 250
        assert c.rcpt("ok@remote.test")[0] == 250
        assert c.data(b"Subject: bounce me\r\n\r\nbody text\r\n")[0] == 250
    b.wait(1)
    assert wait_for(lambda: server.maildir_files("john@example.com"))
    [bounce] = server.maildir_files("john@example.com")
    msg, parts, per_message, [r] = parse_report(bounce.read_bytes())
    assert per_message["Original-Envelope-Id"] == "QQ+1"
    assert r["Final-Recipient"] == "rfc822; reject@remote.test"
    assert r["Original-Recipient"] == "rfc822;reject@remote.test"
    assert (r["Action"], r["Status"]) == ("failed", "5.1.1")
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"body text" not in bounce.read_bytes()


def _backend_mailguard(tmp_path: Path, *args: str):
    """A second mailguard as the next hop: local domain remote.test (user
    john@remote.test), STARTTLS with a throw-away CA's certificate."""
    from tests.certs import make_certs
    from tests.conftest import Twistd

    certs = make_certs(tmp_path / "certs")
    home = tmp_path / "backend-mailguard"
    home.mkdir()
    cfg = write_config(home / "mailserver.cfg", {"InternetHostname": "backend.test"})
    cfg.write_text(cfg.read_text().replace("example.com", "remote.test").replace("example.net", "remote.net"))
    port = free_port()
    server = Twistd(home, ["--config", str(cfg), "--tls-cert", certs.cert, "--tls-key", certs.key,
                           "--smtp", f"tcp:{port}:interface=127.0.0.1", *args], port)
    return server, certs


def test_e2e_starttls_and_dsn_to_a_mailguard_backend(twistd, tmp_path):
    """The next hop is a second mailguard offering STARTTLS and DSN: the
    queue uses TLS (opportunistic: a certificate it cannot verify is fine)
    and passes the DSN parameters on, so the next hop reports success."""
    back, certs = _backend_mailguard(tmp_path)
    try:
        server = twistd("--relay-host", f"127.0.0.1:{back.port}", config=relay_config(tmp_path))
        with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail("jane@example.com", ["ENVID=E2E"])[0] == 250
            assert c.rcpt("john@remote.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;john@remote.test"])[0] == 250
            assert c.data(b"Subject: tls\r\n\r\nover TLS\r\n")[0] == 250
        assert wait_for(lambda: back.maildir_files("john@remote.test"))
        [got] = back.maildir_files("john@remote.test")
        data = got.read_bytes()
        # the back-end's Received header: ESMTPS = ESMTP over TLS
        # Our Return-Path stayed here; the back-end wrote its own (one).
        assert data.startswith(b"Return-Path: <jane@example.com>\r\n"
                               b"Received: from mx.example.com ([127.0.0.1])\r\n\tby backend.test with ESMTPS")
        assert data.count(b"Return-Path:") == 1
        # NOTIFY=SUCCESS travelled: the back-end queued a "delivered" DSN for
        # jane@example.com (it has no relay host, so it holds it) ...
        active = back.spool / "queue" / "active"
        assert wait_for(lambda: any(p.suffix == ".env" for p in active.iterdir()))
        [env] = [json.loads(p.read_text()) for p in active.iterdir() if p.suffix == ".env"]
        assert env["sender"] == "" and env["recipients"][0]["address"] == "jane@example.com"
        [eml] = [p.read_bytes() for p in active.iterdir() if p.suffix == ".eml"]
        _, _, per_message, [r] = parse_report(eml)
        assert per_message["Original-Envelope-Id"] == "E2E"
        assert r["Action"] == "delivered" and r["Original-Recipient"] == "rfc822;john@remote.test"
        # ... and the front sent no "relayed" notice of its own.
        assert server.maildir_files("jane@example.com") == []
    finally:
        back.stop()


def test_e2e_verified_tls_to_the_relay_host(twistd, tmp_path):
    """RelayHostTlsVerify=1: TLS required, the certificate checked against
    RelayHostTlsCaFile for the relay host's name."""
    back, certs = _backend_mailguard(tmp_path)
    try:
        cfg = relay_config(tmp_path, RelayHostTlsVerify=1, RelayHostTlsCaFile=certs.ca)
        server = twistd("--relay-host", f"localhost:{back.port}", config=cfg)
        send(server, "jane@example.com", ["john@remote.test"], b"Subject: verified\r\n\r\nok\r\n")
        assert wait_for(lambda: back.maildir_files("john@remote.test"))
        assert b"with ESMTPS" in back.maildir_files("john@remote.test")[0].read_bytes()
    finally:
        back.stop()


def test_e2e_verified_tls_refuses_an_unknown_certificate(twistd, tmp_path):
    from tests.certs import make_certs

    back, certs = _backend_mailguard(tmp_path)
    other = make_certs(tmp_path / "other-ca")
    try:
        cfg = relay_config(tmp_path, RelayHostTlsVerify=1, RelayHostTlsCaFile=other.ca)
        server = twistd("--relay-host", f"localhost:{back.port}", config=cfg)
        send(server, "jane@example.com", ["john@remote.test"], b"Subject: unverified\r\n\r\nno\r\n")
        assert wait_for(lambda: "deferred" in server.output())
        assert back.maildir_files("john@remote.test") == []
        assert len(os.listdir(server.spool / "queue" / "active")) == 2
    finally:
        back.stop()
