"""Build gateway mode from the configuration: the endpoint to the
back-end, the domains it holds, the pool and the L{Gateway}.

The only place that turns settings into gateway objects, so the objects
themselves take plain values and can be built in tests without a
configuration or a reactor.
"""

from __future__ import annotations

import ipaddress

from twisted.logger import Logger

from mailguard.config.values import parse_host_port
from mailguard.gateway.gateway import Gateway
from mailguard.gateway.pool import BackendPool

__all__ = ["backend_endpoint", "build_gateway"]

log = Logger()


def backend_endpoint(reactor, host: str, port: int, *, timeout: float, bind_address: str = ""):
    """A client endpoint to the back-end, from C{bind_address} if given."""
    from twisted.internet import endpoints

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    bind = (bind_address, 0) if bind_address else None
    if ip is None:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind)
    cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, host, port, timeout=timeout, bindAddress=bind)


def build_gateway(config, options, reactor) -> Gateway | None:
    """The L{Gateway} the configuration asks for, or None (GatewayEnabled=0).

    @param options: the service options.  ``relay-host`` is required: it is
        where the relay queue forwards the mail the gateway accepts (without
        it, accepted mail would wait in the queue and bounce: accept-then-
        bounce, which gateway mode exists to prevent).  It is also the
        back-end that is asked, unless GatewayBackend names another.
    @raise ValueError: gateway mode without --relay-host or without domains.
    """
    if not config.gateway_enabled:
        return None
    relay_host = options.get("relay-host")
    if not relay_host:
        raise ValueError("GatewayEnabled is 1 but there is no --relay-host: "
                         "accepted mail could not be forwarded to the back-end")
    backend = config.gateway_backend or parse_host_port(relay_host)
    domains = config.gateway_domain_names
    if not domains:
        raise ValueError("GatewayEnabled is 1 but no domain is listed (GatewayDomains or the Domain table)")
    host, port = backend
    endpoint = backend_endpoint(reactor, host, port, timeout=config.gateway_timeout,
                                bind_address=config.gateway_bind_address)
    pool = BackendPool(endpoint, reactor, size=config.gateway_connections,
                       timeout=config.gateway_timeout, idle_timeout=config.gateway_idle_timeout,
                       helo=config.hostname)
    log.info("gateway mode: recipients of {domains} verified with {host}:{port}",
             domains=",".join(domains), host=host, port=port)
    return Gateway(domains, pool, reactor, positive_ttl=config.gateway_positive_ttl,
                   negative_ttl=config.gateway_negative_ttl, cache_size=config.gateway_cache_size)
