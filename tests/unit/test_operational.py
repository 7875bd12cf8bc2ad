"""Expected operational errors are one log line -- the errno text, the path
or the peer, what happens next -- and tracebacks stay for bugs
(L{mailguard.operational}).

Each error is injected at its seam here, on a ``task.Clock``: ``ENOSPC``
from ``os.write`` under the real Maildir store, a refused or silent
back-end and relay host (``mailguard.testing``'s in-memory SMTP server).
The real ones -- a full tmpfs under a real ``twistd``, closed ports on
loopback -- are ``tests/e2e/test_operational.py``.
"""

from __future__ import annotations

import errno
import os

import pytest
from twisted.logger import LogLevel, formatEvent

from mailguard.gateway.pool import BackendPool
from mailguard.operational import describe, is_operational, report
from mailguard.store.envelope import queue_id
from mailguard.store.maildir import IncomingMessage
from mailguard.testing import FakeSMTPBackend, LogCapture, connect
from tests.helpers_context import maildir_messages, make_context
from tests.unit.store.world import World

JOHN = "john@example.com"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line(logs: LogCapture) -> dict:
    """The only warning or error logged (the session's own info events
    aside): one line, no traceback anywhere."""
    assert "Traceback" not in logs.text() and not any("log_failure" in e for e in logs.events)
    [event] = [e for e in logs.events if e["log_level"] in (LogLevel.warn, LogLevel.error)]
    assert "\n" not in formatEvent(event)
    return event


def fields(event: dict, *names: str) -> tuple:
    return tuple(event.get(n) for n in names)


# --- describe and report ------------------------------------------------------------------

def test_describe_names_the_error_and_the_path():
    e = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/spool/incoming/1")
    assert describe(e) == ("Disk quota exceeded (EDQUOT)", "/spool/incoming/1")
    e = OSError(errno.EMLINK, os.strerror(errno.EMLINK), "/a", None, "/b")
    assert describe(e) == ("Too many links (EMLINK)", "/a -> /b")
    assert describe(OSError(errno.EIO, "Input/output error")) == ("Input/output error (EIO)", None)


def test_report_is_one_event_line():
    from twisted.logger import Logger

    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/spool/incoming/1 x")
    except OSError:
        with LogCapture() as logs:
            report(Logger(), None, "store-failed", {"ip": "192.0.2.7"}, "452 4.3.1 sent; the client will retry")
    event = one_line(logs)
    assert formatEvent(event) == ('store-failed ip=192.0.2.7 error="No space left on device (ENOSPC)" '
                                  'path="/spool/incoming/1 x" then="452 4.3.1 sent; the client will retry"')
    assert event["log_level"] == LogLevel.error


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "full"), True),
    (OSError(errno.EDQUOT, "quota"), True),
    (OSError(errno.EROFS, "read-only"), True),
    (OSError(errno.EBADF, "bad descriptor"), False),  # a bug in our code
    (OSError("no errno"), False),
    (ValueError("a bug"), False),
])
def test_what_is_operational(error, expected):
    assert is_operational(error) is expected


def test_report_keeps_the_traceback_of_a_bug():
    from twisted.logger import Logger

    log = Logger()
    try:
        raise KeyError("a bug")
    except KeyError:
        with LogCapture() as logs:
            report(log, None, "store-failed", {"what": "it"}, "nothing")
    [event] = logs.events
    assert event["log_failure"].check(KeyError)
    assert formatEvent(event) == "store-failed what=it"
    assert "Traceback" in logs.text()


# --- a full disk under the Maildir store ----------------------------------------------------

def full_disk(monkeypatch, path_part: str):
    """``os.write`` fails with ENOSPC for files whose path holds C{path_part}
    (the transport of these sessions never calls it)."""
    real = os.write

    def write(fd, data):
        if path_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(ENOSPC.errno, ENOSPC.strerror)
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def send(s, body: bytes) -> bytes:
    s.send(f"MAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")
    s.take()
    return s.send(body + b".\r\n")


def test_a_full_disk_at_the_final_dot_is_452_and_one_line(tmp_path, monkeypatch):
    """A message kept in memory is written at the final dot, by the commit
    (in its thread): the write fails, the client gets 452 4.3.1, the log
    one line naming the file."""
    ctx = make_context(tmp_path)
    s = connect(ctx)
    s.take()
    s.cmd("EHLO client.test")
    full_disk(monkeypatch, "/incoming/")
    with LogCapture() as logs:
        out = send(s, b"Subject: full\r\n\r\nno room\r\n")
    assert s.codes(out) == ["452 4.3.1"]
    event = one_line(logs)
    incoming = os.path.join(ctx.store.spool, "incoming")
    assert formatEvent(event).startswith("store-failed session=")
    assert fields(event, "ip", "error", "then") == (
        "127.0.0.3", "No space left on device (ENOSPC)", "452 4.3.1 sent; the client will retry")
    assert event["path"] == os.path.join(incoming, event["path"].rpartition("/")[2])
    assert event["path"].endswith("." + event["queue"] + "." + event["path"].rpartition(".")[2])
    assert os.listdir(incoming) == [] and maildir_messages(ctx, JOHN) == []
    monkeypatch.undo()  # room again: the next message is stored
    assert s.codes(send(s, b"Subject: again\r\n\r\nroom\r\n")) == ["250 2.0.0"]
    assert len(maildir_messages(ctx, JOHN)) == 1


def test_a_full_disk_while_a_large_message_arrives_is_452_at_the_dot(tmp_path, monkeypatch):
    ctx = make_context(tmp_path)
    s = connect(ctx)
    s.take()
    s.cmd("EHLO client.test")
    full_disk(monkeypatch, "/incoming/")
    big = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * (IncomingMessage.SPILL // 80 + 100)
    with LogCapture() as logs:
        out = send(s, big)
    assert s.codes(out) == ["452 4.3.1"]
    event = one_line(logs)
    assert fields(event, "ip", "error", "then") == (
        "127.0.0.3", "No space left on device (ENOSPC)", "452 4.3.1 at the final dot; the client will retry")
    assert event["path"].startswith(os.path.join(ctx.store.spool, "incoming") + "/")
    assert os.listdir(os.path.join(ctx.store.spool, "incoming")) == []


def test_a_bug_in_the_store_keeps_its_traceback(tmp_path, monkeypatch):
    ctx = make_context(tmp_path)
    s = connect(ctx)
    s.take()
    s.cmd("EHLO client.test")

    def broken(*args):
        raise TypeError("a bug")

    monkeypatch.setattr(ctx.store, "commit_file", broken)
    with LogCapture() as logs:
        out = send(s, b"Subject: bug\r\n\r\nbody\r\n")
    assert s.codes(out) == ["452 4.3.1"]
    [event] = [e for e in logs.events if "log_failure" in e]
    assert event["log_failure"].check(TypeError) and "Traceback" in logs.text()
    assert formatEvent(event).startswith("store-failed session=")


# --- the relay host and the gateway back-end, down ----------------------------------------

def test_a_refused_relay_host_is_one_warning_and_one_line_per_recipient(tmp_path):
    world = World(tmp_path)
    world.queue.startService()
    world.net.up = False
    with LogCapture() as logs:
        msg_id = world.accept()
        world.run()
    assert "Traceback" not in logs.text()
    lines = [formatEvent(e) for e in logs.events]
    refused = "connect to relay.test: Connection was refused by other side: refused."
    assert lines == [
        f'relay-suspended relay=relay.test reason="{refused}" seconds=300.000 port=25',
        f"relay queue={queue_id(msg_id)} to=x@remote.test relay=relay.test result=deferred status=4.4.1 "
        f'reply="X-mailguard; {refused}" attempts=1 delay=0.000 retry=300.000',
    ]
    world.queue.stopService()


def make_pool(net, clock, **kw) -> BackendPool:
    return BackendPool(net, clock, timeout=10.0, helo="mx.example.com", name="backend.test:25", **kw)


@pytest.mark.parametrize("trouble, reason", [
    ("up", "cannot connect to the back-end: Connection was refused by other side: refused."),
    ("hang", "timed out connecting to the back-end"),
])
def test_a_down_gateway_back_end_is_one_warning(trouble, reason):
    from twisted.internet.task import Clock

    clock = Clock()
    net = FakeSMTPBackend({JOHN})
    setattr(net, trouble, trouble == "hang")
    pool = make_pool(net, clock)
    failures = []
    with LogCapture() as logs:
        for _ in range(3):
            pool.lookup(JOHN).addErrback(failures.append)
        clock.advance(10)
    assert len(failures) == 3
    assert formatEvent(one_line(logs)) == (
        f'gateway-unreachable backend=backend.test:25 reason="{reason}" '
        'then="its recipients get 450 4.4.1 until it answers" seconds=1.000')


def test_a_silent_relay_host_times_out_in_one_line(tmp_path):
    """A relay host that accepts and never answers: after the reply
    timeout (on the queue's clock), one deferred line, no traceback."""
    world = World(tmp_path, timeout=120.0)
    world.queue.startService()
    world.net.greeting = ""  # connected, and then nothing
    with LogCapture() as logs:
        msg_id = world.accept()
        world.run()
        assert [formatEvent(e) for e in logs.events] == []  # still waiting
        world.run(120)
    assert "Traceback" not in logs.text()
    assert [formatEvent(e) for e in logs.events] == [
        'relay-suspended relay=relay.test reason="timeout waiting for the relay host" seconds=300.000 port=25',
        f"relay queue={queue_id(msg_id)} to=x@remote.test relay=relay.test result=deferred status=4.4.1 "
        'reply="X-mailguard; timeout waiting for the relay host" attempts=1 delay=120.000 retry=300.000',
    ]
    world.queue.stopService()
