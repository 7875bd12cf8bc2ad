"""The per-address budgets, on values and a Clock: what each allows, when
it locks out, what it forgets, and that exempt clients are never refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from mailguard import replies
from mailguard.config.settings import Configuration
from mailguard.policy.budgets import (
    ClientLimits,
    DataDeadline,
    DescriptorPlan,
    FailureBudget,
    RateLimit,
    client_key,
    descriptor_plan,
    descriptor_reserve,
)
from mailguard.policy.session import Session


def at(clock: Clock, t: float) -> Clock:
    clock.advance(t - clock.seconds())
    return clock


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2::7", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::7", "2001:db8:1:3::/64"),
    ("::1", "::/64"),
    ("not an address:", "not an address:"),
    ("", ""),
])
def test_client_key_is_the_address_or_its_ipv6_64(ip, key):
    assert client_key(ip) == key


# --- FailureBudget ------------------------------------------------------------------


@pytest.mark.parametrize("times, limit, window, locks_at", [
    ([0, 1, 2], 3, 10, 2),  # the third failure within 10 s locks
    ([0, 5, 11], 3, 10, None),  # the first has left the window when the third comes
    ([0, 5, 9.9], 3, 10, 9.9),
    ([0, 10, 20, 30], 2, 10, None),  # exactly a window apart: never two in one window
    ([0, 1, 2, 3], 0, 10, None),  # 0: no budget
    ([0, 1, 2, 3], 2, 0, None),  # no window: no budget
    ([0], 1, 10, 0),
])
def test_failure_budget_locks_at_the_limit_within_the_window(times, limit, window, locks_at):
    clock = Clock()
    budget = FailureBudget(clock)
    locked = []
    for t in times:
        at(clock, t)
        if budget.spend("k", limit, window):
            locked.append(t)
    assert locked == ([] if locks_at is None else [locks_at])


def test_a_lock_out_lasts_one_window_then_the_count_starts_afresh():
    clock = Clock()
    budget = FailureBudget(clock)
    assert [budget.spend("k", 2, 60) for _ in range(2)] == [False, True]
    assert budget.locked("k") == 60 and budget.count("k", 60) == 0
    at(clock, 59.5)
    assert budget.locked("k") == 0.5
    at(clock, 60)
    assert budget.locked("k") == 0
    assert budget.spend("k", 2, 60) is False and budget.count("k", 60) == 1


def test_failure_budgets_are_per_key_and_bounded():
    clock = Clock()
    budget = FailureBudget(clock, max_keys=3)
    for key in "abcd":
        budget.spend(key, 5, 60)
    assert len(budget) == 3 and budget.count("a", 60) == 0  # the oldest went first
    budget.spend("b", 5, 60)  # b is now the most recently used
    budget.spend("e", 5, 60)
    assert budget.count("b", 60) == 2 and budget.count("c", 60) == 0


def test_forgive_forgets_a_key():
    budget = FailureBudget(Clock())
    assert budget.spend("k", 1, 60) is True
    budget.forgive("k")
    assert budget.locked("k") == 0 and len(budget) == 0


# --- RateLimit -----------------------------------------------------------------------


def test_rate_limit_allows_the_limit_per_window():
    clock = Clock()
    rate = RateLimit(clock)
    at(clock, 600)  # the start of a window
    assert [rate.hit("k", 5) for _ in range(6)] == [False] * 5 + [True]
    assert rate.hit("other", 5) is False


def test_rate_limit_slides_the_previous_window_out():
    clock = Clock()
    rate = RateLimit(clock)
    at(clock, 600)
    for _ in range(10):
        rate.hit("k", 10)  # 10 in [600, 660): the last one is at the limit, not over
    at(clock, 660)  # the next window: the previous one still weighs fully
    assert rate.hit("k", 10) is True
    at(clock, 690)  # half of it has slid out: 11 * 0.5 + 2 = 7.5 <= 10
    assert rate.hit("k", 10) is False
    at(clock, 800)  # two windows later: nothing left
    assert [rate.hit("k", 2) for _ in range(3)] == [False, False, True]


def test_refused_hits_count_so_a_hammering_client_stays_refused():
    clock = Clock()
    rate = RateLimit(clock)
    at(clock, 600)
    for _ in range(100):
        rate.hit("k", 10)  # 90 of them refused
    at(clock, 670)  # 100 * 5/6 + 1: refused (had only the 10 allowed counted, 9.3 would pass)
    assert rate.hit("k", 10) is True


def test_rate_limit_zero_counts_nothing():
    rate = RateLimit(Clock())
    assert not any(rate.hit("k", 0) for _ in range(1000)) and len(rate) == 0


# --- ClientLimits: the decisions ------------------------------------------------------

CONFIG = Configuration(max_errors_per_ip=3, max_auth_failures_per_ip=2, per_ip_window=600.0,
                       connection_rate_limit=2, message_rate_limit=1)
ATTACKER = Session("192.0.2.66", 4000, "smtp")
NEIGHBOUR = Session("2001:db8:5:6::1", 4000, "smtp")
SAME_64 = Session("2001:db8:5:6::99", 4000, "smtp")


def limits() -> ClientLimits:
    return ClientLimits(Clock())


def test_connections_past_the_rate_are_refused_and_logged():
    lim = limits()
    assert lim.at_connect(ATTACKER, CONFIG, lambda s: False) is None
    assert lim.at_connect(ATTACKER, CONFIG, lambda s: False) is None
    refused = lim.at_connect(ATTACKER, CONFIG, lambda s: False)
    assert refused.reply is replies.CONNECTION_RATE_LIMIT and refused.event == "connection-rate"
    assert refused.fields == {"limit": "2/min"}


def test_exempt_clients_are_never_refused_and_asked_only_when_a_limit_would_refuse():
    lim = limits()
    asked = []

    def exempt(session):
        asked.append(session)
        return True

    for _ in range(10):
        assert lim.at_connect(ATTACKER, CONFIG, exempt) is None
        assert lim.at_mail(ATTACKER, CONFIG, exempt) is None
        assert lim.error(ATTACKER, CONFIG, exempt) is None
        assert lim.auth_failed(ATTACKER, CONFIG, exempt) is None
    assert lim.at_auth(ATTACKER, exempt) is None
    assert 0 < len(asked) < 40
    assert lim.auth.locked(client_key(ATTACKER.client_ip)) == 0  # an exempt lock-out is forgiven


def test_messages_past_the_rate_are_refused():
    lim = limits()
    assert lim.at_mail(ATTACKER, CONFIG, lambda s: False) is None
    refused = lim.at_mail(ATTACKER, CONFIG, lambda s: False)
    assert refused.reply is replies.MESSAGE_RATE_LIMIT and refused.event == "message-rate"


def test_auth_failures_lock_the_address_out_across_sessions():
    lim = limits()
    assert lim.at_auth(ATTACKER, lambda s: False) is None
    assert lim.auth_failed(ATTACKER, CONFIG, lambda s: False) is None
    lockout = lim.auth_failed(ATTACKER, CONFIG, lambda s: False)
    assert lockout.event == "auth-lockout" and lockout.fields == {"failures": 2, "window": "600", "locked": "600"}
    refused = lim.at_auth(ATTACKER, lambda s: False)
    assert refused.reply is replies.AUTH_LOCKED_OUT and refused.reply.code == 454
    lim.clock.advance(600)
    assert lim.at_auth(ATTACKER, lambda s: False) is None


def test_an_ipv6_64_is_one_client():
    lim = limits()
    lim.auth_failed(NEIGHBOUR, CONFIG, lambda s: False)
    assert lim.auth_failed(SAME_64, CONFIG, lambda s: False) is not None
    assert lim.at_auth(NEIGHBOUR, lambda s: False) is not None


def test_errors_lock_the_address_out_and_new_connections_are_refused():
    lim = limits()
    assert [lim.error(ATTACKER, CONFIG, lambda s: False) for _ in range(2)] == [None, None]
    closing = lim.error(ATTACKER, CONFIG, lambda s: False)
    assert closing.reply is replies.TOO_MANY_ERRORS_FROM_IP and closing.event == "error-limit"
    assert closing.reply.code == 421 and closing.reply.status == "4.7.0"
    lim.clock.advance(100)
    refused = lim.at_connect(ATTACKER, CONFIG, lambda s: False)
    assert refused.reply is replies.TOO_MANY_ERRORS_FROM_IP and refused.fields == {"locked": 500}
    lim.clock.advance(500)
    assert lim.at_connect(ATTACKER, CONFIG, lambda s: False) is None


def test_the_limits_come_with_each_question_so_a_reload_keeps_the_counts():
    lim = limits()
    lim.auth_failed(ATTACKER, CONFIG, lambda s: False)
    stricter = Configuration(max_auth_failures_per_ip=2, per_ip_window=600.0)
    assert lim.auth_failed(ATTACKER, stricter, lambda s: False) is not None
    assert lim.auth_failures(ATTACKER, CONFIG) == 0  # cleared by the lock-out


def test_the_defaults_limit_nothing_a_real_mta_does():
    """A real MTA: a few mistakes, a few connections a minute, never a
    lock-out (rate limits off by default, as in Postfix)."""
    lim, config = limits(), Configuration()
    for _ in range(30):
        assert lim.at_connect(ATTACKER, config, lambda s: False) is None
        assert lim.at_mail(ATTACKER, config, lambda s: False) is None
    for _ in range(99):
        assert lim.error(ATTACKER, config, lambda s: False) is None
    for _ in range(19):
        assert lim.auth_failed(ATTACKER, config, lambda s: False) is None


# --- DataDeadline --------------------------------------------------------------------


def run_sender(deadline: DataDeadline, rate: float, octets_per_read: int, horizon: float) -> float | None:
    """When a sender of C{rate} octets/s meets the deadline, or None."""
    now, expires = 0.0, deadline.start(0.0)
    step = octets_per_read / rate
    while now < horizon:
        now += step
        if now > expires:
            return expires
        expires = deadline.received(octets_per_read, now)
    return None


@pytest.mark.parametrize("rate, per_read, cut_before", [
    (1, 1, 301),  # a byte a second: about the timeout
    (100, 10, 400),  # 100 B/s: slower than 500, cut within a few hundred seconds
])
def test_a_slow_sender_meets_the_deadline(rate, per_read, cut_before):
    cut = run_sender(DataDeadline(300, 500), rate, per_read, 10_000)
    assert cut is not None and cut < cut_before


@pytest.mark.parametrize("rate", [600, 10_000, 10_000_000])
def test_a_sender_faster_than_the_minimum_never_meets_it(rate):
    assert run_sender(DataDeadline(300, 500), rate, max(100, rate // 10), 5000) is None


def test_the_deadline_never_runs_more_than_the_timeout_ahead():
    deadline = DataDeadline(300, 500)
    deadline.start(0)
    assert deadline.received(10 ** 9, 1) == 301


def test_with_no_minimum_rate_each_read_restarts_the_timer():
    deadline = DataDeadline(300, 0)
    deadline.start(0)
    assert deadline.received(1, 250) == 550
    assert run_sender(deadline, 1, 1, 5000) is None


# --- descriptor_plan ------------------------------------------------------------------


@pytest.mark.parametrize("soft, hard, wanted, reserve, plan", [
    (1024, 1 << 20, 10000, 300, DescriptorPlan(1 << 20, 10000, False, 524138)),  # raised to the hard limit
    (1024, 4096, 10000, 300, DescriptorPlan(4096, 1898, True, 1898)),  # raised, and still clamped
    (400, 400, 10000, 288, DescriptorPlan(400, 56, True, 56)),  # cannot be raised: clamped
    (65536, 65536, 100, 300, DescriptorPlan(65536, 100, False, 32618)),  # already enough: left alone
    (1024, 1024, 0, 300, DescriptorPlan(1024, 362, False, 362)),  # 0 (no limit): what fits
    (100, 100, 10000, 300, DescriptorPlan(100, 1, True, 1)),  # never 0 (that would be "no limit")
])
def test_descriptor_plan(soft, hard, wanted, reserve, plan):
    assert descriptor_plan(soft, hard, wanted, reserve) == plan


def test_the_reserve_grows_with_the_queue_and_the_gateway():
    small = descriptor_reserve(SimpleNamespace(queue_concurrency=1, gateway_connections=1))
    big = descriptor_reserve(SimpleNamespace(queue_concurrency=100, gateway_connections=50))
    assert big - small == 2 * 99 + 49
    assert descriptor_reserve(Configuration()) == 288
