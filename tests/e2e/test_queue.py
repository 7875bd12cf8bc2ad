"""The relay queue end to end: real ``twistd -n mailguard`` processes
relaying to a real next hop on loopback -- an aiosmtpd server, or a second
mailguard with STARTTLS.

Tests that need the next hop from the start share one per module (a
module-scoped process; each test sees only the messages of its own run,
and the mailguard next hop gets a different mailbox per test).  Tests that
start with the next hop down start their own, on a port chosen first.
"""

from __future__ import annotations

import json
import re
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Twistd, free_port, write_config
from tests.conftest import eventually as wait_for
from tests.unit.store.world import parse_report

BACKEND = r'''
import asyncio, json, os, sys
from aiosmtpd.smtp import SMTP

out, port = sys.argv[1], int(sys.argv[2])

class Handler:
    n = 0
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 <%s>: no such user" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"
    async def handle_DATA(self, server, session, envelope):
        Handler.n += 1
        base = os.path.join(out, "%d-%d" % (os.getpid(), Handler.n))
        with open(base + ".tmp", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json", "w") as f:
            json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                       "tls": session.ssl is not None, "peer": session.peer[0]}, f)
        os.rename(base + ".tmp", base + ".eml")
        return "250 2.0.0 OK"

async def main():
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(Handler(), hostname="backend.test"), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


class Backend:
    """The aiosmtpd next hop: each accepted message is a .eml file (and a
    .json of its envelope) in C{dir}."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.dir = tmp / "backend"
        self.dir.mkdir(exist_ok=True)
        self.port = port
        script = tmp / "backend.py"
        script.write_text(BACKEND)
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.dir), str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout.readline().strip() == b"ready", self.proc.stdout.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()

    def messages(self) -> list[tuple[dict, bytes]]:
        out = []
        for eml in sorted(self.dir.glob("*.eml")):
            meta = json.loads(eml.with_suffix(".json").read_text())
            out.append((meta, eml.read_bytes()))
        return out

    def wait(self, n: int, timeout: float = 60.0) -> list[tuple[dict, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"back-end got {len(self.messages())} message(s), expected {n}")


    def forget(self) -> None:
        """Drop what earlier tests delivered (a shared back-end)."""
        for p in self.dir.iterdir():
            p.unlink()


@pytest.fixture(scope="module")
def shared_backend(tmp_path_factory):
    """One aiosmtpd next hop for the tests that need it up from the start."""
    b = Backend(tmp_path_factory.mktemp("backend"), free_port())
    yield b
    b.stop()


@pytest.fixture
def up_backend(shared_backend):
    """The shared next hop, with nothing delivered yet as far as this test
    can tell."""
    shared_backend.forget()
    return shared_backend


@pytest.fixture
def backend(tmp_path):
    """Start a next hop of this test's own (on a given port: later)."""
    started = []

    def start(port=None):
        b = Backend(tmp_path, port or free_port())
        started.append(b)
        return b

    yield start
    for b in started:
        if b.proc.poll() is None:
            b.stop()


def relay_config(tmp_path, **variables):
    return write_config(tmp_path / "mailserver.cfg", {k: str(v) for k, v in variables.items()})


def send(server, sender, rcpts, body, source="127.0.0.2", **kw):
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(source, 0), timeout=10) as c:
        c.ehlo("client.test")
        return c.sendmail(sender, rcpts, body, **kw)


def test_e2e_trusted_client_relays_to_the_backend(twistd, up_backend, tmp_path):
    b = up_backend
    server = twistd("--relay-host", f"127.0.0.1:{b.port}", config=relay_config(tmp_path))
    body = b"Subject: relay\r\nMessage-ID: <e2e-1@client.test>\r\n\r\nrelayed\r\n.dot\r\n"
    assert send(server, "john@example.com", ["x@remote.test"], body) == {}
    [(meta, data)] = b.wait(1)
    assert meta["from"] == "john@example.com" and meta["to"] == ["x@remote.test"]
    assert data.startswith(b"Received: from client.test ([127.0.0.2])")
    assert data.endswith(body)
    assert b"Twisted" not in data
    assert wait_for(lambda: not os.listdir(server.spool / "queue" / "active"))


def test_e2e_a_1200_octet_line_is_delivered_and_forwarded_folded(twistd, up_backend, tmp_path):
    """Issue 10: a line over 1000 octets is accepted and stored unchanged
    for a local recipient, and folded (CRLF SPACE after 998 octets, as
    Postfix's SMTP client) for the next hop, which here is aiosmtpd: it
    refuses DATA lines over 1001 octets, so the delivery itself shows the
    folding."""
    b = up_backend
    server = twistd("--relay-host", f"127.0.0.1:{b.port}", config=relay_config(tmp_path))
    long_line = b"<p>" + b"w" * 1197
    body = b"Subject: long line\r\n\r\n" + long_line + b"\r\nafter\r\n"
    assert send(server, "a@sender.test", ["john@example.com", "x@remote.test"], body) == {}
    [stored] = server.maildir_files("john@example.com")
    assert stored.read_bytes().endswith(body)  # unchanged
    [(meta, data)] = b.wait(1)
    assert meta["to"] == ["x@remote.test"]
    assert data.endswith(b"Subject: long line\r\n\r\n" + long_line[:998] + b"\r\n " + long_line[998:]
                         + b"\r\nafter\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert re.search(r"relay-folded queue=\w+ relay=127\.0\.0\.1 limit=998 folds=1\b", server.output())


def test_e2e_deliveries_leave_from_relay_host_bind_address(twistd, up_backend, tmp_path):
    b = up_backend
    server = twistd("--relay-host", f"127.0.0.1:{b.port}",
                    config=relay_config(tmp_path, RelayHostBindAddress="127.0.0.4"))
    assert send(server, "john@example.com", ["x@remote.test"], b"Subject: from .4\r\n\r\nhi\r\n") == {}
    [(meta, _)] = b.wait(1)
    assert meta["peer"] == "127.0.0.4"


def test_e2e_backend_down_then_up_retries(twistd, backend, tmp_path):
    port = free_port()
    server = twistd("--relay-host", f"127.0.0.1:{port}",
                    config=relay_config(tmp_path, QueueRetryMin=1, QueueRetryMax=1))
    send(server, "john@example.com", ["x@remote.test"], b"Subject: retry\r\n\r\nlater\r\n")
    # the first attempt and a retry failed (1 s later), and the message waits
    assert wait_for(lambda: server.output().count("deferred") >= 2)
    assert len(os.listdir(server.spool / "queue" / "active")) == 2
    b = backend(port)
    [(meta, data)] = b.wait(1)
    assert b"later" in data


def test_e2e_queue_survives_a_restart(twistd, backend, tmp_path):
    port = free_port()
    cfg = relay_config(tmp_path)  # QueueRetryMin 300 s: only the restart retries it
    server = twistd("--relay-host", f"127.0.0.1:{port}", config=cfg)
    send(server, "john@example.com", ["x@remote.test"], b"Subject: restart\r\n\r\nkept\r\n")
    assert wait_for(lambda: "deferred" in server.output())
    server.stop()
    assert len(os.listdir(server.spool / "queue" / "active")) == 2
    b = backend(port)
    server2 = twistd("--relay-host", f"127.0.0.1:{port}", config=cfg)
    [(meta, data)] = b.wait(1)
    assert b"kept" in data
    assert wait_for(lambda: not os.listdir(server2.spool / "queue" / "active"))


def queued_entry(server) -> dict:
    """The one queue entry's state on disk (its .env)."""
    [env] = (server.spool / "queue" / "active").glob("*.env")
    return json.loads(env.read_text())


def test_e2e_etrn_starts_a_queue_run(twistd, backend, tmp_path):
    """The first attempt fails, the next is an hour away: only ETRN from a
    trusted client makes it now.  (That an untrusted ETRN starts nothing
    is shown on a task.Clock: tests/unit/store/test_queue.py.)"""
    port = free_port()
    server = twistd("--relay-host", f"127.0.0.1:{port}",
                    config=relay_config(tmp_path, QueueRetryMin=3600))
    send(server, "john@example.com", ["x@remote.test"], b"Subject: etrn\r\n\r\nnow\r\n")
    assert wait_for(lambda: queued_entry(server)["attempts"] == 1)
    assert queued_entry(server)["next_attempt"] - time.time() > 3000
    b = backend(port)
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        code, text = c.ehlo("stranger.test")
        assert b"ETRN" in text and b"DSN" in text
        # An untrusted client cannot end the back-off (it could hammer the
        # relay host and the disk).
        assert c.docmd("ETRN", "remote.test") == (458, b"4.5.0 Unable to queue messages for node: ETRN is for trusted clients")
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
        c.ehlo("gateway.test")
        assert c.docmd("ETRN", "remote.test")[0] == 250
    [(meta, data)] = b.wait(1, timeout=10)
    assert b"now" in data


def test_e2e_backend_rejection_bounces_into_the_sender_maildir(twistd, up_backend, tmp_path):
    b = up_backend
    server = twistd("--relay-host", f"127.0.0.1:{b.port}", config=relay_config(tmp_path))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("john@example.com", ["RET=HDRS", "ENVID=QQ+2B1"])[0] == 250
        assert c.rcpt("reject@remote.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;reject@remote.test"])[0] == 250
        assert c.rcpt("ok@remote.test")[0] == 250
        assert c.data(b"Subject: bounce me\r\n\r\nbody text\r\n")[0] == 250
    b.wait(1)
    assert wait_for(lambda: server.maildir_files("john@example.com"))
    [bounce] = server.maildir_files("john@example.com")
    msg, parts, per_message, [r] = parse_report(bounce.read_bytes())
    assert per_message["Original-Envelope-Id"] == "QQ+1"
    assert r["Final-Recipient"] == "rfc822; reject@remote.test"
    assert r["Original-Recipient"] == "rfc822;reject@remote.test"
    assert (r["Action"], r["Status"]) == ("failed", "5.1.1")
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"body text" not in bounce.read_bytes()


def _backend_mailguard(tmp_path: Path, *args: str):
    """A second mailguard as the next hop: local domain remote.test (users
    john, jane, sam @remote.test), STARTTLS with a throw-away CA's
    certificate."""
    from tests.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    home = tmp_path / "backend-mailguard"
    home.mkdir()
    cfg = write_config(home / "mailserver.cfg", {"InternetHostname": "backend.test"})
    cfg.write_text(cfg.read_text().replace("example.com", "remote.test").replace("example.net", "remote.net"))
    port = free_port()
    server = Twistd(home, ["--config", str(cfg), "--tls-cert", certs.cert, "--tls-key", certs.key,
                           "--smtp", f"tcp:{port}:interface=127.0.0.1", *args], port)
    return server, certs


@pytest.fixture(scope="module")
def mailguard_backend(tmp_path_factory):
    """One mailguard next hop for the TLS tests; each test relays to a
    mailbox of its own there (john, jane, sam), so they do not interfere."""
    back, certs = _backend_mailguard(tmp_path_factory.mktemp("next-hop"))
    yield back, certs
    back.stop()


def test_e2e_starttls_and_dsn_to_a_mailguard_backend(twistd, mailguard_backend, tmp_path):
    """The next hop is a second mailguard offering STARTTLS and DSN: the
    queue uses TLS (opportunistic: a certificate it cannot verify is fine)
    and passes the DSN parameters on, so the next hop reports success."""
    back, certs = mailguard_backend
    server = twistd("--relay-host", f"127.0.0.1:{back.port}", config=relay_config(tmp_path))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert c.mail("jane@example.com", ["ENVID=E2E"])[0] == 250
        assert c.rcpt("john@remote.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;john@remote.test"])[0] == 250
        assert c.data(b"Subject: tls\r\n\r\nover TLS\r\n")[0] == 250
    assert wait_for(lambda: back.maildir_files("john@remote.test"))
    [got] = back.maildir_files("john@remote.test")
    data = got.read_bytes()
    # the back-end's Received header: ESMTPS = ESMTP over TLS
    # Our Return-Path stayed here; the back-end wrote its own (one).
    assert data.startswith(b"Return-Path: <jane@example.com>\r\n"
                           b"Received: from mx.example.com ([127.0.0.1])\r\n\tby backend.test with ESMTPS")
    assert data.count(b"Return-Path:") == 1
    # NOTIFY=SUCCESS travelled: the back-end queued a "delivered" DSN for
    # jane@example.com (it has no relay host, so it holds it) ...
    active = back.spool / "queue" / "active"
    assert wait_for(lambda: any(p.suffix == ".env" for p in active.iterdir()))
    [env] = [json.loads(p.read_text()) for p in active.iterdir() if p.suffix == ".env"]
    assert env["sender"] == "" and env["recipients"][0]["address"] == "jane@example.com"
    [eml] = [p.read_bytes() for p in active.iterdir() if p.suffix == ".eml"]
    _, _, per_message, [r] = parse_report(eml)
    assert per_message["Original-Envelope-Id"] == "E2E"
    assert r["Action"] == "delivered" and r["Original-Recipient"] == "rfc822;john@remote.test"
    # ... and the front sent no "relayed" notice of its own.
    assert server.maildir_files("jane@example.com") == []


def test_e2e_verified_tls_to_the_relay_host(twistd, mailguard_backend, tmp_path):
    """RelayHostTlsVerify=1: TLS required, the certificate checked against
    RelayHostTlsCaFile for the relay host's name."""
    back, certs = mailguard_backend
    cfg = relay_config(tmp_path, RelayHostTlsVerify=1, RelayHostTlsCaFile=certs.ca)
    server = twistd("--relay-host", f"localhost:{back.port}", config=cfg)
    send(server, "jane@example.com", ["jane@remote.test"], b"Subject: verified\r\n\r\nok\r\n")
    assert wait_for(lambda: back.maildir_files("jane@remote.test"))
    assert b"with ESMTPS" in back.maildir_files("jane@remote.test")[0].read_bytes()


def test_e2e_verified_tls_refuses_an_unknown_certificate(twistd, mailguard_backend, tmp_path):
    from tests.certs import make_certs

    back, certs = mailguard_backend
    other = make_certs(tmp_path / "other-ca")
    cfg = relay_config(tmp_path, RelayHostTlsVerify=1, RelayHostTlsCaFile=other.ca)
    server = twistd("--relay-host", f"localhost:{back.port}", config=cfg)
    send(server, "jane@example.com", ["sam@remote.test"], b"Subject: unverified\r\n\r\nno\r\n")
    assert wait_for(lambda: "deferred" in server.output())
    assert back.maildir_files("sam@remote.test") == []
    assert len(os.listdir(server.spool / "queue" / "active")) == 2
    # deferred for the certificate, not for anything else
    reason = "TLS handshake failed: [('SSL routines', '', 'certificate verify failed')]"
    [deferred] = [line for line in server.output().splitlines() if " result=deferred " in line]
    assert f' to=sam@remote.test relay=localhost result=deferred status=4.4.1 reply="X-mailguard; {reason}" ' \
        in deferred
    [env] = [json.loads(p.read_text()) for p in (server.spool / "queue" / "active").glob("*.env")]
    assert reason in env["recipients"][0]["diagnostic"]
