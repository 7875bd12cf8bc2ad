"""Gateway mode end to end: a real gateway ``twistd -n mailguard`` in front
of a real back-end ``twistd -n mailguard``, and smtplib clients.

    client 127.0.0.3 --> gateway 127.0.0.1:G --(from 127.0.0.2)--> back-end 127.0.0.1:B

The back-end is the ``write_config`` server: VRFYEnabled=1, example.com
(alias example.net) with john, jane, a disabled "former" and the alias
"sales", and 127.0.0.2 in its relay IP group "Trusted", so it answers the
gateway's VRFY truthfully.  The gateway knows no users at all.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TWISTD, Twistd, eventually, free_port, write_config

CLIENT = ("127.0.0.3", 0)


def gateway_config(path: Path, variables: dict[str, str] | None = None, body: str = "") -> Path:
    """A gateway: the back-end's domains, no users of its own."""
    variables = {
        "InternetHostname": "gw.example.com",
        "SmtpGreetingDelay": "0",
        "GatewayEnabled": "1",
        "GatewayBindAddress": "127.0.0.2",
        "GatewayTimeout": "3",
        **(variables or {}),
    }
    return write_config(path, variables, body, users=(), groups=(), aliases=(), defaults={})


@pytest.fixture
def servers(tmp_path):
    """start(name, config, port, *args): a twistd in its own directory."""
    started: list[Twistd] = []

    def start(name: str, config: Path, port: int, *args: str) -> Twistd:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        server = Twistd(home, ["--config", str(config), "--smtp", f"tcp:{port}:interface=127.0.0.1", *args], port)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


def backend_cfg(tmp_path: Path, **variables: str) -> Path:
    (tmp_path / "cfg").mkdir(exist_ok=True)
    return write_config(tmp_path / "cfg" / "backend.cfg", variables)


def gw_cfg(tmp_path: Path, body: str = "", **variables: str) -> Path:
    (tmp_path / "cfg").mkdir(exist_ok=True)
    return gateway_config(tmp_path / "cfg" / "gateway.cfg", variables, body)


def rcpts(port: int, addresses: list[str]) -> dict[str, tuple[int, str]]:
    """RCPT each address in one transaction: address -> (code, enhanced code)."""
    out = {}
    with smtplib.SMTP("127.0.0.1", port, source_address=CLIENT, timeout=20) as c:
        c.ehlo("client.test")
        code, _ = c.mail("sender@outside.test")
        assert code == 250
        for a in addresses:
            code, text = c.rcpt(a)
            out[a] = (code, text.decode()[:5])
    return out


def rcpt(port: int, address: str) -> tuple[int, str]:
    return rcpts(port, [address])[address]


def test_gateway_refuses_unknown_recipients_at_rcpt(servers, tmp_path):
    bport, gport = free_port(), free_port()
    servers("backend", backend_cfg(tmp_path), bport)
    servers("gateway", gw_cfg(tmp_path), gport, "--relay-host", f"127.0.0.1:{bport}")
    got = rcpts(gport, ["john@example.com", "nobody@example.com", "former@example.com",
                        "sales@example.com", "JANE@example.net", "someone@elsewhere.test",
                        '"john@elsewhere.test"@example.com'])
    assert got == {
        "john@example.com": (250, "2.1.5"),
        "nobody@example.com": (550, "5.1.1"),
        "former@example.com": (550, "5.1.1"),  # disabled on the back-end
        "sales@example.com": (250, "2.1.5"),  # an alias on the back-end
        "JANE@example.net": (250, "2.1.5"),  # a domain alias
        "someone@elsewhere.test": (554, "5.7.1"),  # still no open relay
        '"john@elsewhere.test"@example.com': (550, "5.1.1"),  # never passed on
    }


@pytest.mark.parametrize("how", ["vrfy", "vrfy-withheld-252", "vrfy-disabled-502"])
def test_gateway_answers_the_same_whichever_way_the_backend_is_asked(servers, tmp_path, how):
    """Trusted: VRFY says 250/550.  Untrusted (the gateway's address is
    not in the relay group): 252 for all, so the gateway probes with RCPT.
    VRFYEnabled=0: 502, probe too."""
    bport, gport = free_port(), free_port()
    backend = {"vrfy": {}, "vrfy-withheld-252": {"RelayControlIpGroupEnabled": "0"},
               "vrfy-disabled-502": {"VRFYEnabled": "0"}}[how]
    servers("backend", backend_cfg(tmp_path, **backend), bport)
    # GatewayBackend overrides --relay-host as the back-end to ask.
    servers("gateway", gw_cfg(tmp_path, GatewayBackend=f"127.0.0.1:{bport}"), gport,
            "--relay-host", f"127.0.0.1:{free_port()}")
    got = rcpts(gport, ["john@example.com", "nobody@example.com", "jane@example.com", "former@example.com"])
    assert got == {"john@example.com": (250, "2.1.5"), "nobody@example.com": (550, "5.1.1"),
                   "jane@example.com": (250, "2.1.5"), "former@example.com": (550, "5.1.1")}


def test_trusted_vrfy_on_the_gateway_is_the_backends_answer(servers, tmp_path):
    """A client the gateway trusts (127.0.0.4, its relay group) asking VRFY
    about a gateway domain gets the back-end's answer, not a 550 from the
    gateway's empty user list; an untrusted one gets 252 as always."""
    bport, gport = free_port(), free_port()
    servers("backend", backend_cfg(tmp_path), bport)
    trusted = """  <list name="IpAddressGroup">
    <listitem><variable name="Group">Ours</variable><variable name="Address">127.0.0.4</variable></listitem>
  </list>"""
    servers("gateway", gw_cfg(tmp_path, trusted, VRFYEnabled="1", RelayControlIpGroupEnabled="1",
                              RelayControlIpGroup="Ours"), gport, "--relay-host", f"127.0.0.1:{bport}")
    with smtplib.SMTP("127.0.0.1", gport, source_address=("127.0.0.4", 0), timeout=20) as c:
        c.ehlo("inside.test")
        assert c.verify("john@example.com") == (250, b"2.1.5 <john@example.com>")
        assert c.verify("nobody@example.com")[0] == 550
        assert c.verify("former@example.com")[0] == 550
    with smtplib.SMTP("127.0.0.1", gport, source_address=CLIENT, timeout=20) as c:
        c.ehlo("outside.test")
        assert c.verify("john@example.com") == (252, b"2.1.5 Verification not supported")


def test_vrfy_cache_hits_and_misses(servers, tmp_path):
    bport, gport = free_port(), free_port()
    backend = servers("backend", backend_cfg(tmp_path), bport)
    servers("gateway", gw_cfg(tmp_path), gport, "--relay-host", f"127.0.0.1:{bport}")
    # Misses: the back-end is asked.
    assert rcpts(gport, ["john@example.com", "nobody@example.com"]) == {
        "john@example.com": (250, "2.1.5"), "nobody@example.com": (550, "5.1.1")}
    backend.stop()
    # Hits: answered from the cache with the back-end gone.
    assert rcpts(gport, ["john@example.com", "nobody@example.com", "JOHN@EXAMPLE.COM"]) == {
        "john@example.com": (250, "2.1.5"), "nobody@example.com": (550, "5.1.1"),
        # A different spelling is a different key: a miss, and nobody to ask.
        "JOHN@EXAMPLE.COM": (450, "4.4.1")}
    # A miss with the back-end gone: try later, never accept-then-bounce.
    assert rcpt(gport, "jane@example.com") == (450, "4.4.1")


def test_backend_down_gives_450_then_up_works(servers, tmp_path):
    bport, gport = free_port(), free_port()
    servers("gateway", gw_cfg(tmp_path), gport, "--relay-host", f"127.0.0.1:{bport}")
    assert rcpts(gport, ["john@example.com", "nobody@example.com"]) == {
        "john@example.com": (450, "4.4.1"), "nobody@example.com": (450, "4.4.1")}
    servers("backend", backend_cfg(tmp_path), bport)
    assert eventually(lambda: rcpt(gport, "john@example.com") == (250, "2.1.5"))
    assert rcpt(gport, "nobody@example.com") == (550, "5.1.1")


def test_backend_restart_is_survived(servers, tmp_path):
    """The pooled connection dies with the back-end; the next lookups get
    450 while it is down, and work again once it is back."""
    bport, gport = free_port(), free_port()
    backend = servers("backend", backend_cfg(tmp_path), bport)
    servers("gateway", gw_cfg(tmp_path, GatewayCachePositiveTtl="0", GatewayCacheNegativeTtl="0"), gport,
            "--relay-host", f"127.0.0.1:{bport}")
    assert rcpt(gport, "john@example.com") == (250, "2.1.5")
    backend.kill9()
    assert rcpt(gport, "john@example.com") == (450, "4.4.1")
    servers("backend2", backend_cfg(tmp_path), bport)
    assert eventually(lambda: rcpt(gport, "john@example.com") == (250, "2.1.5"))
    assert rcpt(gport, "nobody@example.com") == (550, "5.1.1")


def test_gateway_without_relay_host_fails_to_start(tmp_path):
    # Even with GatewayBackend: accepted mail would have nowhere to go.
    cfg = gw_cfg(tmp_path, GatewayBackend=f"127.0.0.1:{free_port()}")
    log = tmp_path / "twistd.log"
    proc = subprocess.run([TWISTD, "--logfile", str(log), "--pidfile", "", "-n", "mailguard",
                           "--config", str(cfg), "--spool", str(tmp_path / "spool"),
                           "--smtp", f"tcp:{free_port()}:interface=127.0.0.1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr + (log.read_text(errors="replace") if log.exists() else "")
    assert "there is no --relay-host" in text


def test_accepted_gateway_mail_reaches_the_backend(servers, tmp_path):
    """Accepted at RCPT by the gateway, queued, forwarded by the relay
    queue (mailguard.store.queue) to --relay-host, delivered by the back-end."""
    bport, gport = free_port(), free_port()
    backend = servers("backend", backend_cfg(tmp_path), bport)
    servers("gateway", gw_cfg(tmp_path), gport, "--relay-host", f"127.0.0.1:{bport}")
    with smtplib.SMTP("127.0.0.1", gport, source_address=CLIENT, timeout=20) as c:
        c.sendmail("sender@outside.test", ["john@example.com"], b"Subject: via the gateway\r\n\r\nHello.\r\n")
    files = eventually(lambda: backend.maildir_files("john@example.com"), timeout=20)
    assert len(files) == 1
    data = files[0].read_bytes()
    assert b"Hello." in data
    # Issue 10: the relay queue delivered from GatewayBindAddress too, the
    # address the back-end trusts (its Received header names the client).
    assert b"\r\nReceived: from gw.example.com ([127.0.0.2])\r\n" in data
