"""Behind a load balancer (SPEC "Trust"): with a ``haproxy:`` endpoint the
client IP is the one the PROXY header carries, for trust, VRFY and the
greeting delay alike."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import free_port, write_config


def _talk(port: int, proxy_line: bytes, commands: list[bytes], source: str = "127.0.0.1") -> list[bytes]:
    """Send the PROXY header, then each command, reading one reply each."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(proxy_line)
        f = s.makefile("rb")

        def reply() -> bytes:
            lines = []
            while True:
                line = f.readline()
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        out = [reply()]
        for c in commands:
            s.sendall(c)
            out.append(reply())
        return out


def test_proxied_address_decides_trust(twistd, tmp_path):
    port = free_port()
    server = twistd("--smtp", f"haproxy:tcp:{port}:interface=127.0.0.1",
                    config=write_config(tmp_path / "mailserver.cfg"), port=port)
    # The TCP peer is 127.0.0.1 both times; only the PROXY header differs.
    gateway = _talk(server.port, b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n",
                    [b"EHLO gw.test\r\n", b"VRFY john@example.com\r\n", b"QUIT\r\n"])
    assert gateway[0].startswith(b"220 ")
    assert gateway[2] == b"250 2.1.5 <john@example.com>\r\n"
    stranger = _talk(server.port, b"PROXY TCP4 127.0.0.3 127.0.0.1 40001 25\r\n",
                     [b"EHLO x.test\r\n", b"VRFY john@example.com\r\n",
                      b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<x@elsewhere.test>\r\n"])
    assert stranger[2] == b"252 2.1.5 Verification not supported\r\n"
    assert stranger[4].startswith(b"554 5.7.1 ")


def test_proxy_unknown_decides_on_the_load_balancers_address(twistd, tmp_path):
    """PROXY UNKNOWN: the real peer decides.  From 127.0.0.2 (trusted) VRFY
    answers; from 127.0.0.3 it is withheld."""
    port = free_port()
    server = twistd("--smtp", f"haproxy:tcp:{port}:interface=127.0.0.1",
                    config=write_config(tmp_path / "mailserver.cfg"), port=port)
    trusted = _talk(server.port, b"PROXY UNKNOWN\r\n",
                    [b"EHLO lb.test\r\n", b"VRFY john@example.com\r\n"], source="127.0.0.2")
    assert trusted[0].startswith(b"220 ") and trusted[2] == b"250 2.1.5 <john@example.com>\r\n"
    other = _talk(server.port, b"PROXY UNKNOWN\r\n",
                  [b"EHLO lb.test\r\n", b"VRFY john@example.com\r\n"], source="127.0.0.3")
    assert other[2] == b"252 2.1.5 Verification not supported\r\n"


def test_proxied_address_decides_the_greeting_delay(twistd, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "mailserver.cfg", {
        "SmtpGreetingDelay": "30", "SmtpGreetingDelayExceptions": "NoDelay"})
    server = twistd("--smtp", f"haproxy:tcp:{port}:interface=127.0.0.1", config=cfg, port=port)
    # 127.0.0.4 (in NoDelay, per the PROXY header) is greeted at once.
    assert _talk(server.port, b"PROXY TCP4 127.0.0.4 127.0.0.1 40002 25\r\n", [])[0].startswith(b"220 ")
    # 127.0.0.3 is held: talking first gets 554 and the security log says who.
    out = _talk(server.port, b"PROXY TCP4 127.0.0.3 127.0.0.1 40003 25\r\nEHLO bot.test\r\n", [])
    assert out[0].startswith(b"554 5.7.1 ")
    log = (server.spool / "security.log")
    for _ in range(100):
        if log.exists() and log.read_text():
            break
        import time
        time.sleep(0.05)
    assert "\tearly-talker\t127.0.0.3\t40003\t" in log.read_text()


# --- the wrapper, on a Clock and a StringTransport -----------------------------

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from mailguard.config import settings as config_mod  # noqa: E402
from mailguard.smtpd.factory import MailguardFactory  # noqa: E402
from mailguard.smtpd.proxy import HEADER_TIMEOUT, ProxyHeaderFactory  # noqa: E402
from mailguard.testing import make_context  # noqa: E402


def _proxied(tmp_path):
    clock = Clock()
    ctx = make_context(config_mod.load(str(write_config(tmp_path / "m.cfg"))), clock=clock,
                       spool=str(tmp_path / "spool"))
    factory = ProxyHeaderFactory(MailguardFactory(ctx, "smtp"), clock)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
    proto = factory.buildProtocol(transport.getPeer())
    proto.makeConnection(transport)
    return proto, transport, clock


def test_session_waits_for_the_header(tmp_path):
    proto, transport, clock = _proxied(tmp_path)
    assert transport.value() == b""  # no greeting before the header
    proto.dataReceived(b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 ")
    assert transport.value() == b""
    proto.dataReceived(b"25\r\nEHLO gw.test\r\nVRFY john\r\n")  # header completes; commands follow
    lines = transport.value().splitlines()
    assert lines[0].startswith(b"220 ") and lines[-1] == b"250 2.1.5 <john@example.com>"
    assert proto.wrappedProtocol.session.client_ip == "127.0.0.2"


def test_no_header_closes_after_the_timeout(tmp_path):
    proto, transport, clock = _proxied(tmp_path)
    clock.advance(HEADER_TIMEOUT)
    assert transport.disconnecting and transport.value() == b""
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_invalid_header_closes_without_a_session(tmp_path):
    proto, transport, clock = _proxied(tmp_path)
    proto.dataReceived(b"EHLO not-a-proxy\r\n")
    assert transport.disconnecting and transport.value() == b""
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_proxy_unknown_uses_the_real_addresses(tmp_path):
    """PROXY UNKNOWN (v1) names no client: the session starts with the
    connection's own peer (the load balancer), as the PROXY spec says.
    Twisted's parser alone refuses the bare form and closes."""
    proto, transport, clock = _proxied(tmp_path)
    proto.dataReceived(b"PROXY UNKNOWN\r\nEHLO lb.test\r\n")
    lines = transport.value().splitlines()
    assert not transport.disconnecting
    assert lines[0].startswith(b"220 ") and lines[1] == b"250-mx.example.com"
    assert proto.wrappedProtocol.session.client_ip == "127.0.0.1"
    assert proto.getPeer() == IPv4Address("TCP", "127.0.0.1", 1234)
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_proxy_unknown_with_addresses_ignores_them(tmp_path):
    proto, transport, _ = _proxied(tmp_path)
    proto.dataReceived(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n")
    assert transport.value().startswith(b"220 ") and not transport.disconnecting
    assert proto.wrappedProtocol.session.client_ip == "127.0.0.1"


def test_proxy_unknown_split_across_reads(tmp_path):
    proto, transport, _ = _proxied(tmp_path)
    proto.dataReceived(b"PROXY UN")
    assert transport.value() == b""
    proto.dataReceived(b"KNOWN\r\n")
    assert transport.value().startswith(b"220 ")
    assert proto.wrappedProtocol.session.client_ip == "127.0.0.1"


def test_proxy_v2_local_uses_the_real_addresses(tmp_path):
    proto, transport, _ = _proxied(tmp_path)
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    proto.dataReceived(signature + b"\x20\x00\x00\x00")  # version 2, LOCAL, no addresses
    assert transport.value().startswith(b"220 ") and not transport.disconnecting
    assert proto.wrappedProtocol.session.client_ip == "127.0.0.1"


@pytest.mark.parametrize("header", [b"PROXY UNKNOWNX\r\n", b"PROXY TCP4\r\n", b"PROXY\r\n\r\n"])
def test_malformed_v1_headers_still_close(tmp_path, header):
    proto, transport, clock = _proxied(tmp_path)
    proto.dataReceived(header)
    assert transport.disconnecting and transport.value() == b""
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []
