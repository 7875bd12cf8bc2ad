"""Build the whole mailguard service from options: the public entry point.

``build_service`` is what ``twistd mailguard`` calls (through
``mailguard.tap``) and what an application embedding mailguard imports::

    from mailguard.service import build_service
    from mailguard.policy.build import load
    config, tables = load("mailserver.cfg")
    service = build_service(config, {"smtp": "tcp:25"}, reactor, tables)
    service.setServiceParent(application)
"""

from __future__ import annotations

import os
import resource
from functools import partial
from typing import Any, Mapping

from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailguard.config.settings import EMBEDDED_NAME, Configuration
from mailguard.lifecycle import MailguardService
from mailguard.store.durable import DirSyncer, disk_runner, run_in_thread
from mailguard.store.maildir import MaildirStore
from mailguard.smtpd.factory import MailguardFactory, ServerContext
from mailguard.config.problems import ConfigError, errors
from mailguard.gateway.build import build_gateway
from mailguard.interfaces import IUserDirectory
from mailguard.policy.budgets import (EXEMPT_SESSIONS, ClientLimits, DescriptorPlan, descriptor_plan,
                                     descriptor_reserve)
from mailguard.policy.build import Tables, build_policies, build_tables, read_checked
from mailguard.config.values import parse_host_port
from mailguard.store.notices import Notifier, directory_router
from mailguard.store.queue import RelayQueue
from mailguard.store.relayclient import client_tls
from mailguard.smtpd.accept import GuardedEndpoint
from mailguard.smtpd.listener import KINDS, Listener, listener_values, parse, split_proxy
from mailguard.smtpd.proxy import ProxyHeaderFactory
from mailguard.store.control import ControlFactory, control_path
from mailguard.smtpd.seclog import SecurityLog
from mailguard.smtpd import tls as tls_mod

log = Logger()

DEFAULTS = {
    "smtp": "tcp:2525:interface=127.0.0.1",
    "smtps": None,
    "submission": None,
    "tls-cert": None,
    "tls-key": None,
    "spool": "./mailguard-data",
    "security-log": None,
    "relay-host": None,
    "metrics": None,
}


def fit_descriptors(config: Configuration) -> DescriptorPlan:
    """Holding thousands of connections needs file descriptors: raise the
    open-file limit to the hard limit; if it cannot hold
    ``SmtpMaxConnections`` sessions and the reserve, fewer connections,
    with one warning (L{mailguard.policy.budgets.descriptor_plan})."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    reserve = descriptor_reserve(config)
    plan = descriptor_plan(soft, hard, config.max_connections, reserve)
    if plan.soft > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft, hard))
        except (ValueError, OSError):
            plan = descriptor_plan(soft, soft, config.max_connections, reserve)
    if plan.clamped:
        log.warn("SmtpMaxConnections is {wanted} but the open-file limit (ulimit -n) is {limit}: at most "
                 "{allowed} connections (each may hold 2 descriptors; {reserve} are kept for the relay "
                 "IP group, the greeting-delay exceptions, the queue and the process)",
                 wanted=config.max_connections, limit=plan.soft, allowed=plan.max_connections, reserve=reserve)
    return plan


def build_context(config: Configuration, options: Mapping[str, Any], reactor,
                  tables: Tables | None = None, limits: ClientLimits | None = None) -> ServerContext:
    """Everything the sessions share, built from the configuration.

    @param limits: the per-address budgets (L{ClientLimits}) of the
        context this one replaces, so that a reload forgets no attacker;
        a new one when None."""
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    spool = os.path.abspath(opts["spool"])
    os.makedirs(spool, exist_ok=True)
    seclog_path = opts["security-log"] or os.path.join(spool, "security.log")
    tls = None
    if opts["tls-cert"]:
        tls = tls_mod.load_context(opts["tls-cert"], opts["tls-key"])
    if tables is None:
        tables, problems = build_tables(config)
        if tables is None:
            raise ConfigError(errors(problems))
    gateway = build_gateway(config, opts, reactor)  # None unless GatewayEnabled=1
    policies = build_policies(config, reactor, tables=tables, gateway=gateway)
    syncer = DirSyncer()  # one group commit for the Maildirs and the queue
    queue = build_queue(config, opts, reactor, spool, tables.directory, gateway, syncer=syncer)
    store = MaildirStore(spool, queue.run, relay=queue, notices=queue.notices, syncer=syncer)
    queue.deliver = store.inject  # DSNs are stored like received mail
    removed = store.open()
    if removed:
        log.info("removed {n} partial message(s) left by a crash", n=removed)
    removed = queue.open()
    if removed:
        log.info("relay queue: removed {n} file(s) left by a crash", n=removed)
    return ServerContext(
        config=config,
        clock=reactor,
        policies=policies,
        store=store,
        security_log=SecurityLog(seclog_path, reactor, config.security_log_max_bytes,
                                 generations=config.security_log_generations),
        tls=tls,
        queue=queue,
        dsn=True,
        run_blocking=run_in_thread(reactor),
        limits=limits,
    )


def build_queue(config: Configuration, opts: Mapping[str, Any], reactor, spool: str,
                directory: IUserDirectory, gateway=None, syncer: DirSyncer | None = None) -> RelayQueue:
    """The relay queue (mailguard.store.queue) for --relay-host and the Queue*
    settings; fsync work runs in its own thread pool."""
    relay_host = parse_host_port(opts["relay-host"]) if opts.get("relay-host") else None
    tls = None
    if relay_host is not None:
        tls = client_tls(relay_host[0], config.relay_tls_verify, config.relay_tls_ca_file)
    return RelayQueue(
        spool, reactor,
        run=disk_runner(reactor),
        relay_host=relay_host,
        hostname=config.hostname,
        lifetime=config.queue_lifetime,
        retry_min=config.queue_retry_min,
        retry_max=config.queue_retry_max,
        concurrency=config.queue_concurrency,
        notices=Notifier(config.hostname, reactor, directory_router(directory, gateway)),
        syncer=syncer,
        tls=tls,
        tls_required=config.relay_tls_verify,
        bind_address=config.relay_source_address,
    )


def make_listener(top: MailguardService, kind: str, desc: str, reactor) -> Listener:
    """The L{Listener} of C{kind} on the endpoint C{desc} (not yet
    listening); a bad description raises L{ListenError}."""
    # haproxy:ENDPOINT is handled here, not by Twisted's parser: the
    # session must start only once the PROXY header names the client
    # (mailguard.smtpd.proxy).
    inner, proxied = split_proxy(desc)
    factory = MailguardFactory(top.context, kind)
    top.factories.append(factory)  # a reload gives it the new context
    if kind == "smtps" and not inner.startswith("ssl:"):
        # Implicit TLS over any stream endpoint (tcp:, haproxy:tcp:...),
        # inside the plain-text PROXY header; the certificate of the
        # current generation (a reload loads it again).
        factory = TLSMemoryBIOFactory(tls_mod.CurrentContext(lambda: top.context.tls), False, factory)
    if proxied:
        factory = ProxyHeaderFactory(factory, reactor)
    # A port out of descriptors pauses accepting, aloud once a minute
    # (mailguard.smtpd.accept), instead of closing connections silently.
    return Listener(kind, desc, GuardedEndpoint(parse(reactor, kind, desc), reactor), factory)


def _control(top: MailguardService, reactor, queue: RelayQueue, spool: str) -> None:
    """The queue's control socket, SPOOL/control (mailguard.store.control)."""
    path = control_path(spool)
    endpoint = endpoints.UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
    # A Listener, so that twistd mailguard binds it before forking too.
    Listener("control", path, endpoint, ControlFactory(queue),
             label=f"--spool {os.path.abspath(spool)}: the queue's control socket").setServiceParent(top)


def _metrics(top: MailguardService, reactor, context: ServerContext, description: str) -> None:
    """``--metrics ENDPOINT``: /metrics for Prometheus (mailguard.metrics)."""
    from mailguard import metrics

    collector = metrics.MailguardCollector(lambda: top.context, context.queue,
                                           getattr(context.recipients, "gateway", None),
                                           metrics.on_reactor_of(reactor))
    site = metrics.metrics_site(reactor, metrics.registry_for(collector))
    # A Listener, so that twistd mailguard binds it before forking too.
    Listener("metrics", description, parse(reactor, "metrics", description), site).setServiceParent(top)
    top.metrics = collector


def build_service(config: Configuration, options: Mapping[str, Any], reactor,
                  tables: Tables | None = None) -> MailguardService:
    """The mailguard service: one L{Listener} per endpoint of each listener
    kind (C{options["smtp"]} and the others: one description or a list of
    them; C{top.listeners}), the relay queue, the gateway; it reloads and
    stops gracefully (L{mailguard.lifecycle}).

    @param tables: the IP groups, directory and passwords already built
        from C{config} (by L{mailguard.policy.build.load}); built here if
        not given (errors raise L{ConfigError}).
    @param options: also where a reload reads from: C{config} (else
        C{config.source}, unless that is the embedded example), C{users}."""
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    # The per-address budgets live as long as the process: every generation
    # a reload builds carries this one on (ServerContext.renewed).
    context = build_context(config, opts, reactor, tables, limits=ClientLimits(reactor))
    gateway = getattr(context.recipients, "gateway", None)
    path = opts.get("config") or (None if config.source == EMBEDDED_NAME else config.source)
    tls_files = (opts["tls-cert"], opts["tls-key"]) if opts["tls-cert"] else None
    top = MailguardService(context, reactor, gateway=gateway, tls_files=tls_files, run=run_in_thread(reactor),
                           read=partial(read_checked, path, opts.get("users"), relay_host=opts["relay-host"]))
    context.queue.setServiceParent(top)
    if gateway is not None:  # stopping says QUIT to the back-end
        gateway.setServiceParent(top)
    for kind in KINDS:
        for desc in listener_values(opts[kind]):
            make_listener(top, kind, desc, reactor).setServiceParent(top)
    _control(top, reactor, context.queue, opts["spool"])
    if opts["metrics"]:
        _metrics(top, reactor, context, opts["metrics"])
    if listener_values(opts["submission"]) and context.tls is None:
        if config.cram_md5_enabled:
            log.warn("--submission without --tls-cert: PLAIN and LOGIN are never offered "
                     "without TLS, so only CRAM-MD5 (plain-text passwords) can authenticate there")
        else:
            log.warn("--submission without --tls-cert: PLAIN and LOGIN are never offered "
                     "without TLS and CRAM-MD5 is off (SmtpAuthCramMd5Enabled=0), so no one "
                     "can authenticate there")
    plan = fit_descriptors(config)
    context.connections.descriptor_cap = plan.fits
    context.connections.max_total = plan.max_connections
    context.connections.exempt_reserve = EXEMPT_SESSIONS
    return top
