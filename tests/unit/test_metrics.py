"""mailguard.metrics: the collector reads the counters and live objects
at scrape time; the exposition is Prometheus' text format, from a
registry of mailguard's own."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mailguard.metrics import MailguardCollector, registry_for
from mailguard.smtpd.stats import Histogram
from mailguard.testing import connect
from tests.helpers_context import make_context
from tests.unit.store.world import World


def samples(collector) -> dict[tuple, float]:
    text = generate_latest(registry_for(collector)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, {"SmtpGreetingDelay": "25", "SmtpGreetingDelayExceptions": "NoDelay"})


def test_counters_and_gauges_of_the_sessions(ctx):
    collector = MailguardCollector(lambda: ctx)
    m = samples(collector)
    assert m[("mailguard_connections_total", ("outcome", "greeted"))] == 0
    assert m[("mailguard_connections_held",)] == 0 and m[("mailguard_sessions",)] == 0
    assert ("mailguard_queue_messages",) not in m  # no queue given
    held = connect(ctx, client_ip="127.0.0.3")
    s = connect(ctx, client_ip="127.0.0.4")  # NoDelay
    s.cmd("EHLO client.test")
    s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
    s.send("Subject: m\r\n\r\nbody\r\n.\r\n")
    m = samples(collector)
    assert m[("mailguard_connections_held",)] == 1
    assert m[("mailguard_sessions",)] == 1
    assert m[("mailguard_connections_total", ("outcome", "greeted"))] == 1
    assert m[("mailguard_messages_accepted_total",)] == 1
    assert m[("mailguard_accepted_bytes_total",)] == len(b"Subject: m\r\n\r\nbody\r\n")
    assert m[("mailguard_relay_denied_total",)] == 1
    assert m[("mailguard_refusals_total", ("code", "554"), ("command", "RCPT"), ("status", "5.7.1"))] == 1
    assert m[("mailguard_commit_seconds_count",)] == 1
    held.send("EHLO early\r\n")
    held.lose()
    s.lose()
    m = samples(collector)
    assert m[("mailguard_connections_held",)] == 0 and m[("mailguard_sessions",)] == 0
    assert m[("mailguard_connections_total", ("outcome", "early_talker"))] == 1


def test_the_queue_and_the_gateway(tmp_path, ctx):
    (tmp_path / "q").mkdir()
    w = World(tmp_path / "q")
    w.queue.startService()
    w.net.up = False
    w.accept()
    w.run()
    w.clock.advance(90)

    class Gateway:
        hits, misses, errors = 7, 3, 2

    m = samples(MailguardCollector(lambda: ctx, w.queue, Gateway()))
    assert m[("mailguard_queue_messages",)] == 1
    assert m[("mailguard_queue_oldest_age_seconds",)] == pytest.approx(90.0)
    assert m[("mailguard_relay_deliveries_total", ("result", "deferred"))] == 1
    assert m[("mailguard_gateway_cache_total", ("result", "hit"))] == 7
    assert m[("mailguard_gateway_cache_total", ("result", "miss"))] == 3
    assert m[("mailguard_gateway_backend_errors_total",)] == 2
    w.queue.stopService()


def test_a_registry_of_its_own(ctx):
    registry_for(MailguardCollector(lambda: ctx))
    assert "mailguard_sessions" not in generate_latest(REGISTRY).decode()


def test_the_histogram_buckets_are_cumulative():
    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 3.0):
        h.observe(v)
    assert h.buckets() == [("0.01", 2), ("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(3.565)


def test_reading_happens_on_the_reactor_thread(ctx):
    calls = []

    def on_reactor(f):
        calls.append(f)
        return f()

    samples(MailguardCollector(lambda: ctx, on_reactor=on_reactor))
    assert len(calls) == 1
