"""The greeting delay (Kerio's spam repellent): the hold, early talkers,
clients that give up, exemptions, the teaser, the pass cache and the
connection limits.

Bytes in, bytes out: a L{MailguardESMTP} on a C{StringTransport}, time on a
C{task.Clock}, the real L{GreetingPolicy} and an unthreaded security log
built from a test C{mailserver.cfg} (see C{tests/conftest.write_config}: the
relay group "Trusted" is 127.0.0.2, the exception group "NoDelay" is
127.0.0.4).  After every disconnect, no delayed call is left on the clock.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from mailguard import replies as R
from mailguard.config.settings import load
from mailguard.policy.build import build_tables
from mailguard.policy.greeting import GREET_NOW, GreetingPolicy, PassCache
from mailguard.policy.session import Session
from mailguard.testing import connect, make_context
from tests.conftest import write_config

DELAY = 25.0
BANNER = b"220 mx.example.com ESMTP\r\n"
TEASER = b"220-mx.example.com ESMTP\r\n"
EARLY = R.EARLY_TALKER.to_bytes()
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n.\r\n"


@pytest.fixture
def base_config(tmp_path):
    path = write_config(tmp_path / "mailserver.cfg", {
        "SmtpGreetingDelay": str(int(DELAY)),
        "SmtpGreetingDelayExceptions": "NoDelay",
    })
    return load(str(path))


@pytest.fixture
def server(tmp_path, base_config):
    """server(**config_changes) -> a ServerContext on a Clock."""

    def make(**changes):
        config = replace(base_config, **changes)
        return make_context(config, spool=str(tmp_path / "spool"))

    return make


def log_lines(ctx) -> list[list[str]]:
    """The security log, flushed, as tab-separated fields."""
    ctx.clock.advance(0)  # the (unthreaded) log writes from a callLater(0)
    try:
        with open(ctx.security_log.path) as f:
            return [line.rstrip("\n").split("\t") for line in f]
    except FileNotFoundError:
        return []


def hang_up(proto, reason=ConnectionDone) -> None:
    """The client closed (StringTransport does not call connectionLost)."""
    proto.connectionLost(Failure(reason()))


def assert_no_timers(ctx) -> None:
    ctx.clock.advance(0)  # let a pending security-log flush run
    assert ctx.clock.getDelayedCalls() == []


def transact(proto, transport) -> bytes:
    """A whole mail transaction; returns what the server answered."""
    transport.clear()
    for line in (b"EHLO client.test\r\n", b"MAIL FROM:<a@sender.test>\r\n",
                 b"RCPT TO:<john@example.com>\r\n", b"DATA\r\n", MESSAGE, b"QUIT\r\n"):
        proto.dataReceived(line)
    return transport.value()


# --- the hold -------------------------------------------------------------------

def test_held_client_gets_nothing_until_the_delay(server):
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    assert transport.value() == b""
    assert len(ctx.clock.getDelayedCalls()) == 1  # one delayed call, nothing else
    ctx.clock.advance(DELAY - 0.001)
    assert transport.value() == b""
    ctx.clock.advance(0.001)
    assert transport.value() == BANNER


def test_after_the_delay_the_session_is_ordinary_smtp(server):
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY)
    reply = transact(proto, transport)
    assert b"250 2.0.0 Message accepted" in reply or b"250 2.0.0 Ok: queued" in reply
    assert reply.endswith(R.CLOSING.to_bytes())
    assert log_lines(ctx) == []
    hang_up(proto)
    assert_no_timers(ctx)


def test_a_held_connection_keeps_nothing_but_its_call(server):
    """Immutable class-level defaults: while held, the instance holds only
    the factory, the transport, its facts, the hold, its session id and
    when it connected (for the log) -- no state machine yet, and nothing
    mutable shared by every instance."""
    ctx = server()
    proto, _ = connect(ctx, "127.0.0.3", 5555)
    assert set(vars(proto)) <= {"factory", "transport", "connected", "opened", "_hold", "_connected_at", "sid"}
    assert proto.smtp is None
    for cls in type(proto).__mro__:
        for name, value in vars(cls).items():
            if not name.startswith("__"):
                assert not isinstance(value, (list, dict, set, bytearray)), (cls, name)


# --- early talkers ------------------------------------------------------------

def test_early_talker_at_zero_seconds(server):
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    proto.dataReceived(b"EHLO bot.test\r\nMAIL FROM:<spam@bot.test>\r\n")
    assert transport.value() == EARLY
    assert transport.value().startswith(b"554 5.7.1 ")
    assert transport.disconnecting
    proto.dataReceived(b"RCPT TO:<john@example.com>\r\n")  # ignored: closing
    assert transport.value() == EARLY
    hang_up(proto)
    lines = log_lines(ctx)
    assert len(lines) == 1  # the early talk, not also a give-up
    stamp, event, host, port, waited, first = lines[0]
    assert (event, host, port, waited) == ("early-talker", "127.0.0.3", "5555", "waited=0.00")
    assert first == r"first=b'EHLO bot.test\r\nMAIL FROM:<spam@bot.test>\r\n'"
    assert stamp.endswith("Z") and stamp.startswith("1970-01-01T00:00:00")
    assert_no_timers(ctx)


def test_early_talker_just_before_the_deadline(server):
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY - 0.01)
    proto.dataReceived(b"H")
    assert transport.value() == EARLY
    assert transport.disconnecting
    ctx.clock.advance(1)  # the cancelled hold never greets
    assert transport.value() == EARLY
    hang_up(proto)
    [line] = log_lines(ctx)
    assert line[1] == "early-talker" and line[4] == "waited=24.99" and line[5] == "first=b'H'"
    assert_no_timers(ctx)


def test_talking_right_after_the_greeting_is_fine(server):
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY)
    proto.dataReceived(b"EHLO client.test\r\n")
    assert transport.value().startswith(BANNER + b"250-mx.example.com")
    assert not transport.disconnecting
    assert log_lines(ctx) == []


def test_early_talker_first_bytes_are_escaped_and_cut(server):
    ctx = server()
    proto, _ = connect(ctx, "127.0.0.3", 5555)
    proto.dataReceived(b"\x00\t\xff'\\" + b"A" * 200)
    hang_up(proto)
    [line] = log_lines(ctx)
    assert len(line) == 6  # the tab the client sent did not split the line
    assert line[5] == "first=" + repr(b"\x00\t\xff'\\" + b"A" * 59)


# --- clients that give up -----------------------------------------------------------

@pytest.mark.parametrize("reason", [ConnectionDone, ConnectionLost])
def test_gave_up(server, reason):
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(12.5)
    hang_up(proto, reason)
    [line] = log_lines(ctx)
    assert line[1:] == ["gave-up", "127.0.0.3", "5555", "waited=12.50", "first=b''"]
    assert transport.value() == b""
    assert_no_timers(ctx)


def test_disconnect_after_the_greeting_is_not_an_attack(server):
    ctx = server()
    proto, _ = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY + 1)
    hang_up(proto)
    assert log_lines(ctx) == []
    assert_no_timers(ctx)


def test_server_shutdown_is_not_a_give_up(server):
    ctx = server()
    proto, _ = connect(ctx, "127.0.0.3", 5555)
    ctx.connections.stop()  # the reactor's "before shutdown" trigger
    hang_up(proto, ConnectionLost)
    assert log_lines(ctx) == []
    assert_no_timers(ctx)


def test_log_off_writes_nothing(server):
    ctx = server(greeting_delay_log=False)
    talker, t1 = connect(ctx, "127.0.0.3", 5555)
    talker.dataReceived(b"EHLO bot\r\n")
    assert t1.value() == EARLY  # still refused
    hang_up(talker)
    quitter, _ = connect(ctx, "127.0.0.5", 5556)
    hang_up(quitter)
    assert log_lines(ctx) == []
    assert ctx.security_log.written == 0
    assert_no_timers(ctx)


@pytest.mark.parametrize("state", ["held", "teaser", "early-talker", "greeted", "in-data", "refused"])
def test_no_delayed_call_outlives_its_connection(server, state):
    ctx = server(greeting_teaser=(state == "teaser"), max_connections_per_ip=1)
    if state == "refused":
        first, _ = connect(ctx, "127.0.0.3", 5000)
        hang_up(first)
        first, _ = connect(ctx, "127.0.0.3", 5000)
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    if state == "early-talker":
        proto.dataReceived(b"EHLO x\r\n")
    elif state in ("greeted", "in-data"):
        ctx.clock.advance(DELAY)
        if state == "in-data":
            proto.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\nSubject: x\r\n")
            assert transport.value().rstrip().endswith(b"354 End data with <CR><LF>.<CR><LF>")
    hang_up(proto)
    if state == "refused":
        hang_up(first)
    assert_no_timers(ctx)
    assert ctx.connections.total == 0 and not ctx.connections.per_ip


# --- exemptions ----------------------------------------------------------------

def test_exception_group_is_greeted_at_once(server):
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.4", 5555)
    assert transport.value() == BANNER
    assert b"250 2.0.0" in transact(proto, transport)


def test_relay_group_alone_is_not_exempt(server):
    """As in Kerio, only SmtpGreetingDelayExceptions skips the delay; add
    the relay group to it (``group:Trusted``) to greet relays at once."""
    ctx = server()
    _, transport = connect(ctx, "127.0.0.2", 5555)
    assert transport.value() == b""


@pytest.mark.parametrize("listener", ["smtps", "submission"])
def test_secure_listeners_never_delay(server, listener):
    ctx = server()
    _, transport = connect(ctx, "127.0.0.3", 5555, listener=listener)
    assert transport.value() == BANNER


def test_delay_zero_turns_it_off(server):
    ctx = server(greeting_delay=0.0, greeting_teaser=True)
    _, transport = connect(ctx, "127.0.0.3", 5555)
    assert transport.value() == BANNER


def test_ipv4_mapped_client_is_matched_as_ipv4(server):
    ctx = server()
    _, transport = connect(ctx, "::ffff:127.0.0.4", 5555)
    assert transport.value() == BANNER


@pytest.mark.parametrize("listener, ip, delay, expected", [
    ("smtp", "192.0.2.9", 25.0, 25.0),
    ("smtp", "127.0.0.4", 25.0, 0.0),
    ("smtp", "127.0.0.2", 25.0, 25.0),
    ("smtps", "192.0.2.9", 25.0, 0.0),
    ("submission", "192.0.2.9", 25.0, 0.0),
    ("smtp", "192.0.2.9", 0.0, 0.0),
])
def test_decision_table(base_config, listener, ip, delay, expected):
    policy = GreetingPolicy(delay, build_tables(base_config)[0].ip_groups, "NoDelay")
    decision = policy.decide(Session(ip, 1, listener))
    assert decision.delay == expected
    assert not decision.teaser
    if delay == 0:
        assert decision is GREET_NOW


@pytest.mark.parametrize("group, ip, exception", [
    ("NoDelay", "127.0.0.4", True),
    ("NoDelay", "::ffff:127.0.0.4", True),  # the facts normalise the address
    ("NoDelay", "127.0.0.2", False),
    ("", "127.0.0.4", False),
])
def test_exception_group_is_one_definition(base_config, group, ip, exception):
    """What greets at once is what the per-IP connection limit exempts
    (with trust; see tests/unit/policy/test_rules.py), whatever the delay."""
    for delay in (0.0, 25.0):
        policy = GreetingPolicy(delay, build_tables(base_config)[0].ip_groups, group)
        assert policy.is_exception(Session(ip, 1, "smtp")) is exception


# --- the teaser -----------------------------------------------------------------

def test_teaser_sends_the_first_line_at_once_and_the_last_after_the_delay(server):
    ctx = server(greeting_teaser=True)
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    assert transport.value() == TEASER
    ctx.clock.advance(DELAY - 0.001)
    assert transport.value() == TEASER
    ctx.clock.advance(0.001)
    assert transport.value() == TEASER + BANNER
    assert b"250 2.0.0" in transact(proto, transport)


def test_teaser_catches_a_bot_that_answers_the_first_line(server):
    ctx = server(greeting_teaser=True)
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(0.2)
    proto.dataReceived(b"EHLO bot\r\n")
    assert transport.value() == TEASER + EARLY
    assert transport.disconnecting
    hang_up(proto)
    [line] = log_lines(ctx)
    assert line[1] == "early-talker" and line[4] == "waited=0.20"
    assert_no_timers(ctx)


def test_teaser_is_off_by_default(base_config):
    assert base_config.greeting_teaser is False


# --- the pass cache ----------------------------------------------------------------

def test_pass_cache_is_off_by_default(server, base_config):
    assert base_config.greeting_pass_ttl == 0
    ctx = server()
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY)
    transact(proto, transport)
    hang_up(proto)
    _, again = connect(ctx, "127.0.0.3", 5556)
    assert again.value() == b""


def test_pass_cache_greets_a_client_that_waited_and_sent_mail_until_the_ttl(server):
    ctx = server(greeting_pass_ttl=3600.0)
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY)
    assert b"250 2.0.0" in transact(proto, transport)
    hang_up(proto)
    # Back within the TTL: greeted at once.
    proto, transport = connect(ctx, "127.0.0.3", 5556)
    assert transport.value() == BANNER
    hang_up(proto)
    # Another address is still held.
    other, other_t = connect(ctx, "127.0.0.5", 5557)
    assert other_t.value() == b""
    hang_up(other)
    # Just before the TTL (counted from the pass) ends: still at once.
    ctx.clock.advance(3600.0 - 0.001)
    proto, transport = connect(ctx, "127.0.0.3", 5558)
    assert transport.value() == BANNER
    hang_up(proto)
    # After it: held again.
    ctx.clock.advance(0.001)
    proto, transport = connect(ctx, "127.0.0.3", 5559)
    assert transport.value() == b""
    hang_up(proto)
    assert_no_timers(ctx)


def test_pass_cache_needs_a_completed_transaction(server):
    ctx = server(greeting_pass_ttl=3600.0)
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY)
    proto.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@example.com>\r\nQUIT\r\n")
    hang_up(proto)
    _, again = connect(ctx, "127.0.0.3", 5556)
    assert again.value() == b""


def test_pass_cache_is_not_extended_by_mail_sent_while_cached(server):
    ctx = server(greeting_pass_ttl=100.0)
    proto, transport = connect(ctx, "127.0.0.3", 5555)
    ctx.clock.advance(DELAY)
    transact(proto, transport)
    hang_up(proto)
    ctx.clock.advance(50)
    proto, transport = connect(ctx, "127.0.0.3", 5556)  # cached: at once
    assert transport.value() == BANNER
    transact(proto, transport)
    hang_up(proto)
    ctx.clock.advance(51)  # 101 s after the pass
    _, transport = connect(ctx, "127.0.0.3", 5557)
    assert transport.value() == b""


def test_pass_cache_ignores_exempt_clients(server):
    ctx = server(greeting_pass_ttl=3600.0)
    proto, transport = connect(ctx, "127.0.0.4", 5555)
    transact(proto, transport)
    hang_up(proto)
    assert len(ctx.greeting.pass_cache) == 0


def test_pass_cache_is_a_bounded_lru():
    from twisted.internet.task import Clock

    clock = Clock()
    cache = PassCache(clock, ttl=10.0, size=2)
    cache.add("a")
    cache.add("b")
    assert "a" in cache  # a is now the most recently used
    cache.add("c")  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    assert len(cache) == 2
    clock.advance(10.0)
    assert "a" not in cache and "c" not in cache
    assert len(cache) == 0  # expired entries are dropped when seen


@pytest.mark.parametrize("ttl, size", [(0.0, 10), (10.0, 0)])
def test_pass_cache_disabled_by_zero(ttl, size):
    from twisted.internet.task import Clock

    cache = PassCache(Clock(), ttl, size)
    cache.add("a")
    assert "a" not in cache and len(cache) == 0


# --- connection limits ---------------------------------------------------------------

def test_total_connection_limit(server):
    ctx = server(max_connections=2)
    a, _ = connect(ctx, "127.0.0.3", 1)
    b, _ = connect(ctx, "127.0.0.5", 2)
    c, tc = connect(ctx, "127.0.0.6", 3)
    assert tc.value() == R.TOO_MANY_CONNECTIONS.to_bytes()
    assert tc.value().startswith(b"421 4.7.0 ")
    assert tc.disconnecting
    held = [c for c in ctx.clock.getDelayedCalls() if c.func.__name__ == "_release"]
    assert len(held) == 2  # the refused one is not held
    hang_up(c)
    assert ctx.connections.total == 2
    # A refusal is logged as such, not as a give-up.
    assert [line[1:4] for line in log_lines(ctx)] == [["too-many-connections", "127.0.0.6", "3"]]
    hang_up(a)
    d, td = connect(ctx, "127.0.0.6", 4)  # room again
    assert td.value() == b"" and not td.disconnecting
    for p in (b, d):
        hang_up(p)
    assert ctx.connections.total == 0
    assert log_lines(ctx)[1][1] == "gave-up"


def test_total_limit_applies_to_exempt_clients_too(server):
    ctx = server(max_connections=1)
    connect(ctx, "127.0.0.3", 1)
    _, t = connect(ctx, "127.0.0.4", 2)
    assert t.value() == R.TOO_MANY_CONNECTIONS.to_bytes()


def test_per_ip_connection_limit(server):
    ctx = server(max_connections_per_ip=2)
    conns = [connect(ctx, "127.0.0.3", p) for p in (1, 2, 3)]
    assert conns[2].transport.value() == R.TOO_MANY_FROM_IP.to_bytes()
    assert conns[2].transport.value().startswith(b"421 4.7.0 ")
    assert conns[2].transport.disconnecting
    _, other = connect(ctx, "127.0.0.5", 4)
    assert other.value() == b"" and not other.disconnecting
    assert ctx.connections.per_ip == {"127.0.0.3": 2, "127.0.0.5": 1}
    hang_up(conns[2].proto)
    assert ctx.connections.per_ip["127.0.0.3"] == 2
    assert [line[1:4] for line in log_lines(ctx)] == [["too-many-from-ip", "127.0.0.3", "3"]]
    hang_up(conns[0].proto)
    _, again = connect(ctx, "127.0.0.3", 5)
    assert not again.disconnecting


@pytest.mark.parametrize("ip", ["127.0.0.2", "127.0.0.4"])  # relay group, exception group
def test_per_ip_limit_exempts_trusted_and_exception_groups(server, ip):
    ctx = server(max_connections_per_ip=1)
    transports = [connect(ctx, ip, p).transport for p in (1, 2, 3)]
    assert not any(t.disconnecting for t in transports)


def test_zero_limits_mean_no_limit(server):
    ctx = server(max_connections=0, max_connections_per_ip=0)
    transports = [connect(ctx, "127.0.0.3", p).transport for p in range(100)]
    assert not any(t.disconnecting for t in transports)
    assert ctx.connections.total == 100


def test_limit_defaults(base_config):
    assert (base_config.max_connections, base_config.max_connections_per_ip) == (10000, 50)
