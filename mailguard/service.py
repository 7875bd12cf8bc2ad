"""Build the whole mailguard service from options: the public entry point.

``build_service`` is what ``twistd mailguard`` calls (through
``mailguard.tap``) and what an application embedding mailguard imports::

    from mailguard.service import build_service
    from mailguard.config import load
    service = build_service(load("mailserver.cfg"), {"smtp": "tcp:25"}, reactor)
    service.setServiceParent(application)
"""

from __future__ import annotations

import os
import resource
from typing import Any, Mapping

from twisted.application import internet, service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailguard.config import Configuration
from mailguard.delivery import MaildirStore, run_in_thread
from mailguard.factory import MailguardFactory, ServerContext
from mailguard.greeting import GreetingPolicy
from mailguard.passwords import PasswordChecker
from mailguard.policy import RecipientPolicy, TrustPolicy, VrfyPolicy
from mailguard.seclog import SecurityLog
from mailguard import tls as tls_mod

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
}


def raise_fd_limit() -> int:
    """Holding thousands of delayed connections needs file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def build_context(config: Configuration, options: Mapping[str, Any], reactor) -> ServerContext:
    """Everything the sessions share, built from the configuration."""
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    spool = os.path.abspath(opts["spool"])
    os.makedirs(spool, exist_ok=True)
    seclog_path = opts["security-log"] or os.path.join(spool, "security.log")
    tls = None
    if opts["tls-cert"]:
        tls = tls_mod.load_context(opts["tls-cert"], opts["tls-key"])
    trust = TrustPolicy(config.ip_groups, config.relay_ip_group_enabled,
                        config.relay_ip_group, config.relay_auth_enabled)
    store = MaildirStore(spool, run_in_thread(reactor))
    removed = store.recover()
    if removed:
        log.info("removed {n} partial message(s) left by a crash", n=removed)
    return ServerContext(
        config=config,
        clock=reactor,
        greeting=GreetingPolicy.from_config(config, reactor),
        recipients=RecipientPolicy(config.directory, trust),
        vrfy=VrfyPolicy(config.vrfy_enabled, config.directory, trust),
        trust=trust,
        store=store,
        security_log=SecurityLog(seclog_path, reactor, config.security_log_max_bytes),
        passwords=PasswordChecker(config.users, config.directory),
        tls=tls,
        run_blocking=run_in_thread(reactor),
    )


def build_service(config: Configuration, options: Mapping[str, Any], reactor) -> service.MultiService:
    """The mailguard MultiService: one stream server per configured listener."""
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    context = build_context(config, opts, reactor)
    top = service.MultiService()
    top.context = context  # for embedding applications and tests
    for listener in ("smtp", "smtps", "submission"):
        desc = opts[listener]
        if not desc:
            continue
        factory = MailguardFactory(context, listener)
        if listener == "smtps" and not desc.startswith("ssl:"):
            # Implicit TLS over any stream endpoint (tcp:, haproxy:tcp:...).
            factory = TLSMemoryBIOFactory(context.tls, False, factory)
        endpoint = endpoints.serverFromString(reactor, desc)
        svc = internet.StreamServerEndpointService(endpoint, factory)
        svc._raiseSynchronously = True
        svc.setName(listener)
        svc.setServiceParent(top)
    raise_fd_limit()
    return top
