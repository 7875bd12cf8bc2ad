"""Gateway mode in front of a real Postfix back-end (issue 10, item 4).

    client 127.0.0.3 --> gateway twistd --(all from 127.0.0.2)--> private Postfix

The back-end is a private Postfix instance (``postfix -c DIR``) holding
example.com as a virtual mailbox domain (john and jane, each a Maildir),
with ``smtpd_peername_lookup = no`` so its log names each client by
address.  The gateway (``GatewayBindAddress=127.0.0.2``) asks it about
recipients at RCPT time and forwards accepted mail from its relay queue;
Postfix's log must show one client address for both.  Run once with
``disable_vrfy_command = no`` (the gateway asks with VRFY: Postfix answers
550 for an unknown user and 252 for a known one, which the gateway then
confirms with its RCPT probe) and once with ``= yes`` (VRFY is 502: the
gateway probes with RCPT).
"""

from __future__ import annotations

import pwd
import re
import shutil
import smtplib
import time
import uuid

import pytest

from tests.conftest import Twistd, free_port
from tests.e2e.test_gateway import gateway_config
from tests.postfix import PrivatePostfix

GATEWAY_IP = "127.0.0.2"


@pytest.fixture(scope="module", params=["no", "yes"], ids=["vrfy-enabled", "vrfy-disabled"])
def backend(request):
    port = free_port()
    pf = PrivatePostfix(
        main_cf=f"""\
myhostname = backend.postfix.test
mydomain = postfix.test
mydestination =
smtpd_peername_lookup = no
disable_vrfy_command = {request.param}
virtual_mailbox_domains = example.com
virtual_mailbox_base = {{base}}/vmail
virtual_mailbox_maps = texthash:{{etc}}/vmailbox
virtual_uid_maps = static:{_postfix_ids()[0]}
virtual_gid_maps = static:{_postfix_ids()[1]}
""",
        master_cf=f"127.0.0.1:{port} inet n - n - - smtpd\n",
        files={"vmailbox": "john@example.com example.com/john/\njane@example.com example.com/jane/\n"})
    vmail = pf.base / "vmail"
    vmail.mkdir()
    shutil.chown(vmail, "postfix", "postfix")
    try:
        pf.start()
        pf.wait_port(port)
        pf.port, pf.vrfy_disabled, pf.vmail = port, request.param == "yes", vmail
        yield pf
    finally:
        pf.stop()


def _postfix_ids() -> tuple[int, int]:
    entry = pwd.getpwnam("postfix")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def gateway(backend, tmp_path):
    port = free_port()
    cfg = gateway_config(tmp_path / "gateway.cfg", {"GatewayBindAddress": GATEWAY_IP, "GatewayTimeout": "5",
                                                    "GatewayCachePositiveTtl": "0",
                                                    "GatewayCacheNegativeTtl": "0"})
    server = Twistd(tmp_path, ["--config", str(cfg), "--smtp", f"tcp:{port}:interface=127.0.0.1",
                               "--relay-host", f"127.0.0.1:{backend.port}"], port)
    yield server
    server.stop()


def maildir(backend, user: str) -> list[bytes]:
    new = backend.vmail / "example.com" / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def test_the_backend_sees_the_gateway_at_one_address(backend, gateway):
    since = len(backend.log())
    subject = f"through the gateway {uuid.uuid4().hex[:8]}"
    with smtplib.SMTP("127.0.0.1", gateway.port, source_address=("127.0.0.3", 0), timeout=30) as c:
        c.ehlo("client.test")
        assert c.mail("sender@outside.test")[0] == 250
        # nobody first: Postfix answers VRFY about an unknown user with 550,
        # about a known one with 252, after which the gateway's connection
        # asks with its RCPT probe only.
        code, text = c.rcpt("nobody@example.com")
        assert (code, text[:5]) == (550, b"5.1.1")  # refused at RCPT: never accept-then-bounce
        assert c.rcpt("john@example.com")[0] == 250
        long_line = "L" * 1200  # accepted by the gateway, folded for Postfix
        assert c.data(f"Subject: {subject}\r\n\r\nHello from outside.\r\n{long_line}\r\n".encode())[0] == 250
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(subject.encode() in m for m in maildir(backend, "john")):
        time.sleep(0.1)
    [message] = [m for m in maildir(backend, "john") if subject.encode() in m]
    # Postfix's trace names the gateway at its one address; the gateway's
    # own trace, below it, names the client.
    assert re.search(rb"Received: from gw\.example\.com \(unknown \[127\.0\.0\.2\]\)\n\tby backend", message), message
    assert b"Received: from client.test ([127.0.0.3])\n\tby gw.example.com with ESMTP" in message
    assert message.endswith(b"Hello from outside.\n" + b"L" * 998 + b"\n " + b"L" * 202 + b"\n")
    # Postfix logs (through postlogd) after it delivers: poll for the
    # delivery's log line before reading the log.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "status=sent (delivered to maildir)" not in backend.log()[since:]:
        time.sleep(0.1)
    log = backend.log()[since:]
    clients = re.findall(r"postfix/smtpd\[\d+\]: connect from [^\[\s]*\[([^\]]+)\]", log)
    assert len(clients) >= 2, log  # the recipient probes and the relay queue's delivery
    assert set(clients) == {GATEWAY_IP}, log
    assert re.search(rf": client=unknown\[{re.escape(GATEWAY_IP)}\]", log), log  # the mail itself
    how = "RCPT" if backend.vrfy_disabled else "VRFY"
    assert re.search(rf"NOQUEUE: reject: {how} from unknown\[{re.escape(GATEWAY_IP)}\]: 550 5\.1\.1 "
                     r"<nobody@example\.com>", log), log
    assert re.search(r"status=sent \(delivered to maildir\)", log), log
