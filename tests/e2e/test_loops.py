"""Mail loops end to end (``SmtpHopCountLimit``, default 50): a message with
60 ``Received:`` fields is refused on the wire, and two real mailguards
that relay to each other by mistake stop a message after 50 hops and
bounce it to its sender, instead of passing it back and forth until its
queue lifetime runs out.

    client 127.0.0.2 --> A (example.com) --relay--> B (remote.test) --relay--> A --> ...

Each trusts the other's source address (127.0.0.1) and names the other as
its ``--relay-host``; ``loop.test`` is local to neither.
"""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import GROUPS, Twistd, eventually, free_port, write_config
from tests.unit.store.world import parse_report


def received(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.test by relay%d.test; Mon, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i)
                    for i in range(n))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two mailguards, each the other's relay host and trusting it (one
    pair for the module: the tests use different mailboxes)."""
    tmp_path = tmp_path_factory.mktemp("loop")
    a_port, b_port = free_port(), free_port()
    trusted = (*GROUPS, ("Trusted", "127.0.0.1"))  # 127.0.0.2 (the client) and the other server
    started = []
    for name, port, other, domain, host in (("a", a_port, b_port, "example.com", "mx.example.com"),
                                            ("b", b_port, a_port, "remote.test", "backend.test")):
        home = tmp_path / name
        home.mkdir()
        # short retries: a hop that fails now and then still ends in seconds
        cfg = write_config(home / "mailserver.cfg", {"InternetHostname": host, "QueueRetryMin": "1",
                                                     "QueueRetryMax": "2"}, groups=trusted)
        cfg.write_text(cfg.read_text().replace("example.com", domain).replace("example.net", f"{name}.example.net"))
        started.append(Twistd(home, ["--config", str(cfg), "--smtp", f"tcp:{port}:interface=127.0.0.1",
                                     "--relay-host", f"127.0.0.1:{other}"], port))
    yield started
    for server in started:
        server.stop()


def test_sixty_received_fields_are_refused_on_the_wire(pair):
    a, _ = pair
    with smtplib.SMTP("127.0.0.1", a.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        c.ehlo("client.test")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("a@sender.test", ["jane@example.com"], received(60) + b"Subject: loop\r\n\r\nagain\r\n")
        assert refused.value.smtp_code == 554
        assert refused.value.smtp_error == b"5.4.6 Too many hops (Received header fields): mail loop"
        # the session goes on: the next message is taken
        assert c.sendmail("a@sender.test", ["jane@example.com"], received(3) + b"Subject: ok\r\n\r\nfine\r\n") == {}
    [stored] = a.maildir_files("jane@example.com")
    assert stored.read_bytes().endswith(b"fine\r\n")
    assert eventually(lambda: ' ip=127.0.0.3 command=DATA code=554 status=5.4.6 reason="Too many hops (Received header '
                    'fields): mail loop" helo=client.test from=a@sender.test detail="mail loop: at least 60 Received '
                    'header fields (SmtpHopCountLimit 50)"' in a.output())


def test_two_servers_relaying_to_each_other_stop_the_loop_and_bounce(pair):
    a, b = pair
    with smtplib.SMTP("127.0.0.1", a.port, source_address=("127.0.0.2", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert c.sendmail("john@example.com", ["x@loop.test"], b"Subject: round and round\r\n\r\nloop\r\n") == {}
    # The 51st transaction (A receiving a message with 50 Received fields)
    # is refused; B, whose delivery failed, bounces to the sender: the
    # bounce goes to A, where john@example.com is local.
    assert eventually(lambda: a.maildir_files("john@example.com")), (a.output()[-2000:], b.output()[-2000:])
    [bounce] = a.maildir_files("john@example.com")
    msg, parts, per_message, [r] = parse_report(bounce.read_bytes())
    assert (r["Final-Recipient"], r["Action"], r["Status"]) == ("rfc822; x@loop.test", "failed", "5.4.6")
    assert r["Diagnostic-Code"].startswith("smtp; 554 5.4.6 Too many hops")
    returned = parts[2].as_bytes() if parts[2].get_content_type() == "text/rfc822-headers" else \
        parts[2].get_payload()[0].as_bytes()
    assert returned.count(b"Received: from ") == 50  # as B had it: 50 hops, not one more
    # Nothing circles any more: both queues drain, and A logged the loop.
    assert eventually(lambda: not list((a.spool / "queue" / "active").iterdir())
                    and not list((b.spool / "queue" / "active").iterdir()))
    assert ' ip=127.0.0.1 command=DATA code=554 status=5.4.6 ' in a.output()
    assert 'from=john@example.com detail="mail loop: at least 50 Received header fields' in a.output()
    assert "Traceback" not in a.output() + b.output()
