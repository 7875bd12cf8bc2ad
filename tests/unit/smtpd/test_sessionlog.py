"""The session's log lines and counters: one event per thing that
happened, every line of a session tied by its id, every 4xx/5xx logged
once with its codes, AUTH results without the password."""

from __future__ import annotations

import re

import pytest

from mailguard import replies as R
from mailguard.logs import record_of
from mailguard.testing import LogCapture, b64, connect
from tests.helpers_context import make_context

SID = re.compile(r"^[0-9a-f]{12}$")


def records(logs: LogCapture) -> list[dict]:
    """The mailguard events captured, as the JSON observer writes them."""
    out = []
    for e in logs.events:
        if "mg_line" in e:
            r = record_of(e)
            for k in ("time", "level", "system"):
                r.pop(k)
            out.append(r)
    return out


def one(recs, event, **match):
    found = [r for r in recs if r["event"] == event and all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (event, match, recs)
    return found[0]


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, {"MaxMessageSize": "200", "SmtpMaxErrors": "2"})


def test_a_full_session_is_tied_by_one_session_id_and_one_queue_id(ctx):
    with LogCapture() as logs:
        s = connect(ctx, client_ip="127.0.0.3", client_port=40001)
        s.cmd("EHLO client.test")
        s.cmd("MAIL FROM:<a@sender.test>")
        assert s.codes(s.cmd("RCPT TO:<nobody@example.com>")) == ["550 5.1.1"]
        s.cmd("RCPT TO:<john@example.com>")
        s.cmd("RCPT TO:<jane@example.com>")
        s.cmd("DATA")
        out = s.send("Subject: hi\r\n\r\nHello.\r\n.\r\n")
        queued = re.search(rb"queued as (\S+)", out).group(1).decode()
        s.cmd("QUIT")
        ctx.clock.advance(3)
        s.lose()
    recs = records(logs)
    assert [r["event"] for r in recs] == ["connect", "reject", "accepted", "disconnect"]
    sid = recs[0]["session"]
    assert SID.match(sid) and all(r["session"] == sid for r in recs)
    assert recs[0] == {"event": "connect", "session": sid, "ip": "127.0.0.3", "port": 40001,
                       "listener": "smtp", "greeting": "off"}
    assert recs[1] == {"event": "reject", "session": sid, "ip": "127.0.0.3", "command": "RCPT", "code": 550,
                       "status": "5.1.1", "reason": R.UNKNOWN_USER.text, "helo": "client.test",
                       "from": "a@sender.test", "to": "nobody@example.com",
                       "detail": recs[1]["detail"]}
    assert "unknown" in recs[1]["detail"]
    assert recs[2] == {"event": "accepted", "session": sid, "ip": "127.0.0.3", "queue": queued,
                       "from": "a@sender.test", "to": ("john@example.com", "jane@example.com"),
                       "size": len(b"Subject: hi\r\n\r\nHello.\r\n"), "tls": False, "helo": "client.test"}
    assert recs[3] == {"event": "disconnect", "session": sid, "ip": "127.0.0.3", "duration": 3.0,
                       "outcome": "greeted", "commands": 7, "refusals": 1, "messages": 1}
    text = logs.text()
    assert re.search(rf"^accepted session={sid} ip=127\.0\.0\.3 queue={queued} from=a@sender\.test "
                     r"to=john@example\.com,jane@example\.com size=23 tls=no helo=client\.test$", text, re.M)
    stats = ctx.stats
    assert (stats.messages_accepted, stats.bytes_accepted) == (1, 23)
    assert stats.connections["greeted"] == 1
    assert stats.refusals[("RCPT", 550, "5.1.1")] == 1
    assert stats.commit_seconds.count == 1


def test_two_sessions_have_two_ids(ctx):
    with LogCapture() as logs:
        connect(ctx).lose()
        connect(ctx).lose()
    ids = {r["session"] for r in records(logs)}
    assert len(ids) == 2


@pytest.mark.parametrize("steps, reply, command", [
    (["MAIL FROM:<a@b.test> SIZE=1000"], R.MESSAGE_TOO_BIG, "MAIL"),
    (["MAIL FROM:<a@b.test>", "RCPT TO:<john@example.com>", "DATA", "x" * 300 + "\r\n."], R.MESSAGE_TOO_BIG,
     "DATA"),
    (["MAIL FROM:<a b@c@d>"], R.BAD_SENDER_SYNTAX, "MAIL"),
    (["BOGUS"], R.UNKNOWN_COMMAND, "UNKNOWN"),
    (["EHLO"], R.SYNTAX_ERROR.with_text("EHLO requires a domain"), "EHLO"),
    (["RCPT TO:<john@example.com>"], R.NEED_MAIL, "RCPT"),
    (["MAIL FROM:<a@b.test>", "RCPT TO:<x@elsewhere.test>"], R.RELAY_DENIED, "RCPT"),
])
def test_every_refusal_is_logged_once_with_its_codes(ctx, steps, reply, command):
    s = connect(ctx)
    s.cmd("EHLO client.test")
    with LogCapture() as logs:
        out = b"".join(s.cmd(step) for step in steps)
    assert f"{reply.code} {reply.status}" in s.codes(out)
    [rec] = [r for r in records(logs) if r["event"] == "reject"]
    assert (rec["command"], rec["code"], rec["status"], rec["reason"]) == (command, reply.code, reply.status,
                                                                            reply.text)
    assert ctx.stats.refusals[(command, reply.code, reply.status)] == 1


def test_a_refused_message_is_counted_by_reason(ctx):
    s = connect(ctx)
    s.cmd("EHLO client.test")
    s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n" + "x" * 300 + "\r\n.\r\n")
    s.cmd("DATA")  # no transaction: a sequence error refuses no message
    assert dict(ctx.stats.messages_refused) == {"too_big": 1}
    assert ctx.stats.messages_accepted == 0


def test_too_many_errors_is_logged_with_the_421(ctx):
    s = connect(ctx)
    with LogCapture() as logs:
        for _ in range(3):
            s.cmd("BOGUS")
        s.lose()
    recs = records(logs)
    rejects = [(r["code"], r["status"]) for r in recs if r["event"] == "reject"]
    assert rejects == [(500, "5.5.2"), (500, "5.5.2"), (421, "4.7.0")]
    assert one(recs, "disconnect")["refusals"] == 3


def test_idle_timeout_is_logged_as_timeout(ctx):
    s = connect(ctx)
    s.cmd("EHLO client.test")
    with LogCapture() as logs:
        ctx.clock.advance(ctx.config.idle_timeout)
        s.lose()
    rec = one(records(logs), "reject")
    assert (rec["command"], rec["code"], rec["status"], rec["reason"]) == ("timeout", 421, "4.4.2",
                                                                           R.TIMEOUT.text)


def test_bare_lf_in_data_is_logged_once(ctx):
    s = connect(ctx)
    s.cmd("EHLO client.test")
    with LogCapture() as logs:
        s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
        s.send("bad\nline\r\n.\r\n")
    rec = one(records(logs), "reject")
    assert (rec["command"], rec["code"], rec["status"]) == ("DATA", 554, "5.6.0")
    assert ctx.stats.messages_refused["bare_line_ending"] == 1


@pytest.fixture
def delayed(tmp_path):
    return make_context(tmp_path, {"SmtpGreetingDelay": "25", "SmtpGreetingDelayExceptions": "NoDelay",
                                   "SmtpMaxConnectionsPerIp": "1"})


def test_held_connections_early_talkers_and_those_that_give_up(delayed):
    ctx = delayed
    with LogCapture() as logs:
        talker = connect(ctx, client_ip="127.0.0.5", client_port=1)
        ctx.clock.advance(2)
        talker.send("EHLO bot\r\n")
        talker.lose()
        quitter = connect(ctx, client_ip="127.0.0.6", client_port=2)
        ctx.clock.advance(5)
        quitter.lose()
        exempt = connect(ctx, client_ip="127.0.0.4", client_port=3)
        exempt.lose()
    recs = records(logs)
    t = [r for r in recs if r["ip"] == "127.0.0.5"]
    assert [r["event"] for r in t] == ["connect", "reject", "disconnect"]
    assert (t[0]["greeting"], t[0]["delay"]) == ("delayed", 25.0)
    assert (t[1]["command"], t[1]["code"], t[1]["status"], t[1]["detail"]) == ("CONNECT", 554, "5.7.1",
                                                                               "waited 2.00 s")
    assert (t[2]["outcome"], t[2]["duration"]) == ("early-talker", 2.0)
    q = [r for r in recs if r["ip"] == "127.0.0.6"]
    assert [r["event"] for r in q] == ["connect", "disconnect"]
    assert (q[1]["outcome"], q[1]["duration"]) == ("gave-up", 5.0)
    e = [r for r in recs if r["ip"] == "127.0.0.4"]
    assert e[0]["greeting"] == "exempt" and "delay" not in e[0]
    assert ctx.stats.connections == {"greeted": 1, "early_talker": 1, "gave_up": 1, "limit": 0}


def test_a_connection_refused_by_a_limit(delayed):
    ctx = delayed
    first = connect(ctx, client_ip="127.0.0.7")
    with LogCapture() as logs:
        second = connect(ctx, client_ip="127.0.0.7", client_port=2)
        second.lose()
    recs = records(logs)
    assert [r["event"] for r in recs] == ["connect", "reject", "disconnect"]
    assert "greeting" not in recs[0]
    assert (recs[1]["code"], recs[1]["status"]) == (421, "4.7.0")
    assert recs[2]["outcome"] == "limit"
    assert ctx.stats.connections["limit"] == 1
    first.lose()


def test_the_pass_cache_shows_in_the_connect_line(tmp_path):
    ctx = make_context(tmp_path, {"SmtpGreetingDelay": "25", "SmtpGreetingPassCacheTtl": "600"})
    s = connect(ctx, client_ip="127.0.0.9")
    ctx.clock.advance(25)
    s.cmd("EHLO client.test")
    s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
    s.send("Subject: x\r\n\r\ny\r\n.\r\n")
    s.lose()
    with LogCapture() as logs:
        connect(ctx, client_ip="127.0.0.9").lose()
    assert records(logs)[0]["greeting"] == "cached"


def test_auth_results_name_the_user_never_the_password(tmp_path):
    from tests.helpers_context import CRAM_MD5
    from tests.unit.smtpd.test_auth_tls import TLS, plain, tls_session

    ctx = make_context(tmp_path, CRAM_MD5, tls=TLS)  # tls_session expects CRAM-MD5 offered too
    with LogCapture() as logs:
        s = tls_session(ctx)
        s.cmd("AUTH PLAIN " + plain("john@example.com", "wrong-password-xyz"))
        ctx.clock.advance(1)
        s.cmd("AUTH PLAIN " + plain("john@example.com", "john-secret"))
        s.lose()
    recs = [r for r in records(logs) if r["event"] == "auth"]
    assert [(r["mechanism"], r["result"], r["user"], r.get("failures")) for r in recs] == [
        ("PLAIN", "failed", "john@example.com", 1), ("PLAIN", "ok", "john@example.com", None)]
    text = logs.text()
    for secret in ("wrong-password-xyz", "john-secret", b64("wrong-password-xyz"),
                   plain("john@example.com", "john-secret")):
        assert secret not in text
    assert ctx.stats.auth == {"success": 1, "failure": 1, "error": 0}
    rejects = [r for r in records(logs) if r["event"] == "reject"]
    assert [(r["command"], r["code"]) for r in rejects] == [("AUTH", 535)]
