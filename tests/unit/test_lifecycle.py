"""Reload and graceful stop of the whole service, on a Clock.

The service is the real L{MailguardService} around a real context (the
configuration read from a file that each test rewrites, a Maildir store
running inline); sessions connect through the service's own listener
factory, as they would through a listener.  The real reactor, signals and
sockets are in ``tests/e2e/test_lifecycle.py``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailguard import replies as R
from mailguard.lifecycle import MailguardService
from mailguard.policy import build
from mailguard.smtpd.factory import MailguardFactory
from mailguard.smtpd.listener import Listener
from mailguard.store.queue import RelayQueue
from mailguard.testing import LogCapture, connect, make_context
from tests.certs import make_certs
from tests.conftest import USERS, write_config
from tests.helpers_context import maildir_messages

NEWBIE = ("newbie", "example.com", "newbie-secret", True)
BASE = {"SmtpGreetingDelay": "25", "SmtpGreetingDelayExceptions": "NoDelay",
        "SmtpGreetingPassCacheTtl": "3600"}
MESSAGE = "Subject: hi\r\n\r\nHello.\r\n.\r\n"


class World:
    """A service on a Clock, its configuration file, its listener."""

    def __init__(self, tmp: Path, variables=None, **kw) -> None:
        self.tmp = tmp
        self.path = tmp / "mailserver.cfg"
        self.write(variables, **kw)
        config, tables = build.load(str(self.path))
        self.clock = Clock()
        spool = tmp / "spool"
        ctx = make_context(config, clock=self.clock, spool=str(spool), tables=tables,
                           queue=RelayQueue(str(spool), self.clock))
        self.service = MailguardService(ctx, self.clock, read=partial(build.read_checked, str(self.path)))
        self.factory = MailguardFactory(ctx, "smtp")
        self.service.factories.append(self.factory)

    def write(self, variables=None, **kw) -> None:
        write_config(self.path, {**BASE, **(variables or {})}, **kw)

    def connect(self, ip="127.0.0.4", port=40000):
        return connect(self.factory.context, ip, port, factory=self.factory)

    def reload(self):
        d = self.service.reload()
        assert d.called  # the read runs inline here
        return d.result


def ehlo(client):
    client.take()
    assert client.cmd("EHLO client.test").startswith(b"250")
    return client


def rcpt(client, address) -> str:
    out = client.send(f"MAIL FROM:<a@sender.test>\r\nRCPT TO:<{address}>\r\nRSET\r\n")
    return client.codes(out)[1]


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


# --- reload --------------------------------------------------------------------------

def test_a_new_user_is_accepted_by_new_sessions_and_old_ones_finish_as_they_began(world):
    before = ehlo(world.connect(port=1))
    assert rcpt(before, "newbie@example.com") == "550 5.1.1"
    world.write(users=USERS + (NEWBIE,))
    with LogCapture() as logged:
        result = world.reload()
    assert result.ok and result.changes.users.added == 1
    assert "configuration reloaded from " + str(world.path) + ": users 1 added" in logged.text()
    assert "newbie" not in logged.text()  # counts, never names or passwords
    after = ehlo(world.connect(port=2))
    assert rcpt(after, "newbie@example.com") == "250 2.1.5"
    # the session opened before goes on with the configuration it began with
    assert rcpt(before, "newbie@example.com") == "550 5.1.1"
    assert before.codes(before.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n{MESSAGE}"))[-1] \
        == "250 2.0.0"
    assert len(maildir_messages(world.service.context, "john@example.com")) == 1


def test_a_broken_file_keeps_the_old_configuration_serving(world):
    running = world.service.context
    world.path.write_text(world.path.read_text().replace(
        '<variable name="SmtpGreetingDelay">25</variable>',
        '<variable name="SmtpGreetingDelay">soon</variable>').replace("</config>", "<unclosed>\n</config>"))
    with LogCapture() as logged:
        result = world.reload()
    assert not result.ok
    assert world.service.context is running and world.factory.context is running
    text = logged.text()
    problems = [str(p) for p in result.problems if p.is_error]
    assert problems and all(p.startswith(f"{world.path}:") for p in problems)
    for p in problems:
        assert p in text  # every FILE:LINE problem is logged
    assert "configuration reload failed" in text and "still serving" in text
    assert rcpt(ehlo(world.connect()), "john@example.com") == "250 2.1.5"


def test_the_check_rules_apply_to_a_reload_too(world):
    world.write({"RelayControlIpGroup": "Everyone"}, groups=(("Everyone", "0.0.0.0/0"), ("NoDelay", "127.0.0.4")))
    result = world.reload()
    assert not result.ok
    assert any("open relay" in p.message for p in result.problems if p.is_error)
    # the old relay group still decides
    assert rcpt(ehlo(world.connect("127.0.0.4")), "far@remote.test") == "554 5.7.1"


def test_a_held_connection_keeps_waiting_and_is_greeted_by_the_new_configuration(world):
    held = world.connect("127.0.0.3")
    assert held.take() == b""
    world.clock.advance(10)
    world.write({"InternetHostname": "new.example.com", "SmtpGreetingDelay": "5"})
    assert world.reload().ok
    world.clock.advance(14)
    assert held.take() == b""  # its own 25 s, not the new 5
    world.clock.advance(1)
    assert held.take() == b"220 new.example.com ESMTP\r\n"
    fresh = world.connect("127.0.0.5")
    world.clock.advance(5)
    assert fresh.take() == b"220 new.example.com ESMTP\r\n"


def test_the_pass_cache_and_the_counters_carry_on(world):
    first = world.connect("127.0.0.3", 1)
    world.clock.advance(25)
    first.take()
    first.send(f"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n{MESSAGE}")
    cache = world.service.context.greeting.pass_cache
    assert "127.0.0.3" in cache
    world.write({"SmtpMaxConnectionsPerIp": "2", "SmtpGreetingPassCacheSize": "50"})
    assert world.reload().ok
    ctx = world.service.context
    assert ctx.greeting.pass_cache is cache and cache.size == 50
    assert ctx.connections.total == 1 and ctx.connections.max_per_ip == 2
    second = world.connect("127.0.0.3", 2)
    assert second.take() == b"220 mx.example.com ESMTP\r\n"  # passed before the reload: at once
    third = world.connect("127.0.0.3", 3)
    assert third.take() == R.TOO_MANY_FROM_IP.to_bytes()  # the new limit, counting the old session


def test_turning_the_pass_cache_off_drops_it(world):
    world.write({"SmtpGreetingPassCacheTtl": "0"})
    assert world.reload().ok
    assert world.service.context.greeting.pass_cache is None


def test_settings_that_need_a_restart_keep_their_value_and_are_named(world):
    world.write({"GatewayTimeout": "20", "QueueLifetime": "3600", "SmtpMaxErrors": "3"})
    with LogCapture() as logged:
        result = world.reload()
    assert result.ok
    assert result.changes.restart == ("GatewayTimeout",)
    config = world.service.context.config
    assert config.gateway_timeout == 10.0 and config.max_errors == 3
    assert "applied only at the next restart: GatewayTimeout" in logged.text()
    queue = world.service.context.queue
    assert queue.lifetime == 3600.0  # the queue takes its new settings


def test_nothing_changed_says_so(world):
    with LogCapture() as logged:
        result = world.reload()
    assert result.ok and not result.changes
    assert "no change" in logged.text()


def test_reloads_asked_for_during_a_reload_run_once_after_it(world):
    runs: list[defer.Deferred] = []

    def run(f):
        d = defer.Deferred()
        runs.append(d)
        d.addCallback(lambda _: f())
        return d

    world.service.run = run
    first = world.service.reload()
    second, third = world.service.reload(), world.service.reload()
    assert len(runs) == 1
    world.write(users=USERS + (NEWBIE,))
    runs[0].callback(None)
    assert first.result.changes.users.added == 1
    assert len(runs) == 2 and not second.called  # one more, for both
    world.write(users=USERS + (NEWBIE, ("other", "example.com", "x", True)))  # changed meanwhile
    runs[1].callback(None)
    assert second.result is third.result and second.result.changes.users.added == 1
    assert len(runs) == 2


def test_an_internal_error_keeps_the_old_configuration(world):
    running = world.service.context

    def broken():
        raise RuntimeError("a bug")

    world.service.read = broken
    with LogCapture() as logged:
        result = world.reload()
    assert not result.ok and world.service.context is running
    assert "internal error" in logged.text()


def test_tls_files_are_loaded_again(tmp_path):
    certs = make_certs(tmp_path / "certs")
    world = World(tmp_path)
    world.service.tls_files = (certs.cert, certs.key)
    assert world.reload().ok
    first = world.service.context.tls
    assert first is not None
    assert world.reload().ok and world.service.context.tls is not first  # a renewed certificate
    world.service.tls_files = (certs.cert, certs.other_key)
    with LogCapture() as logged:
        result = world.reload()
    assert not result.ok and world.service.context.tls is not None
    assert "configuration reload failed (1 error(s))" in logged.text()


# --- stop -------------------------------------------------------------------------------

class Port:
    def __init__(self, log):
        self.log = log

    def stopListening(self):
        self.log.append("listener")


class Endpoint:
    def __init__(self, log):
        self.log = log

    def listen(self, factory):
        return defer.succeed(Port(self.log))


class Child(service.Service):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def stopService(self):
        super().stopService()
        self.log.append(self.name)


def test_stop_closes_the_listeners_drains_the_sessions_then_stops_the_rest(world):
    order: list[str] = []
    top = world.service
    Child("queue", order).setServiceParent(top)
    Listener("smtp", "tcp:25", Endpoint(order), world.factory).setServiceParent(top)
    top.startService()
    idle = ehlo(world.connect(port=1))
    busy = ehlo(world.connect(port=2))
    busy.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
    done = []
    top.stopService().addCallback(done.append)
    assert order == ["listener"]
    assert idle.take() == R.SHUTTING_DOWN.to_bytes()
    idle.lose(Failure(ConnectionDone()))
    assert top.reload().result.ok is False  # no reload while stopping
    world.clock.advance(29)
    assert not done and order == ["listener"]
    assert busy.codes(busy.send(MESSAGE)) == ["250 2.0.0", "421 4.3.2"]
    busy.lose(Failure(ConnectionDone()))
    assert order == ["listener", "queue"] and done
    assert len(maildir_messages(top.context, "john@example.com")) == 1


def test_hurry_ends_the_grace(world):
    top = world.service
    top.startService()
    busy = ehlo(world.connect())
    busy.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
    top.stopService()
    top.hurry()
    world.clock.advance(0)
    assert busy.take() == R.SHUTTING_DOWN.to_bytes()


# --- the wiring --------------------------------------------------------------------------

def test_build_service_reloads_from_the_files_it_started_with(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from mailguard.service import build_service
    from mailguard.store.durable import run_inline

    path = write_config(tmp_path / "mailserver.cfg")
    users = tmp_path / "accounts.cfg"
    users.write_text('<?xml version="1.0"?>\n<config></config>\n')
    config, tables = build.load(str(path), str(users))
    top = build_service(config, {"config": str(path), "users": str(users), "spool": str(tmp_path / "spool"),
                                 "submission": "tcp:0:interface=127.0.0.1"},
                        MemoryReactorClock(), tables)
    assert isinstance(top, MailguardService)
    assert [f.listener for f in top.factories] == ["smtp", "submission"]
    top.run = run_inline
    users.write_text('<?xml version="1.0"?>\n<config><list name="User"><listitem>'
                     '<variable name="Name">newbie</variable><variable name="Domain">example.com</variable>'
                     '</listitem></list></config>\n')
    result = top.reload().result
    assert result.ok and result.changes.users.added == 1
    assert all(f.context is top.context for f in top.factories)
    assert top.context.policies.directory.lookup("newbie@example.com").status.name == "KNOWN"
