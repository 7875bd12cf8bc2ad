"""The greeting delay end to end: a real ``twistd -n mailguard``, real
sockets bound to different loopback source addresses (one in the exception
group, the others not), the Maildir and the security log on disk.

No wall-clock bounds: what must happen "at once" is shown against a delay
far longer than the sockets' timeout (a server that held the client would
time the read out), and being held is shown by the early talker's refusal.
The delay's length itself is measured on a ``task.Clock``
(``tests/unit/smtpd/test_greeting.py``).
"""

from __future__ import annotations

import smtplib
import socket
import time
from pathlib import Path

from tests.conftest import write_config

DELAY = 1.0
LONG_DELAY = 60  # seconds: far longer than any read below may take
SOCKET_TIMEOUT = 10.0
MESSAGE = b"Subject: waited\r\nFrom: a@sender.test\r\n\r\nI waited.\r\n"


def read_reply(sock: socket.socket) -> bytes:
    """Read until a final reply line ("NNN " ...CRLF) or EOF."""
    data = b""
    while True:
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def wait_for_lines(path: Path, expected: set[str], clients: set[str], timeout: float = 10.0) -> list[list[str]]:
    """The security log lines about C{clients}, once there is one about
    each C{expected} address (the log is written from a thread; events are
    written in order, so a line about an earlier client would already be
    there).  Lines about other addresses are left out: the fixture's
    readiness probe from 127.0.0.1 hangs up before the greeting, and is
    rightly logged as a "gave-up"."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        mine = [f for f in (line.split("\t") for line in lines) if f[2] in clients]
        if {f[2] for f in mine} >= expected or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_delay_exemption_early_talker_and_give_up(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {
        "SmtpGreetingDelay": str(LONG_DELAY),
        "SmtpGreetingDelayExceptions": "NoDelay",  # 127.0.0.4
    })
    server = twistd(config=cfg)
    seclog = server.spool / "security.log"

    # In the exception group: greeted at once (within the socket timeout,
    # a sixth of the delay), and ordinary SMTP follows.
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.4", 0), timeout=SOCKET_TIMEOUT) as c:
        assert c.ehlo("client.test")[0] == 250
        c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
    [delivered] = server.maildir_files("john@example.com")
    assert b"I waited." in delivered.read_bytes()

    # An early talker: held (so its bytes come before the greeting), cut
    # off at once with 554 5.7.1, then the server closes.
    with socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT,
                                  source_address=("127.0.0.5", 0)) as s:
        s.sendall(b"EHLO bot.test\r\nMAIL FROM:<spam@bot.test>\r\n")
        reply = read_reply(s)
        assert reply.startswith(b"554 5.7.1 ")
        assert s.recv(100) == b""  # closed

    # A client that gives up while held.
    s = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT,
                                 source_address=("127.0.0.6", 0))
    s.close()

    lines = wait_for_lines(seclog, {"127.0.0.5", "127.0.0.6"}, {"127.0.0.4", "127.0.0.5", "127.0.0.6"})
    events = {(line[1], line[2]) for line in lines}
    assert events == {("early-talker", "127.0.0.5"), ("gave-up", "127.0.0.6")}, lines
    talker = next(line for line in lines if line[1] == "early-talker")
    assert talker[5] == r"first=b'EHLO bot.test\r\nMAIL FROM:<spam@bot.test>\r\n'"
    gave_up = next(line for line in lines if line[1] == "gave-up")
    assert gave_up[4].startswith("waited=") and float(gave_up[4].split("=")[1]) >= 0
    assert talker[0].endswith("Z")


def test_teaser_with_a_real_client_and_security_log_option(twistd, tmp_path):
    """A compliant client (smtplib) reads the multi-line 220 and sends mail;
    a bot that answers the first line is cut off and logged where
    --security-log says."""
    cfg = write_config(tmp_path / "mailserver.cfg", {
        "SmtpGreetingDelay": "1",
        "SmtpGreetingTeaser": "1",
    })
    seclog = tmp_path / "logs" / "attacks.log"
    server = twistd("--security-log", str(seclog), config=cfg)

    with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                  source_address=("127.0.0.5", 0)) as s:
        first = s.recv(100)
        assert first == b"220-mx.example.com ESMTP\r\n"
        s.sendall(b"EHLO bot.test\r\n")
        rest = read_reply(s)
        assert rest.startswith(b"554 5.7.1 ")

    # A compliant client reads the whole 220 (after the delay) and sends.
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        assert c.ehlo("client.test")[0] == 250
        c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
    [delivered] = server.maildir_files("john@example.com")
    assert b"I waited." in delivered.read_bytes()

    [line] = wait_for_lines(seclog, {"127.0.0.5"}, {"127.0.0.3", "127.0.0.5"})
    assert line[1:3] == ["early-talker", "127.0.0.5"]
    assert not (server.spool / "security.log").exists()
