"""Interop with real clients: ``swaks`` and Python's ``smtplib`` against a
running ``twistd -n mailguard``, on loopback only.

Clients bind to 127.0.0.3, an untrusted source: whatever relaying they do,
they do because they authenticated.  The relay test runs a second mailguard
as the ``--relay-host`` back-end, so an authenticated relay is followed all
the way to the back-end's Maildir.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.certs import make_certs
from tests.conftest import Twistd, eventually, free_port, wait_for_port
from tests.helpers_context import CRAM_MD5, write_config

CLIENT_IP = "127.0.0.3"
SECRETS = ["john-secret", "jane-secret", "sam-secret", "am9obi1zZWNyZXQ=",  # base64 of john-secret
           "AGpvaG5AZXhhbXBsZS5jb20Aam9obi1zZWNyZXQ="]  # AUTH PLAIN blob for john


def backend_config(path: Path) -> Path:
    """The back-end: elsewhere.test with one user."""
    path.write_text("""<?xml version="1.0" encoding="UTF-8"?>
<config>
  <variable name="InternetHostname">backend.elsewhere.test</variable>
  <variable name="SmtpGreetingDelay">0</variable>
  <list name="Domain"><listitem><variable name="Domain">elsewhere.test</variable></listitem></list>
  <list name="User">
    <listitem><variable name="Name">someone</variable><variable name="Domain">elsewhere.test</variable><variable name="Enabled">1</variable></listitem>
  </list>
</config>
""")
    return path


@pytest.fixture
def servers(tmp_path):
    """mailguard with TLS on all three listeners, relaying to a back-end
    mailguard; the default SASL mechanisms (no CRAM-MD5)."""
    yield from start_servers(tmp_path)


@pytest.fixture
def cram_servers(tmp_path):
    """The same with SmtpAuthCramMd5Enabled=1."""
    yield from start_servers(tmp_path, CRAM_MD5)


def start_servers(tmp_path, variables=None):
    started: list[Twistd] = []
    try:
        yield _start_servers(tmp_path, variables, started)
    finally:  # also when the front server fails to start: no process left behind
        for s in started:
            s.stop()


def _start_servers(tmp_path, variables, started: list[Twistd]) -> Twistd:
    back_dir = tmp_path / "backend"
    back_dir.mkdir()
    back_port = free_port()
    backend = Twistd(back_dir, ["--config", str(backend_config(back_dir / "mailserver.cfg")),
                                "--smtp", f"tcp:{back_port}:interface=127.0.0.1"], back_port)
    started.append(backend)
    front_dir = tmp_path / "front"
    front_dir.mkdir()
    certs = make_certs(front_dir / "certs")
    port, smtps, submission = free_port(), free_port(), free_port()
    front = Twistd(front_dir, [
        "--config", str(write_config(front_dir / "mailserver.cfg", variables)),
        "--smtp", f"tcp:{port}:interface=127.0.0.1",
        "--smtps", f"tcp:{smtps}:interface=127.0.0.1",
        "--submission", f"tcp:{submission}:interface=127.0.0.1",
        "--tls-cert", certs.cert, "--tls-key", certs.key,
        "--relay-host", f"127.0.0.1:{back_port}"], port)
    started.append(front)
    wait_for_port("127.0.0.1", smtps, front.proc)
    wait_for_port("127.0.0.1", submission, front.proc)
    front.smtps, front.submission, front.certs, front.backend = smtps, submission, certs, backend
    return front


def swaks(*args: str, port: int) -> subprocess.CompletedProcess:
    exe = shutil.which("swaks")
    assert exe, "swaks is not installed (.ci/run installs it)"
    return subprocess.run(
        [exe, "--server", f"127.0.0.1:{port}", "--local-interface", CLIENT_IP, "--ehlo", "client.test",
         "--timeout", "20", *args],
        capture_output=True, text=True, timeout=90)


def replies(transcript: str) -> list[str]:
    """The server's reply lines in a swaks transcript, whatever swaks marks
    them with ("<-" plain, "<~" inside TLS, "*" for an error)."""
    return re.findall(r"^<[-~*]{1,2}\*?\s+(\d{3}[ -].*)$", transcript, re.M)


def assert_no_secrets(server: Twistd) -> None:
    log = server.output()
    for secret in SECRETS:
        assert secret not in log


def test_swaks_starttls_auth_plain_relays_to_the_backend(servers):
    r = swaks("--tls", "--tls-verify", "--tls-ca-path", servers.certs.ca,
              "--auth", "PLAIN", "--auth-user", "john@example.com", "--auth-password", "john-secret",
              "--from", "john@example.com", "--to", "someone@elsewhere.test",
              "--header", "Subject: relayed by swaks", port=servers.port)
    assert r.returncode == 0, r.stdout + r.stderr
    got = replies(r.stdout)
    assert "220 2.0.0 Ready to start TLS" in got
    assert "235 2.7.0 Authentication successful" in got
    assert "250 2.1.5 Recipient OK" in got
    assert any(line.startswith("250 2.0.0 Ok: queued as") for line in got)
    delivered = eventually(lambda: servers.backend.maildir_files("someone@elsewhere.test"))
    assert delivered, servers.output()
    data = delivered[0].read_bytes()
    assert b"Subject: relayed by swaks" in data
    assert b"with ESMTPSA id" in data  # mailguard's Received header travelled along
    assert_no_secrets(servers)


def test_swaks_without_auth_cannot_relay(servers):
    r = swaks("--tls", "--from", "john@example.com", "--to", "someone@elsewhere.test", port=servers.port)
    assert r.returncode != 0
    assert "554 5.7.1 Relay access denied" in replies(r.stdout)


def test_swaks_auth_login_local_delivery(servers):
    r = swaks("--tls", "--auth", "LOGIN", "--auth-user", "jane", "--auth-password", "jane-secret",
              "--from", "jane@example.com", "--to", "john@example.com", port=servers.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in replies(r.stdout)
    assert b"with ESMTPSA id" in servers.maildir_files("john@example.com")[0].read_bytes()


def test_swaks_wrong_password_is_535(servers):
    r = swaks("--tls", "--auth", "PLAIN", "--auth-user", "john@example.com", "--auth-password", "wrong",
              "--from", "john@example.com", "--to", "john@example.com", port=servers.port)
    assert r.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in replies(r.stdout)


def test_swaks_plain_auth_refused_without_tls(servers):
    r = swaks("--auth", "PLAIN", "--auth-user", "john@example.com", "--auth-password", "john-secret",
              "--from", "john@example.com", "--to", "john@example.com", port=servers.port)
    assert r.returncode != 0  # PLAIN is not advertised before STARTTLS
    assert not [line for line in replies(r.stdout) if line.startswith("235")]  # (a port number may hold "235")


def test_swaks_cram_md5_without_tls(cram_servers):
    r = swaks("--auth", "CRAM-MD5", "--auth-user", "john@example.com", "--auth-password", "john-secret",
              "--from", "john@example.com", "--to", "jane@example.com", port=cram_servers.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in replies(r.stdout)
    assert b"with ESMTPA id" in cram_servers.maildir_files("jane@example.com")[0].read_bytes()


def test_swaks_cram_md5_refused_by_default(servers):
    r = swaks("--auth", "CRAM-MD5", "--auth-user", "john@example.com", "--auth-password", "john-secret",
              "--from", "john@example.com", "--to", "jane@example.com", port=servers.port)
    assert r.returncode != 0
    assert "AUTH" not in "".join(line for line in replies(r.stdout) if line.startswith("250"))
    assert servers.maildir_files("jane@example.com") == []


def test_swaks_tls_on_connect_smtps(servers):
    r = swaks("--tls-on-connect", "--auth", "PLAIN", "--auth-user", "sam@example.com",
              "--auth-password", "sam-secret", "--from", "sam@example.com", "--to", "john@example.com",
              port=servers.smtps)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "STARTTLS" not in r.stdout  # not offered inside TLS
    assert len(servers.maildir_files("john@example.com")) == 1


def test_swaks_submission_needs_auth(servers):
    r = swaks("--tls", "--from", "john@example.com", "--to", "jane@example.com", port=servers.submission)
    assert r.returncode != 0
    assert "530 5.7.0 Authentication required" in replies(r.stdout)
    r = swaks("--tls", "--auth", "PLAIN", "--auth-user", "john@example.com", "--auth-password", "john-secret",
              "--from", "john@example.com", "--to", "jane@example.com", port=servers.submission)
    assert r.returncode == 0, r.stdout + r.stderr


def test_swaks_pipelining(servers):
    r = swaks("--pipeline", "--from", "a@sender.test", "--to", "john@example.com,jane@example.com",
              port=servers.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PIPELINING" in r.stdout
    assert len(servers.maildir_files("john@example.com")) == 1
    assert len(servers.maildir_files("jane@example.com")) == 1


def test_swaks_pipelining_with_refused_recipient_in_order(servers):
    r = swaks("--pipeline", "--from", "a@sender.test", "--to", "nobody@example.com,john@example.com",
              port=servers.port)
    codes = [line[:3] for line in replies(r.stdout) if line[3] == " "]
    # greeting, EHLO, MAIL, RCPT nobody, RCPT john, DATA, end of data, QUIT: in order
    assert codes == ["220", "250", "250", "550", "250", "354", "250", "221"], r.stdout


def test_smtplib_starttls_login_and_relay(servers):
    context = ssl.create_default_context(cafile=servers.certs.ca)
    with smtplib.SMTP("127.0.0.1", servers.port, source_address=(CLIENT_IP, 0), timeout=20) as c:
        c.starttls(context=context)
        c.login("john", "john-secret")
        assert c.sendmail("john@example.com", ["someone@elsewhere.test", "jane@example.com"],
                          b"Subject: smtplib\r\n\r\nhello\r\n") == {}
    assert eventually(lambda: servers.backend.maildir_files("someone@elsewhere.test"))
    assert len(servers.maildir_files("jane@example.com")) == 1
    assert_no_secrets(servers)


def test_smtplib_helo_client(servers):
    with smtplib.SMTP("127.0.0.1", servers.port, source_address=(CLIENT_IP, 0), timeout=20) as c:
        code, text = c.helo("old.client.test")
        assert (code, text) == (250, b"mx.example.com")
        assert c.sendmail("a@sender.test", ["john@example.com"], b"Subject: helo\r\n\r\nhi\r\n") == {}
    assert b" with SMTP id " in servers.maildir_files("john@example.com")[0].read_bytes()


def test_smtplib_wrong_password_sees_535(servers):
    """smtplib tries every advertised mechanism with a wrong password: the
    session answers 535 to each rather than closing at once."""
    context = ssl.create_default_context(cafile=servers.certs.ca)
    with smtplib.SMTP("127.0.0.1", servers.port, source_address=(CLIENT_IP, 0), timeout=30) as c:
        c.starttls(context=context)
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("john", "wrong")
        assert e.value.smtp_code == 535
