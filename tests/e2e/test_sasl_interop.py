"""SASL with real clients on the wire (issue 10, item 3): each client picks
its mechanism itself from what mailguard offers, with the default
configuration (``SmtpAuthCramMd5Enabled=0``), on each listener that
offers AUTH -- the plain listener after STARTTLS, submission after
STARTTLS, and smtps -- as a user whose password is Kerio's ``SHA:`` hash
and as one whose password is Kerio's ``D3S:`` form (what a real
``users.cfg`` holds).

The clients: a private Postfix instance (``postfix -c DIR``) relaying
through mailguard with ``smtp_sasl_auth_enable = yes`` and Postfix's
default mechanism choice (no ``smtp_sasl_mechanism_filter``); Twisted's
``ESMTPSenderFactory`` with ``requireAuthentication`` and
``requireTransportSecurity``; Python's smtplib; swaks with ``--auth`` and
no mechanism named.  Every client connects from 127.0.0.3 (untrusted).

Each test asserts the mechanism the client chose, as mailguard logged it
(the ``auth`` event: ``mechanism=... result=ok user=...``), that no attempt failed first (a
failed attempt counts toward ``SmtpMaxAuthFailures``), and that the
message reached the Maildir from an authenticated session (``ESMTPSA``).
The matrix observed is in docs/protocol.md ("Interop with real clients").
"""

from __future__ import annotations

import re
import shutil
import smtplib
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mailguard.policy.passwords import make_d3s_password
from tests.certs import make_certs
from tests.conftest import ROOT, USERS, Twistd, free_port, wait_for_port, write_config
from tests.postfix import PrivatePostfix

CLIENT_IP = "127.0.0.3"
# (address, password): one stored as a SHA: hash, one in the D3S: form
SHA_USER = ("sam@example.com", "sam-secret")
D3S_USER = ("dora@example.com", "dora-secret")
USER_IDS = {SHA_USER: "sha", D3S_USER: "d3s"}
LISTENERS = ["smtp", "submission", "smtps"]
# Where each listener's mail goes (all local to mailguard): one mailbox per
# listener, so a delivery is found by its Subject in one Maildir.
RCPT = {"smtp": "jane@example.com", "submission": "john@example.com", "smtps": "john@example.net"}
CRAM_RCPT = "jane@example.net"  # Postfix sends it to the CRAM-MD5 mailguard's submission listener
MAILBOX = {"smtp": "jane@example.com", "submission": "john@example.com", "smtps": "john@example.com"}
AUTH_LINE = re.compile(r"auth session=\w+ ip=127\.0\.0\.3 mechanism=([A-Z0-9-]+) result=ok user=(\S+)")


def auth_failed(user: str, mechanism: str, n: int = 1) -> re.Pattern:
    return re.compile(rf"auth session=\w+ ip=127\.0\.0\.3 mechanism={mechanism} result=failed "
                      rf"user={re.escape(user)} failures={n}\b")


def start_mailguard(tmp: Path, variables=None) -> Twistd:
    certs = make_certs(tmp / "certs")
    users = USERS + (("dora", "example.com", make_d3s_password(D3S_USER[1]), True),)
    cfg = write_config(tmp / "mailserver.cfg", variables, users=users)
    ports = {name: free_port() for name in LISTENERS}
    server = Twistd(tmp, ["--config", str(cfg), "--tls-cert", certs.cert, "--tls-key", certs.key,
                          *(a for name in LISTENERS for a in (f"--{name}", f"tcp:{ports[name]}:interface=127.0.0.1"))],
                    ports["smtp"])
    for port in ports.values():
        wait_for_port("127.0.0.1", port, server.proc)
    server.ports, server.certs = ports, certs
    return server


@pytest.fixture(scope="module")
def mg(tmp_path_factory):
    """mailguard as shipped (CRAM-MD5 off) with TLS on its three listeners;
    users: john and jane (plain text), sam (SHA:), dora (D3S:)."""
    server = start_mailguard(tmp_path_factory.mktemp("mailguard"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mg_cram(tmp_path_factory):
    """The same with SmtpAuthCramMd5Enabled=1: what the issue found."""
    server = start_mailguard(tmp_path_factory.mktemp("mailguard-cram"), {"SmtpAuthCramMd5Enabled": "1"})
    yield server
    server.stop()


class Watch:
    """What mailguard logged and stored from now on."""

    def __init__(self, server: Twistd) -> None:
        self.server = server
        self.offset = len(server.output())

    def log(self) -> str:
        return self.server.output()[self.offset:]

    def delivered(self, mailbox: str, subject: str, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in self.server.maildir_files(mailbox):
                data = path.read_bytes()
                if f"Subject: {subject}\r\n".encode() in data:
                    return data
            time.sleep(0.1)
        raise AssertionError(f"no message {subject!r} for {mailbox}:\n{self.log()[-3000:]}")

    def mechanism(self, user: str, timeout: float = 10.0) -> str:
        """The mechanism of the one successful AUTH logged, after no failed one."""
        deadline = time.monotonic() + timeout
        while True:
            found = AUTH_LINE.findall(self.log())
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "result=failed" not in self.log()
        assert [who for _, who in found] == [user], self.log()[-3000:]
        return found[0][0]


def check_delivery(data: bytes, secret: str) -> None:
    received = data[data.index(b"Received:"):].split(b";")[0]
    assert b" with ESMTPSA id " in received  # TLS and AUTH
    assert b"([127.0.0.3])" in received
    assert secret.encode() not in data


def subject(client: str, listener: str, user: str) -> str:
    return f"{client} {listener} {user} {uuid.uuid4().hex[:8]}"


# --- Python's smtplib ----------------------------------------------------------------


@pytest.mark.parametrize("user", [SHA_USER, D3S_USER], ids=USER_IDS.get)
@pytest.mark.parametrize("listener", LISTENERS)
def test_smtplib(mg, listener, user):
    """smtplib.login() tries CRAM-MD5, PLAIN, LOGIN in that order, among
    what is offered."""
    name, password = user
    watch, subj = Watch(mg), subject("smtplib", listener, name)
    context = ssl.create_default_context(cafile=mg.certs.ca)
    port = mg.ports[listener]
    if listener == "smtps":
        client = smtplib.SMTP_SSL("127.0.0.1", port, source_address=(CLIENT_IP, 0), timeout=20, context=context)
    else:
        client = smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT_IP, 0), timeout=20)
    with client as c:
        c.ehlo("smtplib.client.test")
        if listener != "smtps":
            assert not c.has_extn("auth")  # nothing offered in plain text
            c.starttls(context=context)
            c.ehlo("smtplib.client.test")
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert c.login(name, password)[0] == 235
        assert c.sendmail(name, [RCPT[listener]], f"Subject: {subj}\r\n\r\nhi\r\n".encode()) == {}
    check_delivery(watch.delivered(MAILBOX[listener], subj), password)
    assert watch.mechanism(name) == "PLAIN"


# --- swaks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("user", [SHA_USER, D3S_USER], ids=USER_IDS.get)
@pytest.mark.parametrize("listener", LISTENERS)
def test_swaks(mg, listener, user):
    """swaks --auth with no mechanism named picks one of those offered."""
    name, password = user
    watch, subj = Watch(mg), subject("swaks", listener, name)
    tls = ["--tls-on-connect"] if listener == "smtps" else ["--tls"]
    r = subprocess.run(
        [shutil.which("swaks") or "swaks", "--server", f"127.0.0.1:{mg.ports[listener]}",
         "--local-interface", CLIENT_IP, "--ehlo", "swaks.client.test", "--timeout", "20", *tls,
         "--tls-verify", "--tls-ca-path", mg.certs.ca, "--auth", "--auth-user", name, "--auth-password", password,
         "--from", name, "--to", RCPT[listener], "--header", f"Subject: {subj}"],
        capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    check_delivery(watch.delivered(MAILBOX[listener], subj), password)
    assert watch.mechanism(name) == "LOGIN"


# --- Twisted's ESMTPSenderFactory ----------------------------------------------------------


@pytest.mark.parametrize("user", [SHA_USER, D3S_USER], ids=USER_IDS.get)
@pytest.mark.parametrize("listener", LISTENERS)
def test_twisted_esmtp_sender(mg, listener, user):
    """requireAuthentication and requireTransportSecurity: STARTTLS (or
    smtps), then AUTH with the first of CRAM-MD5, LOGIN, PLAIN offered."""
    name, password = user
    watch = Watch(mg)
    mode = "smtps" if listener == "smtps" else "starttls"
    r = subprocess.run([sys.executable, "-m", "tests.e2e.twisted_sender", str(mg.ports[listener]), mode,
                        mg.certs.ca, name, password, name, RCPT[listener]],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and r.stdout.strip() == "sent", r.stdout + r.stderr
    check_delivery(watch.delivered(MAILBOX[listener], f"twisted {mode} {name}"), password)
    assert watch.mechanism(name) == "LOGIN"


# --- Postfix's SASL client -----------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix(mg, mg_cram):
    """A Postfix that relays everything to mailguard with SASL and TLS.
    Its relayhost is mailguard's submission listener; per recipient,
    transport_maps sends mail to the listener under test (smtps through a
    wrapper-mode smtp client).  smtp_sender_dependent_authentication picks
    the account by envelope sender.  Its own smtpd (127.0.0.1) takes the
    test's message from smtplib."""
    port, ports = free_port(), mg.ports
    pf = PrivatePostfix(
        main_cf=f"""\
myhostname = client.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
relayhost = [127.0.0.1]:{ports['submission']}
transport_maps = texthash:{{etc}}/transport
smtp_bind_address = {CLIENT_IP}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{{etc}}/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sender_dependent_authentication = yes
smtp_tls_security_level = encrypt
smtp_connection_cache_on_demand = no
""",
        master_cf=f"""\
127.0.0.1:{port} inet n - n - - smtpd
smtps     unix  -       -       n       -       -       smtp
  -o smtp_tls_wrappermode=yes
  -o smtp_tls_security_level=encrypt
""",
        files={
            "transport": f"{RCPT['submission']} smtp:[127.0.0.1]:{ports['submission']}\n"
                         f"{RCPT['smtp']} smtp:[127.0.0.1]:{ports['smtp']}\n"
                         f"{RCPT['smtps']} smtps:[127.0.0.1]:{ports['smtps']}\n"
                         f"{CRAM_RCPT} smtp:[127.0.0.1]:{mg_cram.ports['submission']}\n",
            "sasl_passwd": "".join(f"{u} {u}:{p}\n" for u, p in (SHA_USER, D3S_USER)),
        })
    try:
        pf.start()
        pf.wait_port(port)
        pf.port = port
        yield pf
    finally:
        pf.stop()


def postfix_send(postfix: PrivatePostfix, user: str, rcpt: str, subj: str, port: int):
    """Inject a message into Postfix; return Postfix's log line for its
    delivery attempt to mailguard at C{port} (status, and why)."""
    since = len(postfix.log())
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=20) as c:
        c.ehlo("injector.test")
        assert c.sendmail(user, [rcpt], f"Subject: {subj}\r\n\r\nvia Postfix\r\n".encode()) == {}
    return postfix.wait_log(rf"to=<{re.escape(rcpt)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                            rf"{port},.* status=(\w+) \((.*)\)$", since=since)


@pytest.mark.parametrize("user", [SHA_USER, D3S_USER], ids=USER_IDS.get)
@pytest.mark.parametrize("listener", LISTENERS)
def test_postfix_relays_through_mailguard(mg, postfix, listener, user):
    """Postfix with its default mechanism choice: the message is queued in
    Postfix, relayed to mailguard with SASL, and lands in the Maildir;
    Postfix logs status=sent with mailguard's 250."""
    name, password = user
    watch, subj = Watch(mg), subject("postfix", listener, name)
    sent = postfix_send(postfix, name, RCPT[listener], subj, mg.ports[listener])
    assert sent.group(1) == "sent", sent.group(0)
    assert "250 2.0.0 Ok: queued as" in sent.group(2)
    check_delivery(watch.delivered(MAILBOX[listener], subj), password)
    assert watch.mechanism(name) == "PLAIN"
    assert "SASL authentication failed" not in sent.string


# --- with CRAM-MD5 turned on: why it is off by default -------------------------------------
#
# Postfix and Twisted take CRAM-MD5 whenever it is offered and do not fall
# back; CRAM-MD5 needs the password itself, which a SHA: hash is not.


def test_cram_on_postfix_defers_a_sha_user_and_relays_a_d3s_user(mg_cram, postfix):
    watch = Watch(mg_cram)
    failed = postfix_send(postfix, SHA_USER[0], CRAM_RCPT, subject("postfix", "cram", "sha"),
                          mg_cram.ports["submission"])
    assert failed.group(1) == "deferred", failed.group(0)
    assert "SASL authentication failed; server 127.0.0.1[127.0.0.1] said: 535 5.7.8" in failed.group(2)
    assert auth_failed(SHA_USER[0], "CRAM-MD5").search(watch.log()), watch.log()
    watch = Watch(mg_cram)
    subj = subject("postfix", "cram", "d3s")
    sent = postfix_send(postfix, D3S_USER[0], CRAM_RCPT, subj, mg_cram.ports["submission"])
    assert sent.group(1) == "sent", sent.group(0)
    check_delivery(watch.delivered("jane@example.com", subj), D3S_USER[1])
    assert watch.mechanism(D3S_USER[0]) == "CRAM-MD5"


def test_cram_on_twisted_fails_a_sha_user_and_takes_cram_md5_for_a_d3s_user(mg_cram):
    def run(user):
        return subprocess.run([sys.executable, "-m", "tests.e2e.twisted_sender", str(mg_cram.ports["submission"]),
                               "starttls", mg_cram.certs.ca, *user, user[0], "john@example.com"],
                              cwd=str(ROOT), capture_output=True, text=True, timeout=90)

    watch = Watch(mg_cram)
    r = run(SHA_USER)
    assert r.returncode == 1 and "535 5.7.8" in r.stdout, r.stdout + r.stderr
    assert auth_failed(SHA_USER[0], "CRAM-MD5").search(watch.log()) and "result=ok" not in watch.log()
    watch = Watch(mg_cram)
    r = run(D3S_USER)
    assert r.returncode == 0, r.stdout + r.stderr
    check_delivery(watch.delivered("john@example.com", f"twisted starttls {D3S_USER[0]}"), D3S_USER[1])
    assert watch.mechanism(D3S_USER[0]) == "CRAM-MD5"


def test_cram_on_smtplib_gets_a_sha_user_through_only_after_a_failure(mg_cram):
    context = ssl.create_default_context(cafile=mg_cram.certs.ca)
    watch = Watch(mg_cram)
    with smtplib.SMTP("127.0.0.1", mg_cram.ports["submission"], source_address=(CLIENT_IP, 0), timeout=30) as c:
        c.starttls(context=context)
        c.ehlo("smtplib.client.test")
        assert c.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]
        assert c.login(*SHA_USER)[0] == 235
    log = watch.log()
    failed, ok = auth_failed(SHA_USER[0], "CRAM-MD5").search(log), AUTH_LINE.search(log)
    assert failed and ok and failed.start() < ok.start(), log
    assert ok.groups() == ("PLAIN", SHA_USER[0])
