"""Issue 11's attacks on the wire: real sockets against a real ``twistd -n
mailguard``, one test per attack, named after it (as aiosmtpd's
``test_smtpsmuggling.py``).  Each failed on the code before the defence
(``fe8142e``) and passes now.  Clients bind loopback source addresses:
127.0.0.3 is the attacker, 127.0.0.5 a legitimate client, 127.0.0.2 the
relay IP group.  No timing is asserted: a slow sender is "cut off" when
the server closes on it while it still has bytes to send.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.certs import make_certs
from tests.conftest import ROOT, Twistd, free_port, write_config
from tests.e2e.test_queue import Backend
from tests.unit.store.world import World, parse_report

ATTACKER = "127.0.0.3"
LEGIT = "127.0.0.5"
TRUSTED = "127.0.0.2"
MESSAGE = b"From: a@sender.test\r\nTo: john@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def dial(server, ip: str = ATTACKER, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout, source_address=(ip, 0))
    return s


def reply(s: socket.socket) -> bytes:
    """One whole reply, or b"" if the server closed."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def greeted(server, ip: str = ATTACKER) -> socket.socket:
    s = dial(server, ip)
    assert reply(s).startswith(b"220 ")
    return s


def seclog(server, event: str, want: int = 1, timeout: float = 10.0) -> list[list[str]]:
    """The security log's lines of C{event} once there are C{want} (it is
    written from a thread, a moment after)."""
    path = server.spool / "security.log"
    deadline = time.monotonic() + timeout
    while True:
        lines = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
        found = [line for line in lines if line[1] == event]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def tls_client(server, certs, ip: str) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", server.port, source_address=(ip, 0), timeout=30)
    c.starttls(context=ssl.create_default_context(cafile=certs.ca))
    c.ehlo("client.test")
    return c


# --- a client that never reads its replies --------------------------------------------------


def test_never_reading_client_cannot_grow_the_server(twistd, tmp_path):
    server = twistd(config=write_config(tmp_path / "mailserver.cfg"))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(LEGIT, 0)) as c:  # warm up
        c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
    before = peak = rss_kb(server.proc.pid)
    attacker = greeted(server)
    attacker.setblocking(False)
    flood, sent, stop = b"EHLO x\r\n" * 8192, [0], threading.Event()

    def pipeline():  # as fast as the server takes it, for a few seconds; never a reply read
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                sent[0] += attacker.send(flood)
            except BlockingIOError:
                time.sleep(0.005)
        stop.set()

    delivered = []

    def legitimate():
        with smtplib.SMTP("127.0.0.1", server.port, source_address=(LEGIT, 0), timeout=30) as c:
            for n in range(20):
                delivered.append(c.sendmail("a@sender.test", ["john@example.com"], MESSAGE))

    threads = [threading.Thread(target=pipeline), threading.Thread(target=legitimate)]
    for t in threads:
        t.start()
    while not stop.wait(0.05):
        peak = max(peak, rss_kb(server.proc.pid))
    for t in threads:
        t.join(60)
    attacker.close()
    assert sent[0] > 1_000_000  # it did pipeline (the kernel's buffers, then backpressure)
    # Before the defence: 30 MB and more in these few seconds (53 -> 410 MB in 60 s).
    assert peak - before < 8 * 1024, (before, peak)
    assert delivered == [{}] * 20 and len(server.maildir_files("john@example.com")) == 21


# --- password guessing over many connections ---------------------------------------------------


def test_auth_brute_force_from_parallel_connections_is_limited_per_address(twistd, tmp_path):
    certs = make_certs(tmp_path)
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpMaxAuthFailuresPerIp": "5"})
    server = twistd("--tls-cert", certs.cert, "--tls-key", certs.key, config=cfg)

    def guesses(n: int) -> list[int]:
        codes = []
        with tls_client(server, certs, ATTACKER) as c:
            for k in range(3):
                c.user, c.password = "john", f"guess-{n}-{k}"
                try:
                    c.auth("PLAIN", c.auth_plain, initial_response_ok=True)
                    codes.append(235)
                except smtplib.SMTPAuthenticationError as e:
                    codes.append(e.smtp_code)
        return codes

    with ThreadPoolExecutor(10) as pool:
        answered = sum(pool.map(guesses, range(10)), [])
    # 30 guesses from 10 connections: 5 answered, the rest refused unchecked.
    assert answered.count(535) == 5 and answered.count(454) == 25, answered
    with tls_client(server, certs, TRUSTED) as c:  # the relay IP group is not locked out
        assert c.login("john", "john-secret")[0] == 235
    failed = seclog(server, "auth-failed", 5)
    assert [(f[2], f[4], f[5]) for f in failed] == [(ATTACKER, "mechanism=PLAIN", "user=john")] * 5
    assert [f[2:5] for f in seclog(server, "auth-lockout")][0][0] == ATTACKER
    assert "guess-" not in (server.spool / "security.log").read_text()  # never a password
    # fail2ban reads these lines with the filter in contrib/.
    out = subprocess.run(["fail2ban-regex", "-v", str(server.spool / "security.log"),
                          str(ROOT / "contrib" / "fail2ban" / "mailguard.conf")],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"Lines: \d+ lines, 0 ignored, 6 matched", out), out
    assert out.count(ATTACKER) >= 1 and "127.0.0.2" not in out


# --- harvesting recipients ----------------------------------------------------------------------


def test_harvest_of_unknown_recipients_is_cut_off(twistd, tmp_path):
    server = twistd(config=write_config(tmp_path / "mailserver.cfg", {"SmtpMaxErrors": "3"}))
    s = greeted(server)
    s.sendall(b"EHLO x\r\nMAIL FROM:<a@sender.test>\r\n"
              + b"".join(b"RCPT TO:<guess%d@example.com>\r\n" % n for n in range(200)))
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    codes = re.findall(rb"^(\d{3}) ", out, re.M)
    assert codes == [b"250", b"250", b"550", b"550", b"550", b"421"], out  # not 200 x 550


def test_harvest_past_the_recipient_limit_is_cut_off(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpMaxRecipients": "2", "SmtpMaxErrors": "3",
                                                     "SmtpRecipientOvershootLimit": "10"})
    server = twistd(config=cfg)
    s = greeted(server)
    s.sendall(b"EHLO x\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<john@example.com>\r\n"
              + b"RCPT TO:<jane@example.com>\r\n" * 9000)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    codes = re.findall(rb"^(\d{3}) ", out, re.M)
    assert codes == [b"250"] * 4 + [b"452"] * 13 + [b"421"], codes[:20]  # not 9,000 x 452


def test_harvest_over_many_sessions_locks_the_address_out(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpMaxErrors": "3", "SmtpMaxErrorsPerIp": "10"})
    server = twistd(config=cfg)
    for session in range(10):
        s = dial(server)
        first = reply(s)
        if first.startswith(b"421 4.7.0"):
            break
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@sender.test>\r\n"
                  + b"".join(b"RCPT TO:<s%dr%d@example.com>\r\n" % (session, n) for n in range(10)))
        while s.recv(65536):
            pass
        s.close()
    assert first.startswith(b"421 4.7.0") and session <= 3, (session, first)
    assert seclog(server, "error-limit", 2)[0][4] == "errors=10"
    assert greeted(server, TRUSTED)  # the relay IP group is exempt


# --- slow senders ---------------------------------------------------------------------------------


def trickle(s: socket.socket, data: bytes, every: float) -> tuple[int, bytes]:
    """Send C{data} an octet at a time; how many were sent when the
    server closed, and what it said."""
    s.settimeout(every)
    for i in range(len(data)):
        try:
            s.send(data[i:i + 1])
            got = s.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            return i, b""
        if got.startswith(b"421") or not got:
            return i, got
    return len(data), b""


def test_slow_sender_in_data_is_cut_off(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpIdleTimeout": "2", "SmtpMaxSessionTime": "0"})
    server = twistd(config=cfg)
    s = greeted(server)
    for command in (b"EHLO x", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<john@example.com>", b"DATA"):
        s.sendall(command + b"\r\n")
        assert reply(s)[:1] in b"23"
    # Each octet comes well within the 2 s idle time: before the defence,
    # every one restarted it and the message took as long as it liked.
    sent, said = trickle(s, b"x" * 80 + b"\r\n.\r\n", every=0.25)
    assert said.startswith(b"421 4.4.2") and sent < 80, (sent, said)
    assert server.maildir_files("john@example.com") == []


def test_slow_command_line_is_cut_off(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpIdleTimeout": "2", "SmtpMaxSessionTime": "0"})
    server = twistd(config=cfg)
    s = greeted(server)
    sent, said = trickle(s, b"EHLO " + b"x" * 60 + b"\r\n", every=0.25)
    assert said.startswith(b"421 4.4.2") and sent < 60, (sent, said)


# --- rate limits ---------------------------------------------------------------------------------


def test_connection_flood_from_one_address_is_refused(twistd, tmp_path):
    server = twistd(config=write_config(tmp_path / "mailserver.cfg", {"SmtpConnectionRateLimit": "5"}))
    firsts = []
    for _ in range(8):
        s = dial(server)
        firsts.append(reply(s)[:9])
        s.close()
    assert firsts == [b"220 mx.ex"] * 5 + [b"421 4.7.0"] * 3
    assert len(seclog(server, "connection-rate", 3)) == 3
    for _ in range(3):  # the relay IP group is exempt
        assert greeted(server, TRUSTED)


def test_message_flood_from_one_address_is_refused(twistd, tmp_path):
    server = twistd(config=write_config(tmp_path / "mailserver.cfg", {"SmtpMessageRateLimit": "3"}))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=(ATTACKER, 0), timeout=10) as c:
        for _ in range(3):
            c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
        try:
            c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
            refused = None
        except (smtplib.SMTPSenderRefused, smtplib.SMTPServerDisconnected) as e:
            refused = e
    assert isinstance(refused, smtplib.SMTPSenderRefused) and refused.smtp_code == 421, refused
    assert len(server.maildir_files("john@example.com")) == 3
    assert seclog(server, "message-rate")[0][2] == ATTACKER


def test_descriptor_exhaustion_keeps_trusted_clients_and_refuses_the_rest_aloud(twistd, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpMaxConnectionsPerIp": "0"})
    server = twistd("--smtp", f"tcp:{port}:interface=127.0.0.1:backlog=1024", config=cfg, port=port, nofile=400)
    held, firsts = [], []
    try:
        for _ in range(450):  # more than the process may open
            s = dial(server, timeout=20)
            held.append(s)
            firsts.append(reply(s)[:9])
        with smtplib.SMTP("127.0.0.1", port, source_address=(TRUSTED, 0), timeout=20) as c:
            assert c.sendmail("a@sender.test", ["john@example.com"], MESSAGE) == {}
    finally:
        for s in held:
            s.close()
    greeted_n, refused_n = firsts.count(b"220 mx.ex"), firsts.count(b"421 4.7.0")
    # Before: about 390 greeted, then EMFILE: the rest, the trusted client
    # included, closed without a word, and a log line for each.
    assert greeted_n + refused_n == 450 and 0 < greeted_n < 400, (greeted_n, refused_n)
    log = server.output()
    assert log.count("SmtpMaxConnections is 10000 but the open-file limit") == 1
    assert log.count("EMFILE") <= 1


# --- sending as someone else ----------------------------------------------------------------------


def test_sender_spoofing_after_login_is_refused(twistd, tmp_path):
    certs = make_certs(tmp_path)
    server = twistd("--tls-cert", certs.cert, "--tls-key", certs.key,
                    config=write_config(tmp_path / "mailserver.cfg"))
    with tls_client(server, certs, LEGIT) as c:
        c.login("john", "john-secret")
        assert c.mail("jane@example.com") == (553, b"5.7.1 Sender address rejected: not owned by the "
                                                   b"authenticated user")
        c.rset()
        assert c.mail("john@example.net")[0] == 250  # his own, in the alias domain


# --- NUL in message data ---------------------------------------------------------------------------


def test_nul_in_message_data_is_refused(twistd, tmp_path):
    server = twistd(config=write_config(tmp_path / "mailserver.cfg"))
    s = greeted(server)
    for command in (b"EHLO x", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<john@example.com>", b"DATA"):
        s.sendall(command + b"\r\n")
        assert reply(s)[:1] in b"23"
    s.sendall(b"Subject: x\r\n\r\nbefore\x00after\r\n.\r\n")
    assert reply(s).startswith(b"554 5.6.0")
    s.sendall(b"NOOP\r\n")
    assert reply(s).startswith(b"250 ")
    assert server.maildir_files("john@example.com") == []


# --- a hostile address that got past the checks ---------------------------------------------------


def test_relay_queue_never_injects_a_command(tmp_path):
    """A queued recipient holding CRLF (made past the configuration checks,
    straight into the spool) is never written to the next hop."""
    world = World(tmp_path)  # the spool and mailserver.cfg in tmp_path
    world.accept(relay=("x@remote.test", "y@remote.test>\r\nRCPT TO:<injected@evil.test"))
    backend = Backend(tmp_path, free_port())
    port = free_port()
    server = Twistd(tmp_path, ["--config", str(tmp_path / "mailserver.cfg"), "--relay-host",
                               f"127.0.0.1:{backend.port}", "--smtp", f"tcp:{port}:interface=127.0.0.1"], port)
    try:
        [(envelope, _)] = backend.wait(1)
        deadline = time.monotonic() + 20
        while not server.maildir_files("john@example.com") and time.monotonic() < deadline:
            time.sleep(0.05)
        [bounce] = server.maildir_files("john@example.com")
    finally:
        server.stop()
        backend.stop()
    assert envelope["to"] == ["x@remote.test"]  # not injected@evil.test
    _, _, _, rcpts = parse_report(bounce.read_bytes())
    assert [r["Status"] for r in rcpts] == ["5.5.4"]


def test_the_fail2ban_jail_and_filter_load(tmp_path):
    """contrib/fail2ban/ as an administrator installs it: fail2ban reads the
    jail and the filter (its own configuration beside them)."""
    import shutil

    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    shutil.copy(ROOT / "contrib" / "fail2ban" / "mailguard.conf", conf / "filter.d" / "mailguard.conf")
    log = tmp_path / "security.log"
    log.write_text("")
    jail = (ROOT / "contrib" / "fail2ban" / "jail.d-mailguard.local").read_text()
    assert "logpath  = /var/lib/mailguard/security.log" in jail  # the spool of contrib/systemd's unit
    (conf / "jail.d" / "mailguard.local").write_text(jail.replace("/var/lib/mailguard/security.log", str(log)))
    dump = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True, text=True,
                          check=True).stdout
    assert "['add', 'mailguard', 'auto']" in dump
    assert f"['set', 'mailguard', 'addlogpath', '{log}', 'head']" in dump
    assert "(?:auth-failed|auth-lockout|error-limit)" in dump and "['start', 'mailguard']" in dump
