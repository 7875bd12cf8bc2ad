"""mailguard.logs: the key=value text, the JSON observer and the syslog
observer (with syslog(3) replaced: there may be no syslog daemon)."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent

from mailguard.logs import (LOG_MAIL, LOG_NDELAY, LOG_PID, JsonObserver, Line, SyslogFacility,
                            SyslogObserver, emit, format_fields, record_of)


@pytest.mark.parametrize("value, text", [
    ("203.0.113.9", "203.0.113.9"),
    ("john@example.com", "john@example.com"),
    ("", '""'),
    ("Relay access denied", '"Relay access denied"'),
    ('a "quoted" \\ b', '"a \\"quoted\\" \\\\ b"'),
    ("x\r\ny\tz", '"x\\r\\ny\\tz"'),
    ("bell\x07esc\x1b[2J", '"bell\\x07esc\\x1b[2J"'),
    ("jöhn@exämple.com", '"jöhn@exämple.com"'),
    ("line\u2028sep", '"line\\u2028sep"'),
    (25, "25"),
    (0.5, "0.500"),
    (True, "yes"),
    (False, "no"),
    (("a@x.test", "b@y.test"), "a@x.test,b@y.test"),
    (("a b@x.test",), '"a b@x.test"'),
])
def test_values_are_logfmt(value, text):
    assert format_fields("ev", {"k": value}) == f"ev k={text}"


def test_none_fields_are_left_out_and_order_is_kept():
    assert format_fields("reject", {"session": "s1", "helo": None, "code": 550}) == "reject session=s1 code=550"


@pytest.mark.parametrize("nasty", ["a\nb", "x\r\n220 fake", "\x00", "=\"", "\u0085", "\\"])
def test_one_event_is_always_one_line_of_printable_text(nasty):
    text = format_fields("reject", {"helo": nasty, "to": (nasty, "b")})
    assert "\n" not in text and "\r" not in text and text.isprintable()


def capture():
    events = []
    publisher = LogPublisher(events.append)
    return Logger(namespace="test", observer=publisher), events


def test_emit_puts_the_fields_in_the_event_and_formats_lazily():
    logger, events = capture()
    emit(logger, "accepted", {"session": "abc", "from": "a@b", "to": ("x@y",)})
    [event] = events
    assert (event["session"], event["from"], event["to"]) == ("abc", "a@b", ("x@y",))
    assert isinstance(event["mg_line"], Line)
    assert event["log_level"] is LogLevel.info
    assert formatEvent(event) == "accepted session=abc from=a@b to=x@y"
    assert event["syslogPriority"] == 6  # for twistd --syslog
    emit(logger, "relay-suspended", {"relay": "mx"}, LogLevel.warn)
    assert events[1]["syslogPriority"] == 4


def test_the_json_record_of_a_mailguard_event():
    logger, events = capture()
    emit(logger, "reject", {"session": "abc", "code": 550, "status": "5.1.1", "reason": "No such user",
                            "helo": None}, LogLevel.warn)
    record = record_of(events[0])
    assert record.pop("time").endswith("Z")
    assert record == {"level": "warn", "system": "test", "event": "reject", "session": "abc", "code": 550,
                      "status": "5.1.1", "reason": "No such user"}


def test_other_events_are_text_with_their_traceback():
    logger, events = capture()
    logger.info("plain {x}", x=1)
    try:
        1 / 0
    except ZeroDivisionError:
        logger.failure("it broke")
    out = io.StringIO()
    observer = JsonObserver(out)
    for e in events:
        observer(e)
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["text"] == "plain 1" and "event" not in first
    assert second["level"] == "critical" and second["text"] == "it broke"
    assert "ZeroDivisionError" in second["traceback"]


class FakeSyslog:
    def __init__(self):
        self.opened = []
        self.lines = []

    def openlog(self, ident, options, facility):
        self.opened.append((ident, options, facility))

    def syslog(self, priority, text):
        self.lines.append((priority, text))


def test_syslog_is_facility_mail_with_the_pid_and_a_priority_per_level():
    fake = FakeSyslog()
    observer = SyslogObserver(openlog=fake.openlog, syslog=fake.syslog)
    assert fake.opened == [("mailguard", LOG_PID | LOG_NDELAY, LOG_MAIL)]
    assert LOG_MAIL == 16 and LOG_PID == 1  # syslog.h: LOG_MAIL (2<<3), LOG_PID 0x01
    logger = Logger(namespace="test", observer=observer)
    emit(logger, "connect", {"session": "s", "ip": "192.0.2.1"})
    logger.warn("careful")
    logger.error("bad")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.failure("crashed")
    assert fake.lines[:3] == [(6, "connect session=s ip=192.0.2.1"), (4, "careful"), (3, "bad")]
    assert fake.lines[3] == (2, "crashed")
    assert all(p == 2 and t.startswith("\t") for p, t in fake.lines[4:])
    assert any("ValueError: boom" in t for _, t in fake.lines[4:])


def test_syslog_facility_reopens_twistds_syslog_as_mail_with_the_pid():
    fake = FakeSyslog()
    svc = SyslogFacility("mailguard-mx", openlog=fake.openlog)
    assert fake.opened == []
    svc.startService()
    assert fake.opened == [("mailguard-mx", LOG_PID | LOG_NDELAY, LOG_MAIL)]
