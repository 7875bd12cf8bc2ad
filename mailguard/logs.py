"""mailguard's log: one ``twisted.logger`` event per thing that happened,
with stable field names, as text that grep and awk handle and as JSON.

Every session event (``connect``, ``reject``, ``auth``, ``accepted``,
``disconnect``...) and every queue event (``relay``, ``dsn``, ``queue``)
is one event made by L{emit}: its fields are keys of the event (so any
``twisted.logger`` observer can read them), and its text is the event
name followed by ``key=value`` pairs in the logfmt convention -- a value
with a space, a quote, a backslash or a control character is written in
double quotes with those escaped, so one event is always one line and no
Python repr ever appears::

    connect session=5f3a9c000001 ip=203.0.113.9 port=51234 listener=smtp greeting=delayed

The text is made only when an observer formats the event (L{Line} is
formatted lazily, as ``twisted.logger`` does with any field), so logging
costs the hot path one small object and one dict per event.

Observers shipped here, for ``twistd --logger``:

- L{jsonLogger}: one JSON object per line on standard output, the same
  fields plus ``time``, ``level``, ``event`` (or ``text`` for the events
  of Twisted itself);
- L{syslogLogger}: syslog with facility ``mail``, the process id, and a
  priority for each level.

And L{SyslogFacility}: with twistd's own ``--syslog`` (facility ``user``,
no process id), the service reopens syslog as ``mail`` with the pid.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, Callable, TextIO

from twisted.application import service
from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger, formatEvent

__all__ = ["Line", "emit", "format_fields", "jsonLogger", "syslogLogger", "JsonObserver",
           "SyslogObserver", "SyslogFacility"]

# syslog(3) priorities by twisted.logger level.
_PRIORITIES = {"debug": 7, "info": 6, "warn": 4, "error": 3, "critical": 2}
_BY_LEVEL = {level: _PRIORITIES[level.name] for level in LogLevel.iterconstants()}

# A value that needs no quotes: printable ASCII without space, quote or backslash.
_BARE = re.compile(r'[!#-\[\]-~]+')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(text: str) -> str:
    if _BARE.fullmatch(text):
        return text
    out = []
    for c in text:
        e = _ESCAPES.get(c)
        if e is not None:
            out.append(e)
        elif c.isprintable() or c == " ":
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
    return '"' + "".join(out) + '"'


def _text(value: Any) -> str:
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return _quote(",".join(str(v) for v in value))
    return _quote(str(value))


def format_fields(name: str, fields: dict[str, Any]) -> str:
    """``name key=value ...``; fields whose value is None are left out."""
    return name + "".join(f" {k}={_text(v)}" for k, v in fields.items() if v is not None)


class Line:
    """The text of one event, made when (and each time) it is formatted."""

    __slots__ = ("name", "fields")

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        return format_fields(self.name, self.fields)

    def __format__(self, spec: str) -> str:  # "{mg_line}" in log_format
        return format_fields(self.name, self.fields)

    def __repr__(self) -> str:
        return f"<Line {self}>"


def emit(logger: Logger, name: str, fields: dict[str, Any], level: LogLevel = LogLevel.info) -> None:
    """One event: C{fields} as keys of the event, the text from L{Line};
    C{syslogPriority} for twistd's own ``--syslog`` observer (which would
    say ``info`` for every level)."""
    logger.emit(level, "{mg_line}", mg_line=Line(name, fields), syslogPriority=_BY_LEVEL[level], **fields)


# -- observers -------------------------------------------------------------------------

def _iso(t: float | None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


def _level(event) -> LogLevel:
    return event.get("log_level") or LogLevel.info


def record_of(event: dict) -> dict[str, Any]:
    """The JSON object for one event: C{time}, C{level}, C{system}, then
    C{event} and the fields of a mailguard event, or C{text} (and a
    C{traceback} if one was logged) for any other."""
    record: dict[str, Any] = {"time": _iso(event.get("log_time")), "level": _level(event).name,
                              "system": event.get("log_namespace", "-")}
    line = event.get("mg_line")
    if isinstance(line, Line):
        record["event"] = line.name
        record.update((k, v) for k, v in line.fields.items() if v is not None)
    else:
        record["text"] = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:
                record["traceback"] = repr(failure)
    return record


class JsonObserver:
    """One JSON object per line (JSON Lines), flushed per event."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, event: dict) -> None:
        self.out.write(json.dumps(record_of(event), default=str, ensure_ascii=False) + "\n")
        self.out.flush()


def _at_least_info(observer):
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.info)])


def jsonLogger():
    """``twistd --logger mailguard.logs.jsonLogger``: JSON Lines on standard
    output (run with ``-n``: a daemon's standard output is /dev/null)."""
    return _at_least_info(JsonObserver(sys.stdout))


LOG_MAIL = 2 << 3
LOG_PID, LOG_NDELAY = 0x01, 0x08


class SyslogObserver:
    """Events to syslog(3): facility C{mail}, the pid in every line, the
    priority from the event's level; a traceback as following lines.

    @param openlog: C{syslog.openlog}; @param syslog: C{syslog.syslog}
        (both replaceable for tests: there may be no syslog daemon)."""

    def __init__(self, ident: str = "mailguard", openlog: Callable | None = None,
                 syslog: Callable | None = None) -> None:
        if openlog is None or syslog is None:
            import syslog as _syslog

            openlog, syslog = openlog or _syslog.openlog, syslog or _syslog.syslog
        self.syslog = syslog
        openlog(ident, LOG_PID | LOG_NDELAY, LOG_MAIL)

    def __call__(self, event: dict) -> None:
        priority = _PRIORITIES.get(_level(event).name, 6)
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        first = True
        for line in text.splitlines() or [""]:
            self.syslog(priority, line if first else "\t" + line)
            first = False


def syslogLogger():
    """``twistd --logger mailguard.logs.syslogLogger``: syslog, facility
    C{mail}, ident C{mailguard}, with the pid."""
    return _at_least_info(SyslogObserver())


class SyslogFacility(service.Service):
    """For twistd's own ``--syslog``: Twisted opens syslog with facility
    C{user} and no pid, after the plugin is made and before services
    start; starting, this reopens it as C{mail} with the pid (and the
    ``--prefix`` twistd was given)."""

    name = "syslog-facility"

    def __init__(self, prefix: str, openlog: Callable | None = None) -> None:
        self.prefix = prefix
        self._openlog = openlog

    def startService(self) -> None:
        super().startService()
        openlog = self._openlog
        if openlog is None:
            import syslog

            openlog = syslog.openlog
        openlog(self.prefix, LOG_PID | LOG_NDELAY, LOG_MAIL)
