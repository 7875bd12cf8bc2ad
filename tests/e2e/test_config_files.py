"""Real Kerio files and dangerous configurations against a real ``twistd``.

The 20,000-user file is generated in the real shape (``tests/realshape.py``):
settings in sections, D3S: passwords in users.cfg, 50 domains, a 2,000-row
IP group.  Its start-up time is measured by ``bench/bench_config.py``, not
asserted here.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import subprocess

import pytest

from mailguard import check
from tests.certs import make_certs
from tests.conftest import ROOT, TWISTD, Twistd, free_port, write_config
from tests.realshape import mailserver_cfg, password_of, users_cfg

CLIENT_IP = "127.0.0.3"  # not in any IP group: trusted only by AUTH


def test_open_relay_group_refuses_to_start(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", groups=[("Trusted", "0.0.0.0/0")])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([TWISTD, "--pidfile", "", "-n", "mailguard", "--config", str(cfg),
                          "--spool", str(tmp_path / "spool"), "--smtp", f"tcp:{free_port()}:interface=127.0.0.1"],
                         env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "Traceback" not in text
    problems = [line for line in text.splitlines() if str(cfg) in line]
    assert len(problems) == 1, text
    assert problems[0].endswith(
        f'{cfg}:7: the relay IP group "Trusted" covers all of IPv4: this is an open relay (anyone may send '
        "mail anywhere through this server); narrow the group, or set RelayControlOpenRelayIntended to 1 "
        "if that is really meant")
    assert not (tmp_path / "spool").exists()  # refused before doing anything


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    mailserver_cfg(tmp / "mailserver.cfg", domains=50, ip_rows=2000, settings={
        "InternetHostname": ("Global", "mx.d0.example"),
        "SmtpGreetingDelay": ("SmtpServer", "0"),
        "VRFYEnabled": ("SmtpServer", "1"),
        "RelayControlIpGroupEnabled": (None, "1"),
        "RelayControlIpGroup": (None, "Trusted")})
    users_cfg(tmp / "users.cfg", users=20000, domains=50, nul_every=1000)
    return tmp


def test_check_summarises_the_real_shape_file(real_files, capsys):
    assert check.main(["check", str(real_files / "mailserver.cfg")]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = out.out.splitlines()
    for line in ["hostname: mx.d0.example", "users: 20000 (20000 enabled, 0 disabled)",
                 "passwords of enabled users:", "  D3S: (Kerio's reversible form): 19980",
                 "  NUL: (no password): 20", "  Big: 2000 entries", "VRFY: enabled (trusted clients only)"]:
        assert line in lines, line
    assert lines[2].count(".example") == 51
    assert password_of("user1") not in out.out


def test_twistd_starts_on_the_real_shape_file_and_d3s_users_log_in(real_files):
    certs = make_certs(real_files / "certs")
    port = free_port()
    server = Twistd(real_files, ["--config", str(real_files / "mailserver.cfg"),
                                 "--smtp", f"tcp:{port}:interface=127.0.0.1",
                                 "--tls-cert", certs.cert, "--tls-key", certs.key], port)
    try:
        context = ssl.create_default_context(cafile=certs.ca)
        with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT_IP, 0), timeout=30) as c:
            c.starttls(context=context)
            c.login("user12345@d45.example", password_of("user12345"))
            # Authenticated: trusted to relay.
            assert c.sendmail("user12345@d45.example", ["someone@elsewhere.test"],
                              b"Subject: d3s\r\n\r\nhello\r\n") == {}
        for user, password in [("user12345@d45.example", password_of("user12346")),
                               ("user1000@d0.example", "NUL:"),  # NUL: never authenticates
                               ("user1000@d0.example", "")]:
            with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT_IP, 0), timeout=30) as c:
                c.starttls(context=context)
                c.ehlo()
                c.user, c.password = user, password
                with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                    c.auth("PLAIN", c.auth_plain)  # one attempt: no failure delay to wait out
                assert e.value.smtp_code == 535
    finally:
        server.stop()
    log = server.output()
    assert "Traceback" not in log
    assert "pw-user" not in log  # no decoded password is ever logged
