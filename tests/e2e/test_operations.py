"""Seeing and steering a real ``twistd -n mailguard``: the log lines of a
full session (text and JSON), ``/metrics`` scraped over HTTP while
sessions run, and ``python -m mailguard queue`` against a running
server with a real next hop (the aiosmtpd back-end of test_queue)."""

from __future__ import annotations

import json
import os
import re
import smtplib
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GROUPS, ROOT, free_port, write_config
from tests.e2e.test_queue import Backend, send, wait_for


def session_lines(text: str, sid: str) -> list[str]:
    return [line for line in text.splitlines() if f"session={sid}" in line]


def test_e2e_a_session_in_the_text_log_tied_by_session_and_queue_ids(twistd, tmp_path):
    """grep session=ID gives the whole session; grep queue=ID its message,
    from acceptance to the relay's reply."""
    backend = Backend(tmp_path, free_port())
    try:
        server = twistd("--relay-host", f"127.0.0.1:{backend.port}",
                        config=write_config(tmp_path / "mailserver.cfg"))
        with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
            port = c.sock.getsockname()[1]
            c.ehlo("client.test")
            c.mail("john@example.com")
            assert c.rcpt("nobody@example.com")[0] == 550
            assert c.rcpt("x@remote.test")[0] == 250
            code, text = c.data(b"Subject: logged\r\n\r\nhello\r\n")
            queued = re.search(rb"queued as (\S+)", text).group(1).decode()
        backend.wait(1)
        assert wait_for(lambda: f"queue={queued} to=x@remote.test" in server.output()
                        and "disconnect session=" in server.output())
    finally:
        backend.stop()
    log = server.output()
    [connect] = [line for line in log.splitlines() if f"ip=127.0.0.2 port={port} " in line]
    sid = re.search(r"session=(\w+)", connect).group(1)
    lines = session_lines(log, sid)
    events = [re.search(r"\] (\S+) session=", line).group(1) for line in lines]
    assert events == ["connect", "reject", "accepted", "disconnect"]
    assert re.search(r'reject session=\w+ ip=127\.0\.0\.2 command=RCPT code=550 status=5\.1\.1 '
                     r'reason="Recipient address rejected: user unknown" helo=client\.test '
                     r'from=john@example\.com to=nobody@example\.com', lines[1])
    assert f"accepted session={sid} ip=127.0.0.2 queue={queued} from=john@example.com to=x@remote.test " \
           f"size=" in lines[2]
    assert re.search(r"disconnect session=\w+ ip=127\.0\.0\.2 duration=[\d.]+ outcome=greeted commands=6 "
                     r"refusals=1 messages=1$", lines[3])
    queue_lines = [line for line in log.splitlines() if f"queue={queued} " in line]
    assert len(queue_lines) == 2
    assert re.search(rf'relay queue={queued} to=x@remote\.test relay=127\.0\.0\.1 result=sent status=2\.0\.0 '
                     r'reply="smtp; 250 2\.0\.0 OK" attempts=1 delay=[\d.]+$', queue_lines[1])
    assert not [line for line in lines + queue_lines if "'" in line.split("] ", 1)[1]]  # no Python reprs


def test_e2e_the_json_log_of_a_full_session(twistd, tmp_path):
    """twistd --logger mailguard.logs.jsonLogger: one JSON object per line."""
    out = tmp_path / "log.json"
    server = twistd(config=write_config(tmp_path / "mailserver.cfg", {"MaxMessageSize": "1000"}),
                    twistd_args=("--logger", "mailguard.logs.jsonLogger"), stdout=out)
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0), timeout=10) as c:
        port = c.sock.getsockname()[1]
        c.ehlo("json.test")
        c.mail("a@sender.test")
        c.rcpt("john@example.com")
        c.rcpt("jane@example.com")
        code, text = c.data(b"Subject: json\r\n\r\n" + b"x" * 100 + b"\r\n")
        queued = re.search(rb"queued as (\S+)", text).group(1).decode()
        c.mail("a@sender.test")
        c.rcpt("john@example.com")
        assert c.data((b"y" * 80 + b"\r\n") * 30)[0] == 552

    def mine():
        records = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses
        return records, [r for r in records if r.get("ip") == "127.0.0.3"]

    assert wait_for(lambda: any(r["event"] == "disconnect" for r in mine()[1]))
    records, mine = mine()
    sid = mine[0]["session"]
    assert all(r["session"] == sid and r["level"] == "info" and r["time"].endswith("Z") for r in mine)
    assert [r["event"] for r in mine] == ["connect", "accepted", "reject", "disconnect"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time", "level", "system")}  # noqa: E731
    assert strip(mine[0]) == {"event": "connect", "session": sid, "ip": "127.0.0.3", "port": port,
                              "listener": "smtp", "greeting": "off"}
    assert strip(mine[1]) == {"event": "accepted", "session": sid, "ip": "127.0.0.3", "queue": queued,
                              "from": "a@sender.test", "to": ["john@example.com", "jane@example.com"],
                              "size": 119, "tls": False, "helo": "json.test"}
    assert strip(mine[2]) == {"event": "reject", "session": sid, "ip": "127.0.0.3", "command": "DATA",
                              "code": 552, "status": "5.3.4",
                              "reason": "Message size exceeds fixed maximum message size",
                              "helo": "json.test", "from": "a@sender.test"}
    d = strip(mine[3])
    assert d.pop("duration") >= 0
    assert d == {"event": "disconnect", "session": sid, "ip": "127.0.0.3", "outcome": "greeted",
                 "commands": 9, "refusals": 1, "messages": 1}
    others = [r for r in records if "event" not in r]
    assert others and all(isinstance(r["text"], str) for r in others)  # Twisted's own lines


def test_e2e_the_syslog_logger_is_loadable_by_twistd(twistd, tmp_path):
    """twistd --logger mailguard.logs.syslogLogger starts and serves (what
    it writes needs a syslog daemon; its format is tested in
    tests/unit/test_logs.py)."""
    server = twistd(config=write_config(tmp_path / "mailserver.cfg"),
                    twistd_args=("--logger", "mailguard.logs.syslogLogger"))
    assert send(server, "a@sender.test", ["john@example.com"], b"Subject: s\r\n\r\nx\r\n", "127.0.0.3") == {}


# --- metrics -------------------------------------------------------------------------------

def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def test_e2e_metrics_move_while_sessions_run(twistd, tmp_path):
    mport = free_port()
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpGreetingDelay": "30",
                                                     "SmtpGreetingDelayExceptions": "NoDelay"},
                       groups=GROUPS + (("NoDelay", "127.0.0.2"),))  # 127.0.0.3 is held
    relay_port = free_port()  # nothing listens: relayed mail waits in the queue
    server = twistd("--metrics", f"tcp:{mport}:interface=127.0.0.1", "--relay-host", f"127.0.0.1:{relay_port}",
                    config=cfg)
    m = scrape(mport)
    assert m[("mailguard_messages_accepted_total",)] == 0
    assert m[("mailguard_connections_held",)] == 0
    assert m[("mailguard_queue_messages",)] == 0
    held = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.3", 0))
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.4", 0), timeout=10) as c:
        c.ehlo("client.test")
        assert wait_for(lambda: scrape(mport)[("mailguard_connections_held",)] == 1)
        m = scrape(mport)
        assert m[("mailguard_sessions",)] == 1
        assert m[("mailguard_connections_total", ("outcome", "greeted"))] == 1
        c.mail("john@example.com")
        c.rcpt("john@example.com")
        assert c.rcpt("x@elsewhere.test")[0] == 554  # 127.0.0.4 is not trusted
        c.data(b"Subject: m\r\n\r\n" + b"z" * 500 + b"\r\n")
    held.sendall(b"EHLO early\r\n")  # an early talker
    assert held.recv(100).startswith(b"554")
    held.close()
    send(server, "john@example.com", ["r@remote.test"], b"Subject: q\r\n\r\nqueued\r\n")  # 127.0.0.2: trusted
    assert wait_for(lambda: scrape(mport)[("mailguard_relay_deliveries_total", ("result", "deferred"))] >= 1)
    m = scrape(mport)
    assert m[("mailguard_connections_held",)] == 0
    assert m[("mailguard_connections_total", ("outcome", "early_talker"))] == 1
    assert m[("mailguard_connections_total", ("outcome", "greeted"))] == 2
    assert m[("mailguard_messages_accepted_total",)] == 2
    assert m[("mailguard_accepted_bytes_total",)] > 500
    assert m[("mailguard_relay_denied_total",)] == 1
    assert m[("mailguard_refusals_total", ("code", "554"), ("command", "RCPT"), ("status", "5.7.1"))] == 1
    assert m[("mailguard_refusals_total", ("code", "554"), ("command", "CONNECT"), ("status", "5.7.1"))] == 1
    assert m[("mailguard_commit_seconds_count",)] == 2
    assert m[("mailguard_commit_seconds_bucket", ("le", "+Inf"))] == 2
    assert m[("mailguard_queue_messages",)] == 1
    assert m[("mailguard_queue_oldest_age_seconds",)] > 0
    assert ("mailguard_gateway_cache_total", ("result", "hit")) not in m  # no gateway here


# --- the queue tools --------------------------------------------------------------------------

def queue_tool(server, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "mailguard", "queue", "--spool", str(server.spool), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def queued_ids(server) -> dict[str, list[str]]:
    """Short id -> its recipients, from ``queue list --json``."""
    r = queue_tool(server, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {e["queue_id"]: [x["address"] for x in e["recipients"]] for e in map(json.loads, r.stdout.splitlines())}


def enqueue(server, rcpt: str) -> str:
    with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.2", 0), timeout=10) as c:
        c.ehlo("client.test")
        c.mail("john@example.com")
        c.rcpt(rcpt)
        code, text = c.data(f"Subject: to {rcpt}\r\n\r\nfor {rcpt}\r\n".encode())
    return re.search(rb"queued as (\S+)", text).group(1).decode()


def delivered_to(backend) -> list[str]:
    return sorted(r for meta, _ in backend.messages() for r in meta["to"])


@pytest.fixture
def queued(twistd, tmp_path):
    """A server whose relay host is down, with QueueRetryMin an hour: four
    messages wait, each deferred once; only the queue tools move them."""
    port = free_port()
    cfg = write_config(tmp_path / "mailserver.cfg", {"QueueRetryMin": "3600"})
    server = twistd("--relay-host", f"127.0.0.1:{port}", config=cfg)
    ids = {name: enqueue(server, f"{name}@remote.test") for name in ("a", "b", "c", "d")}
    assert wait_for(lambda: server.output().count("result=deferred") >= 4)
    return server, port, ids


def test_e2e_queue_list_and_show(queued):
    server, port, ids = queued
    r = queue_tool(server, "list")
    assert r.returncode == 0
    for name, qid in ids.items():
        assert re.search(rf"^{qid} +\d+  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ  <john@example\.com>$", r.stdout, re.M)
        assert re.search(rf"^    <{name}@remote\.test>  pending  4\.4\.1 X-mailguard; .*connect to 127\.0\.0\.1",
                         r.stdout, re.M)
    assert re.search(r"^-- 4 message\(s\), \d+ bytes, 0 held$", r.stdout, re.M)
    s = queue_tool(server, "show", ids["a"])
    assert s.returncode == 0
    assert f"queue id: {ids['a']}\n" in s.stdout and "attempts: 1\n" in s.stdout
    assert s.stdout.endswith("\n\nfor a@remote.test\n")  # (text mode: CRLF read as LF)
    assert queue_tool(server, "show", "nonexistent").returncode == 1


def test_e2e_queue_delete_hold_flush_release_on_a_running_server(queued, tmp_path):
    server, port, ids = queued
    active = server.spool / "queue" / "active"
    r = queue_tool(server, "delete", ids["a"])
    assert (r.returncode, r.stdout.splitlines()[0]) == (0, f"deleted: {ids['a']}")
    assert "by the running server" in r.stdout
    assert not [p for p in os.listdir(active) if ids["a"] in p]
    assert queue_tool(server, "hold", ids["b"]).returncode == 0
    assert "[held]" in [line for line in queue_tool(server, "list").stdout.splitlines() if ids["b"] in line][0]
    # d's files removed by hand, as an administrator might: the server must
    # drop it at its next attempt, not rewrite the .env and retry for ever.
    for p in active.iterdir():
        if ids["d"] in p.name:
            p.unlink()
    backend = Backend(tmp_path, port)
    try:
        r = queue_tool(server, "flush")
        assert r.returncode == 0 and f"flushed: {ids['c']}" in r.stdout
        backend.wait(1)
        assert wait_for(lambda: f"queue-removed queue={ids['d']}" in server.output())
        assert delivered_to(backend) == ["c@remote.test"]  # not a (deleted), not b (held)
        assert wait_for(lambda: queued_ids(server) == {ids["b"]: ["b@remote.test"]})
        assert queue_tool(server, "flush").stdout.startswith("0 message(s)")  # b stays held
        assert queue_tool(server, "release", ids["b"]).returncode == 0
        backend.wait(2)
        assert delivered_to(backend) == ["b@remote.test", "c@remote.test"]
        assert wait_for(lambda: not os.listdir(active))
    finally:
        backend.stop()
    log = server.output()
    assert f"queue-deleted queue={ids['a']}" in log and f"queue-held queue={ids['b']}" in log
    assert f"queue-released queue={ids['b']}" in log
    assert "cannot read the queued message" not in log
    assert f"queue={ids['a']} " not in log.split(f"queue-deleted queue={ids['a']}", 1)[1]  # no retry
    assert f"queue={ids['d']} " not in log.split(f"queue-removed queue={ids['d']}", 1)[1]
    assert queue_tool(server, "delete", ids["a"]).returncode == 1  # gone for good


def test_e2e_queue_tools_with_the_server_stopped(queued, twistd, tmp_path):
    server, port, ids = queued
    server.stop()
    r = queue_tool(server, "hold", "ALL")
    assert r.returncode == 0 and "4 message(s) held in the spool (no server running)" in r.stdout
    assert queue_tool(server, "delete", ids["c"]).returncode == 0
    backend = Backend(tmp_path, port)
    try:
        again = twistd("--relay-host", f"127.0.0.1:{port}", config=tmp_path / "mailserver.cfg")
        assert set(queued_ids(again)) == {ids["a"], ids["b"], ids["d"]}
        r = queue_tool(again, "flush", "remote.test")
        assert r.stdout.startswith("0 message(s)")  # all held
        r = queue_tool(again, "release", "ALL")
        assert r.returncode == 0 and "3 message(s) released by the running server" in r.stdout
        backend.wait(3)
        assert delivered_to(backend) == ["a@remote.test", "b@remote.test", "d@remote.test"]
    finally:
        backend.stop()
