"""The gateway's connection pool (mailguard.gateway.pool) against the
in-memory back-end of ``mailguard.testing``: reuse, growth, hold-down,
deadlines, retries, idle close and shutdown."""

from __future__ import annotations

from mailguard.gateway.client import BackendUnavailable, Outcome
from mailguard.testing import result_of
from tests.unit.gateway.helpers import lookup, make_pool, once


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
    net.greeting = ""
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
