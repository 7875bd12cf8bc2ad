"""Gateway mode (mailguard.gateway.gateway): the VRFY client, the pool, the cache and
the verdicts, on a task.Clock and an in-memory back-end.

The back-end here is a scripted ESMTP server (L{FakeBackendServer}) joined
to the client with C{twisted.test.iosim}; L{FakeNetwork} is the endpoint
the pool connects through, and lets a test refuse, hang, drop connections
or change the back-end's answers.  The end-to-end tests with real twistd
processes are in ``test_gateway_e2e.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, endpoints
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.test import iosim

from mailguard.config import settings as config_mod
from mailguard.gateway import gateway as gw
from mailguard.policy import gatewayvrfy
from mailguard import replies
from mailguard.config import kerioxml
from mailguard.policy.addresses import parse_path
from mailguard.gateway.gateway import (
    BACKEND_NO_ANSWER,
    BackendPool,
    BackendUnavailable,
    Gateway,
    Outcome,
    TtlCache,
    VrfyClient,
)
from mailguard.policy.decide import RecipientPolicy, RecipientVerdict, Session
from mailguard.testing import FakeUserDirectory


def mbox(address: str):
    return parse_path(f"<{address}>", allow_null=False)


def result_of(d: defer.Deferred):
    """The result of a fired Deferred (a Failure stays a Failure)."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


# --- an in-memory back-end ------------------------------------------------------


class FakeBackendServer(LineReceiver):
    """A scripted ESMTP back-end: knows C{net.users}; VRFY answers as
    C{net.vrfy} says ("answer", "252" or "502")."""

    delimiter = b"\r\n"

    def __init__(self, net: "FakeNetwork") -> None:
        self.net = net
        self.in_mail = False

    def connectionMade(self) -> None:
        self.net.servers.append(self)
        if self.net.greeting:
            self.transport.write(self.net.greeting)

    def connectionLost(self, reason=None) -> None:
        if self in self.net.servers:
            self.net.servers.remove(self)

    def reply(self, text: str) -> None:
        self.transport.write(text.encode() + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        text = line.decode()
        self.net.commands.append(text)
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb in self.net.silent:
            return
        if verb in self.net.overrides:
            answer = self.net.overrides[verb]
            if callable(answer):
                answer = answer(arg)
            if answer is not None:
                self.transport.write(answer)
                return
        if verb == "EHLO":
            self.reply("250-backend.test\r\n250-VRFY\r\n250-SIZE 1000\r\n250 PIPELINING")
        elif verb == "HELO":
            self.reply("250 backend.test")
        elif verb == "VRFY":
            if self.net.vrfy == "252":
                self.reply("252 2.1.5 Verification not supported")
            elif self.net.vrfy == "502":
                self.reply("502 5.5.1 VRFY command is disabled")
            else:
                address = arg.strip().strip("<>").lower()
                if address in self.net.users:
                    self.reply(f"250 2.1.5 <{address}>")
                else:
                    self.reply("550 5.1.1 User unknown")
        elif verb == "MAIL":
            if self.in_mail:
                self.reply("503 5.5.1 Sender already specified")
            else:
                self.in_mail = True
                self.reply("250 2.1.0 Sender OK")
        elif verb == "RCPT":
            address = re.sub(r"(?i)^to:", "", arg).strip().strip("<>").lower()
            if address in self.net.users:
                self.reply("250 2.1.5 Recipient OK")
            else:
                self.reply("550 5.1.1 Recipient address rejected: user unknown")
        elif verb == "RSET":
            self.in_mail = False
            self.reply("250 2.0.0 Reset state")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.reply("500 5.5.2 Command not recognized")


class FakeNetwork:
    """An IStreamClientEndpoint to a L{FakeBackendServer}, and the knobs."""

    def __init__(self) -> None:
        self.users = {"john@example.com", "jane@example.com"}
        self.vrfy = "answer"
        self.greeting = b"220 backend.test ESMTP\r\n"
        self.overrides: dict = {}
        self.silent: set[str] = set()
        self.up = True
        self.hang = False
        self.attempts = 0
        self.commands: list[str] = []
        self.servers: list[FakeBackendServer] = []
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory):
        self.attempts += 1
        if not self.up:
            return defer.fail(ConnectionRefusedError("refused"))
        if self.hang:
            return defer.Deferred()  # cancelling it is the only way out
        client = factory.buildProtocol(None)
        server = FakeBackendServer(self)
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client), greet=False)
        self.pumps.append(pump)
        return defer.succeed(client)

    def flush(self) -> None:
        """Move bytes (and disconnections) until nothing moves."""
        while True:
            moved = False
            for pump in list(self.pumps):
                if pump.flush(advanceClock=False):
                    moved = True
            if not moved:
                break

    def drop_all(self) -> None:
        """The back-end goes away: every connection is cut."""
        for server in list(self.servers):
            server.transport.loseConnection()
        self.flush()

    def verbs(self, verb: str) -> list[str]:
        return [c for c in self.commands if c.upper().startswith(verb)]


def once(answer: bytes):
    """An override that answers once, then lets the back-end answer."""
    used = []

    def respond(arg):
        if used:
            return None
        used.append(arg)
        return answer

    return respond


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def net():
    return FakeNetwork()


def make_pool(net, clock, **kw) -> BackendPool:
    kw.setdefault("size", 2)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("idle_timeout", 30.0)
    kw.setdefault("helo", "gw.example.com")
    return BackendPool(net, clock, **kw)


def make_gateway(net, clock, **kw) -> Gateway:
    pool = make_pool(net, clock, **{k: kw.pop(k) for k in list(kw) if k in ("size", "timeout", "idle_timeout", "retry_interval")})
    return Gateway(["example.com", "example.net"], pool, clock, **kw)


def lookup(pool, net, address):
    d = pool.lookup(address)
    net.flush()
    return result_of(d)


def check(gateway, net, address):
    d = gateway.check(mbox(address))
    net.flush()
    return result_of(d)


# --- settings ---------------------------------------------------------------


def _load(variables: dict[str, str]):
    vars_xml = "".join(f'<variable name="{k}">{v}</variable>\n' for k, v in variables.items())
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<config>
<variable name="InternetHostname">gw.example.com</variable>
{vars_xml}<list name="Domain">
<listitem><variable name="Domain">example.com</variable><variable name="Aliases">example.net</variable></listitem>
</list>
</config>
""".encode()
    return config_mod.load_documents([kerioxml.parse_bytes(xml, "mailserver.cfg")], "mailserver.cfg")


def test_config_defaults():
    config, problems = _load({})
    assert not problems
    assert config.gateway_enabled is False
    assert config.gateway_domains == ()
    assert config.gateway_backend is None
    assert config.gateway_bind_address == ""
    assert (config.gateway_connections, config.gateway_timeout, config.gateway_idle_timeout) == (4, 10.0, 60.0)
    assert (config.gateway_positive_ttl, config.gateway_negative_ttl, config.gateway_cache_size) == (3600.0, 300.0, 100000)


def test_config_reads_gateway_settings():
    config, problems = _load({
        "GatewayEnabled": "1", "GatewayDomains": "example.com", "GatewayBackend": "10.0.0.5:25",
        "GatewayBindAddress": "127.0.0.2", "GatewayConnections": "8", "GatewayTimeout": "3",
        "GatewayIdleTimeout": "20", "GatewayCachePositiveTtl": "600", "GatewayCacheNegativeTtl": "60",
        "GatewayCacheSize": "5000",
    })
    assert not problems
    assert config.gateway_enabled is True
    assert config.gateway_domains == ("example.com",)
    assert config.gateway_backend == ("10.0.0.5", 25)
    assert config.gateway_bind_address == "127.0.0.2"
    assert (config.gateway_connections, config.gateway_timeout, config.gateway_idle_timeout) == (8, 3.0, 20.0)
    assert (config.gateway_positive_ttl, config.gateway_negative_ttl, config.gateway_cache_size) == (600.0, 60.0, 5000)


@pytest.mark.parametrize("name,value", [
    ("GatewayEnabled", "yes"), ("GatewayBackend", "nowhere"), ("GatewayBindAddress", "somehost"),
    ("GatewayConnections", "0"), ("GatewayTimeout", "0"), ("GatewayCacheSize", "-5"),
    ("GatewayDomains", "example.com,-bad-"), ("GatewayCacheNegativeTtl", "soon"),
])
def test_config_malformed_setting_names_file_line_and_name(name, value):
    config, problems = _load({name: value})
    assert config is None
    text = [str(p) for p in problems]
    assert len(text) == 1, text
    assert text[0].startswith("mailserver.cfg:4:"), text
    assert f'"{name}"' in text[0]


def test_settings_are_documented():
    text = (Path(__file__).resolve().parents[3] / "docs" / "gateway.md").read_text(encoding="utf-8")
    for name in config_mod.setting_names():
        if name.startswith("Gateway"):
            assert f"`{name}`" in text, name


def test_backend_no_answer_reply_codes_agree():
    assert (BACKEND_NO_ANSWER.code, BACKEND_NO_ANSWER.status) == (450, "4.4.1")
    assert (replies.RECIPIENT_TRY_LATER.code, replies.RECIPIENT_TRY_LATER.status) == (450, "4.4.3")


# --- the cache --------------------------------------------------------------


def test_cache_expires_entries_on_the_clock(clock):
    cache = TtlCache(clock, 10)
    cache.put("a", 1, 5)
    cache.put("b", 2, 10)
    clock.advance(4.9)
    assert (cache.get("a"), cache.get("b")) == (1, 2)
    clock.advance(0.1)
    assert cache.get("a") is None
    assert "a" not in cache and "b" in cache
    clock.advance(5)
    assert cache.get("b") is None
    assert len(cache) == 0


def test_cache_is_bounded_lru(clock):
    cache = TtlCache(clock, 3)
    for k in "abc":
        cache.put(k, k, 100)
    assert cache.get("a") == "a"  # a is now the most recently used
    cache.put("d", "d", 100)
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [cache.get(k) for k in "acd"] == ["a", "c", "d"]


def test_cache_zero_ttl_or_size_stores_nothing(clock):
    cache = TtlCache(clock, 3)
    cache.put("a", 1, 0)
    assert cache.get("a") is None
    none = TtlCache(clock, 0)
    none.put("a", 1, 100)
    assert len(none) == 0


_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from("abcdef"), st.integers(0, 20)),
    st.tuples(st.just("get"), st.sampled_from("abcdef"), st.just(0)),
    st.tuples(st.just("advance"), st.just(""), st.integers(0, 10)),
), max_size=60)


@given(ops=_OPS, size=st.integers(0, 4))
def test_cache_agrees_with_a_model(ops, size):
    """Against the obvious model: a list of (key, expiry) in recency order."""
    clock = Clock()
    cache = TtlCache(clock, size)
    model: list[tuple[str, float]] = []
    for op, key, n in ops:
        now = clock.seconds()
        if op == "advance":
            clock.advance(n)
            continue
        others = [(k, e) for k, e in model if k != key]
        entry = [(k, e) for k, e in model if k == key]
        if op == "put":
            cache.put(key, n, n)
            if n > 0 and size > 0:
                model = (others + [(key, now + n)])[-size:]
        else:
            got = cache.get(key)
            if entry and entry[0][1] > now:
                assert got is not None
                model = others + entry  # now the most recently used
            else:
                assert got is None
                model = others  # an expired entry is dropped when seen
        assert len(cache) == len(model)
        assert list(cache._entries) == [k for k, _ in model]


# --- the client protocol, bytes in and out ------------------------------------


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


# --- the pool -----------------------------------------------------------------


def test_pool_reuses_one_persistent_connection(net, clock):
    pool = make_pool(net, clock)
    for address, outcome in [("john@example.com", Outcome.KNOWN), ("x@example.com", Outcome.UNKNOWN),
                             ("jane@example.com", Outcome.KNOWN)]:
        assert lookup(pool, net, address).outcome is outcome
    assert (net.attempts, pool.connects, pool.connections) == (1, 1, 1)
    assert net.verbs("EHLO") == ["EHLO gw.example.com"]
    assert net.verbs("VRFY") == ["VRFY john@example.com", "VRFY x@example.com", "VRFY jane@example.com"]


def test_pool_opens_up_to_size_connections(net, clock):
    pool = make_pool(net, clock, size=2)
    ds = [pool.lookup(f"u{i}@example.com") for i in range(5)]
    assert net.attempts == 2
    net.flush()
    assert all(result_of(d).outcome is Outcome.UNKNOWN for d in ds)
    assert pool.connections == 2 and net.attempts == 2
    assert len(net.verbs("VRFY")) == 5


def test_pool_probe_path_through_the_pool(net, clock):
    net.vrfy = "252"
    pool = make_pool(net, clock)
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    assert lookup(pool, net, "nobody@example.com").outcome is Outcome.UNKNOWN
    assert lookup(pool, net, "jane@example.com").outcome is Outcome.KNOWN
    assert len(net.verbs("VRFY")) == 1  # after the 252, probes only
    assert len(net.verbs("RSET")) == 3
    assert len(net.verbs("MAIL")) == 3


def test_pool_backend_refusing_fails_fast_and_holds_down(net, clock):
    net.up = False
    pool = make_pool(net, clock, retry_interval=1.0)
    failure = lookup(pool, net, "john@example.com")
    assert failure.check(BackendUnavailable)
    assert "refused" in failure.getErrorMessage()
    assert net.attempts == 1
    # Within the hold-down: no new attempt, an immediate failure.
    assert lookup(pool, net, "jane@example.com").check(BackendUnavailable)
    assert net.attempts == 1
    net.up = True
    clock.advance(1.0)
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    assert net.attempts == 2
    # No lookup deadline is left behind: only the connection's idle timer.
    assert len(clock.getDelayedCalls()) == 1


def test_pool_connect_that_hangs_times_out(net, clock):
    net.hang = True
    pool = make_pool(net, clock, timeout=5.0)
    d = pool.lookup("john@example.com")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    failure = result_of(d)
    assert failure.check(BackendUnavailable)
    assert clock.getDelayedCalls() == []


def test_pool_greeting_that_never_comes_times_out(net, clock):
    net.greeting = b""
    pool = make_pool(net, clock, timeout=5.0)
    d = pool.lookup("john@example.com")
    net.flush()
    clock.advance(5)
    net.flush()
    assert result_of(d).check(BackendUnavailable)
    assert pool.connections == 0
    assert not net.servers  # the connection was given up


def test_pool_slow_answer_fails_at_the_deadline(net, clock):
    pool = make_pool(net, clock, timeout=5.0)
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    net.silent.add("VRFY")
    d = pool.lookup("jane@example.com")
    net.flush()
    clock.advance(5)
    net.flush()
    failure = result_of(d)
    assert failure.check(BackendUnavailable)
    assert "within 5 s" in failure.getErrorMessage()
    assert pool.connections == 0  # that connection cannot be trusted any more
    net.silent.clear()
    assert lookup(pool, net, "jane@example.com").outcome is Outcome.KNOWN


def test_pool_retries_once_when_the_connection_drops(net, clock):
    pool = make_pool(net, clock, size=1)
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    # The back-end hangs up (its idle timeout) just as the next question goes out.
    net.overrides["VRFY"] = once(b"421 4.4.2 Timeout, closing connection\r\n")
    d = pool.lookup("jane@example.com")
    net.flush()
    assert result_of(d).outcome is Outcome.KNOWN
    assert pool.connects == 2


def test_pool_does_not_retry_forever(net, clock):
    pool = make_pool(net, clock, size=1)
    net.overrides["VRFY"] = lambda arg: b"421 4.3.2 shutting down\r\n"
    failure = lookup(pool, net, "jane@example.com")
    assert failure.check(BackendUnavailable)
    assert net.attempts == 2


def test_pool_backend_killed_then_back(net, clock):
    pool = make_pool(net, clock, size=2, retry_interval=1.0)
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    net.up = False
    net.drop_all()
    assert pool.connections == 0
    assert lookup(pool, net, "jane@example.com").check(BackendUnavailable)
    net.up = True
    clock.advance(1)
    assert lookup(pool, net, "jane@example.com").outcome is Outcome.KNOWN


def test_pool_idle_connections_close_and_reopen(net, clock):
    pool = make_pool(net, clock, idle_timeout=30.0)
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    clock.advance(30)
    net.flush()
    assert net.commands[-1] == "QUIT"
    assert pool.connections == 0 and not net.servers
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    assert pool.connects == 2


def test_pool_close_says_quit_and_fails_waiting(net, clock):
    pool = make_pool(net, clock, size=1)
    assert lookup(pool, net, "john@example.com").outcome is Outcome.KNOWN
    net.silent.add("VRFY")
    busy = pool.lookup("jane@example.com")
    waiting = pool.lookup("x@example.com")
    closed = pool.close()
    assert result_of(waiting).check(BackendUnavailable)
    net.silent.clear()
    net.flush()
    assert "QUIT" in net.commands
    net.flush()
    assert result_of(closed) is not None
    busy.addErrback(lambda f: None)
    assert pool.lookup("a@example.com").called  # fails at once after close
    pool.lookup("a@example.com").addErrback(lambda f: None)


# --- the gateway ------------------------------------------------------------------


def test_gateway_handles_its_domains_only(net, clock):
    gateway = make_gateway(net, clock)
    assert gateway.handles("example.com") and gateway.handles("EXAMPLE.NET.")
    assert not gateway.handles("other.test")
    assert not gateway.handles("sub.example.com")


def test_gateway_verdicts(net, clock):
    gateway = make_gateway(net, clock)
    known = check(gateway, net, "John@example.com")
    assert isinstance(known, RecipientVerdict)
    assert known.reply == replies.RECIPIENT_OK
    assert (known.relay, known.relay_to, known.mailboxes) == (True, ("John@example.com",), ())
    assert known.address == "John@example.com"
    unknown = check(gateway, net, "nobody@example.com")
    assert unknown.reply == replies.UNKNOWN_USER and not unknown.relay
    net.overrides["VRFY"] = lambda arg: b"451 4.3.0 local error\r\n"
    later = check(gateway, net, "fresh@example.com")
    assert later.reply == replies.RECIPIENT_TRY_LATER
    assert (later.reply.code, later.reply.status) == (450, "4.4.3")


def test_gateway_unreachable_backend_is_450_441(net, clock):
    net.up = False
    gateway = make_gateway(net, clock)
    verdict = check(gateway, net, "john@example.com")
    assert verdict.reply == BACKEND_NO_ANSWER
    assert not verdict.accepted and not verdict.relay
    assert "refused" in verdict.reason


def test_gateway_caches_positive_and_negative_answers(net, clock):
    gateway = make_gateway(net, clock, positive_ttl=100, negative_ttl=10)
    check(gateway, net, "john@example.com")
    check(gateway, net, "nobody@example.com")
    assert len(net.verbs("VRFY")) == 2
    for _ in range(3):
        assert check(gateway, net, "john@example.com").accepted
        assert not check(gateway, net, "nobody@example.com").accepted
    assert len(net.verbs("VRFY")) == 2
    assert (gateway.hits, gateway.misses) == (6, 2)
    assert "cached" in check(gateway, net, "john@example.com").reason
    # The negative answer expires first: the back-end is asked again.
    clock.advance(10)
    net.users.add("nobody@example.com")
    assert check(gateway, net, "nobody@example.com").accepted
    assert check(gateway, net, "john@example.com").accepted
    assert len(net.verbs("VRFY")) == 3
    clock.advance(90)
    check(gateway, net, "john@example.com")
    assert len(net.verbs("VRFY")) == 4


def test_gateway_cache_hit_works_with_the_backend_down(net, clock):
    gateway = make_gateway(net, clock)
    check(gateway, net, "john@example.com")
    check(gateway, net, "nobody@example.com")
    net.up = False
    net.drop_all()
    assert check(gateway, net, "john@example.com").reply == replies.RECIPIENT_OK
    assert check(gateway, net, "nobody@example.com").reply == replies.UNKNOWN_USER
    assert check(gateway, net, "jane@example.com").reply == BACKEND_NO_ANSWER


def test_gateway_never_caches_temporary_failures(net, clock):
    gateway = make_gateway(net, clock)
    net.overrides["VRFY"] = lambda arg: b"451 4.3.0 local error\r\n"
    assert check(gateway, net, "john@example.com").reply == replies.RECIPIENT_TRY_LATER
    del net.overrides["VRFY"]
    assert check(gateway, net, "john@example.com").accepted
    net.up = False
    net.drop_all()
    assert check(gateway, net, "jane@example.com").reply == BACKEND_NO_ANSWER
    net.up = True
    clock.advance(5)
    assert check(gateway, net, "jane@example.com").accepted
    assert len(gateway.cache) == 2


def test_gateway_cache_is_bounded(net, clock):
    gateway = make_gateway(net, clock, cache_size=3)
    for i in range(10):
        check(gateway, net, f"u{i}@example.com")
    assert len(gateway.cache) == 3


def test_gateway_cache_can_be_off(net, clock):
    gateway = make_gateway(net, clock, cache_size=0)
    check(gateway, net, "john@example.com")
    check(gateway, net, "john@example.com")
    assert len(net.verbs("VRFY")) == 2


def test_gateway_concurrent_lookups_share_one_query(net, clock):
    gateway = make_gateway(net, clock)
    ds = [gateway.check(mbox("john@example.com")) for _ in range(5)]
    other = gateway.check(mbox("jane@example.com"))
    net.flush()
    verdicts = [result_of(d) for d in ds]
    assert all(v.accepted for v in verdicts)
    assert result_of(other).accepted
    assert net.verbs("VRFY").count("VRFY john@example.com") == 1
    assert gateway.shared == 4


def test_gateway_concurrent_lookups_share_a_failure_too(net, clock):
    net.hang = True
    gateway = make_gateway(net, clock, timeout=5.0)
    ds = [gateway.check(mbox("john@example.com")) for _ in range(3)]
    clock.advance(5)
    assert [result_of(d).reply for d in ds] == [BACKEND_NO_ANSWER] * 3
    assert net.attempts == 1


def test_gateway_check_never_fails(clock):
    class BrokenPool:
        def lookup(self, address):
            return defer.fail(RuntimeError("bug"))

    gateway = Gateway(["example.com"], BrokenPool(), clock)
    verdict = result_of(gateway.check(mbox("john@example.com")))
    assert verdict.reply == BACKEND_NO_ANSWER


def test_gateway_service_stop_closes_the_pool(net, clock):
    gateway = make_gateway(net, clock)
    gateway.startService()
    check(gateway, net, "john@example.com")
    d = gateway.stopService()
    net.flush()
    result_of(d)
    assert net.commands[-1] == "QUIT"
    assert not net.servers


# --- in RecipientPolicy ---------------------------------------------------------


class _Trust:
    def __init__(self, trusted=False):
        self.trusted = trusted

    def is_trusted(self, session):
        return self.trusted

    def why_trusted(self, session):
        return "test" if self.trusted else None


SESSION = Session(client_ip="192.0.2.9", client_port=4321, listener="smtp")


def policy_check(policy, net, address):
    d = policy.check_recipient(SESSION, mbox(address))
    net.flush()
    return result_of(d)


def test_policy_asks_the_gateway_and_bypasses_the_directory(net, clock):
    directory = FakeUserDirectory({"local@example.org": "known"}, domains=["example.com", "example.org"])
    gateway = make_gateway(net, clock)
    policy = RecipientPolicy(directory, _Trust(False), gateway=gateway)
    # The directory has no john@example.com: the back-end decides.
    assert policy_check(policy, net, "john@example.com").accepted
    assert policy_check(policy, net, "nobody@example.com").reply == replies.UNKNOWN_USER
    # A domain the gateway does not handle stays local.
    local = policy_check(policy, net, "local@example.org")
    assert local.accepted and local.mailboxes == ("local@example.org",) and not local.relay
    # Relay control is unchanged.
    assert policy_check(policy, net, "someone@other.test").reply == replies.RELAY_DENIED
    assert len(net.verbs("VRFY")) == 2


@pytest.mark.parametrize("address", ['"john@other.test"@example.com', "john%other.test@example.com",
                                     "other.test!john@example.com"])
def test_policy_hidden_destinations_never_reach_the_backend(net, clock, address):
    policy = RecipientPolicy(FakeUserDirectory({}, domains=["example.com"]), _Trust(True),
                             gateway=make_gateway(net, clock))
    assert policy_check(policy, net, address).reply == replies.UNKNOWN_USER
    assert net.attempts == 0


def test_policy_backend_down_is_try_later_not_accept(net, clock):
    net.up = False
    policy = RecipientPolicy(FakeUserDirectory({}, domains=["example.com"]), _Trust(False),
                             gateway=make_gateway(net, clock))
    verdict = policy_check(policy, net, "john@example.com")
    assert (verdict.reply.code, verdict.accepted) == (450, False)


# --- building it from the configuration -----------------------------------------------


def _Reactor():
    """Enough of a reactor for building endpoints (never connected here)."""
    return MemoryReactorClock()


def test_build_gateway_disabled_is_none():
    config, _ = _load({})
    assert gw.build_gateway(config, {}, _Reactor()) is None


def test_build_gateway_needs_a_relay_host():
    for variables in ({"GatewayEnabled": "1"}, {"GatewayEnabled": "1", "GatewayBackend": "127.0.0.1:25"}):
        config, _ = _load(variables)
        with pytest.raises(ValueError, match="no --relay-host"):
            gw.build_gateway(config, {}, _Reactor())


def test_build_gateway_from_relay_host_and_domain_table():
    config, _ = _load({"GatewayEnabled": "1", "GatewayBindAddress": "127.0.0.2",
                       "GatewayConnections": "3", "GatewayCacheSize": "7"})
    gateway = gw.build_gateway(config, {"relay-host": "127.0.0.1:2526"}, _Reactor())
    assert gateway.domains == {"example.com", "example.net"}
    assert gateway.pool.size == 3 and gateway.cache.size == 7
    assert gateway.pool.helo == "gw.example.com"
    ep = gateway.pool.endpoint
    assert isinstance(ep, endpoints.TCP4ClientEndpoint)
    assert (ep._host, ep._port, ep._bindAddress) == ("127.0.0.1", 2526, ("127.0.0.2", 0))


def test_build_gateway_explicit_backend_and_domains():
    config, _ = _load({"GatewayEnabled": "1", "GatewayBackend": "[::1]:25", "GatewayDomains": "example.com"})
    gateway = gw.build_gateway(config, {"relay-host": "10.0.0.1:25"}, _Reactor())
    assert gateway.domains == {"example.com"}
    assert isinstance(gateway.pool.endpoint, endpoints.TCP6ClientEndpoint)
    config, _ = _load({"GatewayEnabled": "1", "GatewayBackend": "backend.example.com:25"})
    gateway = gw.build_gateway(config, {"relay-host": "10.0.0.1:25"}, _Reactor())
    assert isinstance(gateway.pool.endpoint, endpoints.HostnameEndpoint)


# --- VRFY on the gateway ------------------------------------------------------------


def vrfy_policy(net, clock, *, trusted=True, enabled=True):
    from mailguard.policy.decide import VrfyPolicy

    directory = FakeUserDirectory({"local@example.org": "known"}, domains=["example.com", "example.org"])
    inner = VrfyPolicy(enabled, directory, _Trust(trusted))
    return gatewayvrfy.gateway_vrfy(inner, make_gateway(net, clock))


def vrfy(policy, net, argument):
    d = policy.answer(SESSION, argument)
    net.flush()
    return result_of(d)


def test_gateway_vrfy_policy_provides_the_interface(net, clock):
    from zope.interface.verify import verifyObject

    from mailguard.interfaces import IVrfyPolicy

    policy = vrfy_policy(net, clock)
    assert isinstance(policy, gatewayvrfy.GatewayVrfyPolicy)
    assert verifyObject(IVrfyPolicy, policy)
    assert gatewayvrfy.gateway_vrfy("inner", None) == "inner"


def test_gateway_vrfy_asks_the_backend_for_trusted_clients(net, clock):
    policy = vrfy_policy(net, clock)
    assert vrfy(policy, net, "john@example.com") == replies.VRFY_KNOWN.with_text("<john@example.com>")
    assert vrfy(policy, net, "<nobody@example.com>") == replies.VRFY_UNKNOWN
    # Other domains: the directory, as always.
    assert vrfy(policy, net, "local@example.org").code == 250
    assert vrfy(policy, net, "other@example.org") == replies.VRFY_UNKNOWN
    assert len(net.verbs("VRFY")) == 2
    # Through the same cache as RCPT.
    assert vrfy(policy, net, "john@example.com").code == 250
    assert len(net.verbs("VRFY")) == 2


def test_gateway_vrfy_backend_down_is_try_later(net, clock):
    net.up = False
    policy = vrfy_policy(net, clock)
    assert vrfy(policy, net, "john@example.com") == BACKEND_NO_ANSWER


def test_gateway_vrfy_untrusted_disabled_malformed_bare_hidden(net, clock):
    assert vrfy(vrfy_policy(net, clock, trusted=False), net, "john@example.com") == replies.VRFY_WITHHELD
    assert vrfy(vrfy_policy(net, clock, enabled=False), net, "john@example.com") == replies.VRFY_DISABLED
    policy = vrfy_policy(net, clock)
    assert vrfy(policy, net, "") == replies.SYNTAX_ERROR
    assert vrfy(policy, net, "john") == replies.VRFY_WITHHELD  # cannot tell for a bare user
    assert vrfy(policy, net, '"john@other.test"@example.com') == replies.VRFY_UNKNOWN
    assert vrfy(policy, net, "john@[192.0.2.1]") == replies.VRFY_UNKNOWN
    assert net.attempts == 0


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
