"""End to end: a real ``twistd -n mailguard`` process, real smtplib clients
bound to loopback source addresses, and the Maildir on disk."""

from __future__ import annotations

import smtplib

from tests.conftest import write_config

MESSAGE = b"Subject: hello\r\nFrom: a@sender.test\r\n\r\nHello John.\r\n.leading dot\r\n"


def test_delivers_to_maildir(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg")
    server = twistd(config=cfg)
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        code, banner = c.ehlo("client.test")
        assert code == 250
        c.sendmail("a@sender.test", ["john@example.com"], MESSAGE)
    files = server.maildir_files("john@example.com")
    assert len(files) == 1
    data = files[0].read_bytes()
    assert data.startswith(b"Return-Path: <a@sender.test>\r\nReceived: from client.test ([127.0.0.3])")
    assert b"Hello John.\r\n.leading dot\r\n" in data
    assert b"Twisted" not in data


def test_alias_delivers_once_per_mailbox(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg")
    server = twistd(config=cfg)
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        c.sendmail("a@sender.test", ["sales@example.net", "JOHN@example.com"], MESSAGE)
    assert len(server.maildir_files("john@example.com")) == 1
    assert len(server.maildir_files("jane@example.com")) == 1


def test_unknown_recipient_refused(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg")
    server = twistd(config=cfg)
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        c.ehlo("client.test")
        c.mail("a@sender.test")
        code, msg = c.rcpt("nobody@example.com")
        assert (code, msg[:5]) == (550, b"5.1.1")
        code, msg = c.rcpt("someone@elsewhere.test")
        assert (code, msg[:5]) == (554, b"5.7.1")


def test_runs_on_embedded_default(twistd, tmp_path):
    server = twistd()  # no --config: the embedded example
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:  # 127.0.0.1 is exempt
        code, text = c.ehlo("client.test")
        assert code == 250
        assert text.startswith(b"mail.example.com")
