"""Gateway mode from the configuration (mailguard.gateway.build and the
Gateway* settings): defaults, malformed values named by file and line,
the settings documented, and what build_gateway makes of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactorClock

from mailguard.config import kerioxml
from mailguard.config import settings as config_mod
from mailguard.gateway.build import build_gateway


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


def _Reactor():
    """Enough of a reactor for building endpoints (never connected here)."""
    return MemoryReactorClock()


def test_build_gateway_disabled_is_none():
    config, _ = _load({})
    assert build_gateway(config, {}, _Reactor()) is None


def test_build_gateway_needs_a_relay_host():
    for variables in ({"GatewayEnabled": "1"}, {"GatewayEnabled": "1", "GatewayBackend": "127.0.0.1:25"}):
        config, _ = _load(variables)
        with pytest.raises(ValueError, match="no --relay-host"):
            build_gateway(config, {}, _Reactor())


def test_build_gateway_from_relay_host_and_domain_table():
    config, _ = _load({"GatewayEnabled": "1", "GatewayBindAddress": "127.0.0.2",
                       "GatewayConnections": "3", "GatewayCacheSize": "7"})
    gateway = build_gateway(config, {"relay-host": "127.0.0.1:2526"}, _Reactor())
    assert gateway.domains == {"example.com", "example.net"}
    assert gateway.pool.size == 3 and gateway.cache.size == 7
    assert gateway.pool.helo == "gw.example.com"
    ep = gateway.pool.endpoint
    assert isinstance(ep, endpoints.TCP4ClientEndpoint)
    assert (ep._host, ep._port, ep._bindAddress) == ("127.0.0.1", 2526, ("127.0.0.2", 0))


def test_build_gateway_explicit_backend_and_domains():
    config, _ = _load({"GatewayEnabled": "1", "GatewayBackend": "[::1]:25", "GatewayDomains": "example.com"})
    gateway = build_gateway(config, {"relay-host": "10.0.0.1:25"}, _Reactor())
    assert gateway.domains == {"example.com"}
    assert isinstance(gateway.pool.endpoint, endpoints.TCP6ClientEndpoint)
    config, _ = _load({"GatewayEnabled": "1", "GatewayBackend": "backend.example.com:25"})
    gateway = build_gateway(config, {"relay-host": "10.0.0.1:25"}, _Reactor())
    assert isinstance(gateway.pool.endpoint, endpoints.HostnameEndpoint)


@pytest.mark.parametrize("variables, source", [
    ({}, ""),  # the system chooses
    ({"GatewayBindAddress": "127.0.0.2"}, ""),  # not in gateway mode
    ({"GatewayEnabled": "1", "GatewayBindAddress": "127.0.0.2"}, "127.0.0.2"),  # one address for the back-end
    ({"GatewayEnabled": "1", "GatewayBindAddress": "127.0.0.2", "RelayHostBindAddress": "127.0.0.5"}, "127.0.0.5"),
    ({"RelayHostBindAddress": " ::1 "}, "::1"),
])
def test_relay_queue_source_address(variables, source):
    config, problems = _load(variables)
    assert not problems
    assert config.relay_source_address == source


def test_relay_bind_address_must_be_an_address():
    _, problems = _load({"RelayHostBindAddress": "gw.example.com"})
    assert [p.message for p in problems if p.is_error] == [
        'variable "RelayHostBindAddress": expected an IP address, got "gw.example.com"']


def test_the_queue_is_built_with_the_gateway_address(tmp_path):
    from mailguard.service import build_queue

    config, _ = _load({"GatewayEnabled": "1", "GatewayBindAddress": "127.0.0.2"})
    reactor = MemoryReactorClock()
    queue = build_queue(config, {"relay-host": "127.0.0.1:2526"}, reactor, str(tmp_path), None)
    assert queue.bind_address == "127.0.0.2"
    queue._hop.connect(object())  # a factory stand-in: the endpoint only records it
    reactor.advance(0)
    assert reactor.tcpClients[0][4] == ("127.0.0.2", 0)
