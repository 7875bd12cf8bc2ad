"""The security log: line format, batching off the reactor thread, size
rotation, the bounded queue, and the flush at shutdown."""

from __future__ import annotations

import calendar
import errno
import os

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from mailguard.smtpd.seclog import SecurityLog, format_fields, format_line, format_note
from mailguard.testing import LogCapture


def read(path) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_line_format_is_utc_and_tab_separated():
    when = calendar.timegm((2026, 11, 27, 14, 3, 5))
    line = format_line(when, "early-talker", "203.0.113.9", 51234, 3.019, b"EHLO x\r\n")
    assert line == "2026-11-27T14:03:05Z\tearly-talker\t203.0.113.9\t51234\twaited=3.02\tfirst=b'EHLO x\\r\\n'\n"


def test_first_bytes_never_break_the_line():
    line = format_line(0, "early-talker", "2001:db8::1", 1, 0, b"a\tb\nc\rd\x00\xff\x1b[2J" + b"x" * 100)
    assert line.count("\n") == 1 and line.endswith("\n")
    fields = line.rstrip("\n").split("\t")
    assert len(fields) == 6
    assert fields[5] == "first=" + repr(b"a\tb\nc\rd\x00\xff\x1b[2J" + b"x" * 51)  # 64 bytes
    assert all(c.isprintable() for c in fields[5])


def test_record_does_not_write_until_the_reactor_turns(tmp_path):
    clock = Clock()
    path = tmp_path / "security.log"
    slog = SecurityLog(str(path), clock, threaded=False)
    slog.record("gave-up", "192.0.2.1", 1000, 30.0)
    slog.record("early-talker", "192.0.2.2", 1001, 1.5, b"HELO")
    assert not path.exists()
    clock.advance(0)
    assert [l.split("\t")[1] for l in read(path)] == ["gave-up", "early-talker"]
    assert slog.written == 2
    assert clock.getDelayedCalls() == []


class FakeThreadPool:
    """Runs nothing until told: shows the write happens on the pool."""

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, f, *args, **kw):
        self.jobs.append((on_result, f, args, kw))

    def run_all(self):
        while self.jobs:
            on_result, f, args, kw = self.jobs.pop(0)
            on_result(True, f(*args, **kw))


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.pool = FakeThreadPool()
        self.triggers = []

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append((phase, event, f))


def test_threaded_writes_happen_on_the_thread_pool_one_batch_at_a_time(tmp_path):
    reactor = FakeReactor()
    path = tmp_path / "security.log"
    slog = SecurityLog(str(path), reactor)
    for i in range(3):
        slog.record("gave-up", "192.0.2.1", i, 30.0)
    reactor.advance(0)
    assert not path.exists()  # queued to the pool, not written on the reactor
    assert len(reactor.pool.jobs) == 1  # one batch
    slog.record("gave-up", "192.0.2.1", 9, 30.0)  # arrives while the batch is written
    reactor.advance(0)
    assert len(reactor.pool.jobs) == 1  # still one batch in flight
    reactor.pool.run_all()
    assert len(read(path)) == 4


def test_shutdown_flushes_queued_lines(tmp_path):
    reactor = FakeReactor()
    path = tmp_path / "security.log"
    slog = SecurityLog(str(path), reactor)
    [(phase, event, flush)] = reactor.triggers
    assert (phase, event) == ("before", "shutdown")
    assert flush().called  # nothing queued: at once
    slog.record("early-talker", "192.0.2.1", 1, 0.5, b"x")
    d = flush()
    assert not d.called
    reactor.advance(0)
    reactor.pool.run_all()
    assert d.called
    assert len(read(path)) == 1


def test_rotation_keeps_one_old_generation(tmp_path):
    clock = Clock()
    path = tmp_path / "security.log"
    line_len = len(format_line(0, "gave-up", "192.0.2.1", 1000, 30.0, b""))
    slog = SecurityLog(str(path), clock, max_bytes=10 * line_len, threaded=False, generations=1)
    for i in range(35):
        slog.record("gave-up", "192.0.2.1", 1000, 30.0)
        clock.advance(0)  # one line per batch
        assert os.path.getsize(path) <= 10 * line_len
    assert len(read(path)) == 5
    assert len(read(str(path) + ".1")) == 10
    assert sorted(os.listdir(tmp_path)) == ["security.log", "security.log.1"]


def test_rotation_keeps_n_generations_newest_first(tmp_path):
    """SecurityLogGenerations (default 5): every line of the last five
    full files is kept, in order, and nothing older."""
    clock = Clock()
    path = tmp_path / "security.log"
    line_len = len(format_line(0, "gave-up", "192.0.2.1", 1000, 30.0, b""))
    slog = SecurityLog(str(path), clock, max_bytes=10 * line_len, threaded=False)
    assert slog.generations == 5
    for port in range(1, 78):
        slog.record("gave-up", "192.0.2.1", port, 30.0)
        clock.advance(0)
    assert sorted(os.listdir(tmp_path)) == ["security.log"] + [f"security.log.{i}" for i in range(1, 6)]
    kept = []
    for name in [f"security.log.{i}" for i in range(5, 0, -1)] + ["security.log"]:
        kept += [int(line.split("\t")[3]) for line in read(tmp_path / name)]
    assert kept == list(range(21, 78))  # 1-20 rotated out; five full files and the current one kept


def test_zero_generations_starts_afresh(tmp_path):
    clock = Clock()
    path = tmp_path / "security.log"
    line_len = len(format_line(0, "gave-up", "192.0.2.1", 1000, 30.0, b""))
    slog = SecurityLog(str(path), clock, max_bytes=10 * line_len, threaded=False, generations=0)
    for port in range(1, 13):
        slog.record("gave-up", "192.0.2.1", port, 30.0)
        clock.advance(0)
    assert os.listdir(tmp_path) == ["security.log"]
    assert [int(line.split("\t")[3]) for line in read(path)] == [11, 12]


def test_max_bytes_zero_never_rotates(tmp_path):
    clock = Clock()
    path = tmp_path / "security.log"
    slog = SecurityLog(str(path), clock, max_bytes=0, threaded=False)
    for _ in range(50):
        slog.record("gave-up", "192.0.2.1", 1000, 30.0)
        clock.advance(0)
    assert len(read(path)) == 50
    assert not os.path.exists(str(path) + ".1")


def test_a_flood_is_counted_not_queued(tmp_path):
    clock = Clock()
    path = tmp_path / "security.log"
    slog = SecurityLog(str(path), clock, max_pending=100, threaded=False)
    for i in range(1000):
        slog.record("early-talker", "192.0.2.1", i, 0.0, b"x")
    assert len(slog._pending) == 100
    clock.advance(0)
    lines = read(path)
    assert len(lines) == 101
    assert lines[-1].split("\t")[1:] == ["dropped", "-", "-", "count=900"]
    assert slog.dropped == 900


def test_dropped_lines_are_counted_in_the_twistd_log_too(tmp_path):
    """A loss is never silent: the count also goes to the main log."""
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        slog = SecurityLog(str(tmp_path / "security.log"), clock, max_pending=10, threaded=False)
        for i in range(25):
            slog.record("early-talker", "192.0.2.1", i, 0.0, b"x")
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events]
    assert [t for t in texts if t.startswith("security-log-dropped")] == [
        f"security-log-dropped count=15 file={tmp_path / 'security.log'}"]


def test_a_write_error_is_logged_and_later_lines_still_written(tmp_path):
    clock = Clock()
    path = tmp_path / "security.log"
    path.mkdir()  # cannot open a directory for writing
    slog = SecurityLog(str(path), clock, threaded=False)
    slog.record("gave-up", "192.0.2.1", 1, 1.0)
    with LogCapture() as logs:
        clock.advance(0)
    assert slog.written == 0
    [event] = logs.events
    assert formatEvent(event) == (f'security-log-failed file={path} lost=1 error="Is a directory (EISDIR)" '
                                  f'path={path} then="later lines are tried again"')
    assert event["log_level"] == LogLevel.error and "log_failure" not in event  # one line, no traceback
    path.rmdir()
    slog.record("gave-up", "192.0.2.1", 2, 1.0)
    clock.advance(0)
    assert len(read(path)) == 1


def test_a_full_disk_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    clock = Clock()
    path = tmp_path / "security.log"
    slog = SecurityLog(str(path), clock, threaded=False)

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    slog.record("gave-up", "192.0.2.1", 1, 1.0)
    slog.record("gave-up", "192.0.2.1", 2, 1.0)
    with LogCapture() as logs:
        clock.advance(0)
    [event] = logs.events
    assert formatEvent(event) == (f'security-log-failed file={path} lost=2 error="No space left on device (ENOSPC)" '
                                  f'path={path} then="later lines are tried again"')
    assert "Traceback" not in logs.text()

    def bug(fd, data):
        raise TypeError("a bug")

    monkeypatch.setattr(os, "write", bug)
    slog.record("gave-up", "192.0.2.1", 3, 1.0)
    with LogCapture() as logs:
        clock.advance(0)
    [event] = logs.events
    assert event["log_failure"].check(TypeError)
    assert "Traceback" in logs.text()


def test_creates_the_directory(tmp_path):
    clock = Clock()
    path = tmp_path / "new" / "dir" / "security.log"
    slog = SecurityLog(str(path), clock, threaded=False)
    slog.record("gave-up", "192.0.2.1", 1, 1.0)
    clock.advance(0)
    assert len(read(path)) == 1


# --- lines with fields (the abuse budgets) ---------------------------------------------------


@pytest.mark.parametrize("fields, text", [
    ({"mechanism": "PLAIN", "user": "alice@example.com"}, "mechanism=PLAIN\tuser=alice@example.com"),
    ({"limit": "30/min"}, "limit=30/min"),
    ({"failures": 20, "window": "600"}, "failures=20\twindow=600"),
    ({"user": ""}, 'user=""'),
    ({"user": "a b"}, 'user="a b"'),
    ({"user": "x\t127.0.0.9\r\nforged"}, 'user="x\\t127.0.0.9\\r\\nforged"'),
    ({"user": "caf\u00e9\u202e"}, 'user="caf\\u00e9\\u202e"'),
    ({"user": "\x00"}, 'user="\\u0000"'),
])
def test_fields_are_escaped_so_a_value_cannot_forge_a_line(fields, text):
    assert format_fields(fields) == text
    line = format_note(0, "auth-failed", "192.0.2.1", 25, fields)
    assert line.count("\n") == 1 and line.count("\t") == 3 + len(fields)
    assert all(c.isprintable() or c in "\t\n" for c in line)


def test_a_note_line(tmp_path):
    clock = Clock()
    clock.advance(1796592968)
    slog = SecurityLog(str(tmp_path / "s.log"), clock, threaded=False)
    slog.note("auth-failed", "192.0.2.1", 2525, mechanism="LOGIN", user="bob")
    clock.advance(0)
    assert (tmp_path / "s.log").read_text() == (
        "2026-12-06T21:36:08Z\tauth-failed\t192.0.2.1\t2525\tmechanism=LOGIN\tuser=bob\n")
