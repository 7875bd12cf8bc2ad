"""Prometheus metrics: ``--metrics ENDPOINT`` serves ``/metrics`` in the
Prometheus text format, through Twisted's web server.

Nothing is counted here.  The hot path only increments plain integers
(L{mailguard.smtpd.stats.Stats}, the queue's C{deliveries}, the gateway's
C{hits}/C{misses}/C{errors}); L{MailguardCollector} reads them, and
computes the gauges from live objects (connections held now, sessions now,
the queue's size and its oldest entry), only when Prometheus scrapes.
It uses a registry of its own, never ``prometheus_client``'s global one
(which would add the process and platform collectors of whatever embeds
mailguard, and share state between tests).

The exposition is ``prometheus_client``'s WSGI application in a
``twisted.web`` L{WSGIResource}: what
``prometheus_client.twisted.MetricsResource`` builds, but on the reactor
mailguard was given rather than the global one that module imports.  A
WSGI application runs in the reactor's thread pool, so the collector
hands its reading of live objects to the reactor thread
(C{blockingCallFromThread}) and never iterates a dict the reactor is
changing.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import make_wsgi_app
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

__all__ = ["MailguardCollector", "metrics_site", "registry_for"]


class MailguardCollector:
    """Every mailguard metric, read at scrape time.

    @param current: the current L{mailguard.smtpd.context.ServerContext}
        (a reload makes a new one; its counters carry on).
    @param queue: the relay queue, or None.
    @param gateway: the L{mailguard.gateway.gateway.Gateway}, or None.
    @param on_reactor: C{f -> f()} run on the reactor thread (the WSGI
        application runs in a pool thread); direct by default (tests).
    """

    def __init__(self, current: Callable[[], object], queue=None, gateway=None,
                 on_reactor: Callable[[Callable], object] = lambda f: f()) -> None:
        self.current = current
        self.queue = queue
        self.gateway = gateway
        self.on_reactor = on_reactor

    def collect(self):
        return self.on_reactor(self._families)

    def _families(self) -> list:
        ctx = self.current()
        stats = ctx.stats
        out = []

        def counter(name, doc, values, label=None):
            family = CounterMetricFamily(name, doc, labels=[label] if label else None)
            if label:
                for key, value in values.items():
                    family.add_metric([key], value)
            else:
                family.add_metric([], values)
            out.append(family)

        def gauge(name, doc, value):
            out.append(GaugeMetricFamily(name, doc, value=value))

        counter("mailguard_connections", "Connections by outcome: greeted (a session began), early_talker, "
                "gave_up (closed while held in the greeting delay), limit (refused by a connection limit).",
                stats.connections, "outcome")
        held = sum(1 for p in list(ctx.connections.sessions) if getattr(p, "_hold", None) is not None)
        gauge("mailguard_connections_held", "Connections held in the greeting delay now.", held)
        gauge("mailguard_sessions", "SMTP sessions open now (greeted, not closed).",
              sum(1 for p in list(ctx.connections.sessions) if getattr(p, "smtp", None) is not None
                  and not p.closed))
        refusals = CounterMetricFamily("mailguard_refusals", "Every 4xx/5xx reply sent, by the command "
                                       "it answered (CONNECT before the greeting, timeout), code and "
                                       "enhanced code.", labels=["command", "code", "status"])
        for (command, code, status), n in sorted(stats.refusals.items()):
            refusals.add_metric([command, str(code), status], n)
        out.append(refusals)
        counter("mailguard_messages_accepted", "Messages accepted (250 after the final dot).",
                stats.messages_accepted)
        counter("mailguard_messages_refused", "Messages refused at DATA or at the final dot, by reason.",
                dict(stats.messages_refused), "reason")
        counter("mailguard_accepted_bytes", "Bytes of accepted messages (as received, unstuffed).",
                stats.bytes_accepted)
        counter("mailguard_auth", "AUTH attempts by result: success, failure, error.", stats.auth, "result")
        counter("mailguard_relay_denied", "RCPTs refused 554 5.7.1: relaying denied.", stats.relay_denied)
        hist = stats.commit_seconds
        family = HistogramMetricFamily("mailguard_commit_seconds", "Seconds from the final dot to the 250 "
                                       "(the message fsynced).")
        family.add_metric([], hist.buckets(), hist.sum)
        out.append(family)
        counter("mailguard_security_log_dropped", "Security log lines dropped (a flood while the disk "
                "was slow); each drop is also logged.", getattr(ctx.security_log, "dropped", 0))
        queue = self.queue
        if queue is not None:
            entries = list(queue.entries.values())
            gauge("mailguard_queue_messages", "Messages in the relay queue.", len(entries))
            gauge("mailguard_queue_held_messages", "Messages on hold in the relay queue.",
                  sum(1 for e in entries if e.held))
            oldest = min((e.arrival for e in entries), default=None)
            gauge("mailguard_queue_oldest_age_seconds", "Age of the oldest queued message (0: none).",
                  max(queue.clock.seconds() - oldest, 0.0) if oldest is not None else 0.0)
            counter("mailguard_relay_deliveries", "Relay attempts per recipient, by result: sent, "
                    "deferred, bounced.", queue.deliveries, "result")
        gateway = self.gateway
        if gateway is not None:
            counter("mailguard_gateway_cache", "Gateway lookups by cache result: hit, miss.",
                    {"hit": gateway.hits, "miss": gateway.misses}, "result")
            counter("mailguard_gateway_backend_errors", "Gateway lookups the back-end did not answer.",
                    gateway.errors)
        return out


def registry_for(collector: MailguardCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def metrics_site(reactor, registry: CollectorRegistry) -> Site:
    """``/metrics`` (and nothing else) on C{reactor}."""
    root = Resource()
    root.putChild(b"metrics", WSGIResource(reactor, reactor.getThreadPool(), make_wsgi_app(registry)))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # no access log line per scrape
    return site


def on_reactor_of(reactor) -> Callable[[Callable], object]:
    """Run C{f} on C{reactor}'s thread, from a pool thread."""
    from twisted.internet.threads import blockingCallFromThread
    from twisted.python.threadable import isInIOThread

    def call(f):
        return f() if isInIOThread() else blockingCallFromThread(reactor, f)

    return call
