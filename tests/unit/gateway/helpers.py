"""Shared by the gateway tests: the pool and the gateway over the in-memory
back-end of ``mailguard.testing``, on a ``task.Clock``."""

from __future__ import annotations

from mailguard.gateway.gateway import Gateway
from mailguard.gateway.pool import BackendPool
from mailguard.policy.addresses import parse_path
from mailguard.testing import result_of


def mbox(address: str):
    return parse_path(f"<{address}>", allow_null=False)


def once(answer: bytes):
    """An override that answers once, then lets the back-end answer."""
    used = []

    def respond(arg):
        if used:
            return None
        used.append(arg)
        return answer

    return respond


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
