"""SMTP framing on bytes alone: command lines, and the DATA stream.

Pure: each reader takes the bytes received so far and returns one event
and the bytes it did not consume; it keeps only the little state framing
needs between reads (discarding an over-long line; at a line start; the
size so far).  The session (L{mailguard.smtpd.session}) owns the buffer.

DATA is consumed in bulk, the way ``twisted.mail`` does not: all the whole
lines received so far are one block, checked for bare CR/LF by comparing
three C-level counts and unstuffed with one ``bytes.replace`` (no copy at
all when no line starts with a dot).

DATA lines have no length limit (RFC 5321 4.5.3.1.6's 1000 octets is a
minimum every server must accept; Postfix and Exim take longer lines, and
badly generated HTML has them): they are stored unchanged, and the relay
queue folds them when it forwards (L{mailguard.store.folding}).  Memory
stays bounded all the same: a partial line of L{PARTIAL_LINE_MAX} octets
or more is taken as message bytes without waiting for its end.
"""

from __future__ import annotations

import re

__all__ = [
    "AUTH_LINE_MAX",
    "BARE_LINE_ENDING",
    "COMMAND_LINE_MAX",
    "END_OF_DATA",
    "LINE_TOO_LONG",
    "MESSAGE_TOO_BIG",
    "NUL_CHARACTER",
    "PARTIAL_LINE_MAX",
    "CommandReader",
    "DataReader",
]

COMMAND_LINE_MAX = 512  # RFC 5321 4.5.3.1.4, CRLF included
AUTH_LINE_MAX = 12288  # RFC 4954 section 4
PARTIAL_LINE_MAX = 8192  # a DATA line this long is taken before its end arrives
_AUTH_PREFIX = re.compile(rb"[ \t]*AUTH[ \t]", re.IGNORECASE)
_AUTH_FIRST = frozenset(b"aA \t")  # what an AUTH line can start with
_EMPTY = b""


class Marker:
    """A named value that carries nothing, compared by identity: the
    framing events here, SASL outcomes, the session's signals."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_Event = Marker
LINE_TOO_LONG = _Event("LINE_TOO_LONG")  # a command line over its limit (reported once)
END_OF_DATA = _Event("END_OF_DATA")  # the terminating "." line
BARE_LINE_ENDING = _Event("BARE_LINE_ENDING")  # a CR or LF not in a CRLF pair (smuggling)
MESSAGE_TOO_BIG = _Event("MESSAGE_TOO_BIG")  # the unstuffed size passed the limit
NUL_CHARACTER = _Event("NUL_CHARACTER")  # a NUL octet in the message (RFC 5322 2.3, RFC 6152)


class CommandReader:
    """Command lines, and AUTH responses.

    512 octets per command line (RFC 5321 4.5.3.1.4); 12288 for an AUTH
    command or response (RFC 4954 4: an initial response makes the AUTH
    line longer).  An over-long line is discarded up to its end, however
    many reads it takes, and reported once.  A bare LF ends a command line
    (a CR before it is dropped): only DATA is strict about line endings.
    """

    __slots__ = ("_discarding",)

    def __init__(self) -> None:
        self._discarding = False

    def read(self, buf: bytes, auth: bool = False) -> tuple[bytes | _Event | None, bytes]:
        """The next line of C{buf} (without CRLF), L{LINE_TOO_LONG}, or
        None (a partial line: more input needed), and the rest of C{buf}.

        @param auth: an AUTH exchange is waiting for a response line.
        """
        line, pos = self.read_at(buf, 0, auth)
        return line, buf[pos:]

    def read_at(self, buf: bytes, pos: int, auth: bool = False) -> tuple[bytes | _Event | None, int]:
        """As L{read}, from offset C{pos} of C{buf}; returns the offset of
        the rest instead of a copy of it, so that reading thousands of
        pipelined lines from one buffer costs each line, not each line
        times the buffer."""
        end = len(buf)
        while pos < end:
            first = buf[pos]
            maybe_auth = first in _AUTH_FIRST and _AUTH_PREFIX.match(buf, pos) is not None
            limit = AUTH_LINE_MAX if auth or maybe_auth else COMMAND_LINE_MAX
            i = buf.find(b"\n", pos)
            if i < 0:
                if end - pos <= limit:
                    return None, pos
                if self._discarding:
                    return None, end
                self._discarding = True
                return LINE_TOO_LONG, end
            start, pos = pos, i + 1
            if self._discarding:  # the end of a line already reported
                self._discarding = False
                continue
            if pos - start > limit:
                return LINE_TOO_LONG, pos
            if i > start and buf[i - 1] == 13:  # CR
                i -= 1
            return buf[start:i], pos
        return None, pos


class DataReader:
    """The DATA stream of one message, up to its terminating ``.`` line.

    Events, one per L{read}: message bytes (unstuffed, CRLF line endings,
    to store as they are); L{MESSAGE_TOO_BIG} or L{NUL_CHARACTER} the
    first time the message fails (after which it is read to its end and
    nothing more is returned); L{BARE_LINE_ENDING} (SMTP smuggling: the
    caller must stop reading the stream); L{END_OF_DATA}.  Lines may be of
    any length.

    @param max_size: the message size limit in unstuffed octets (0: none).
    """

    __slots__ = ("max_size", "size", "failed", "_at_line_start")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0  # unstuffed octets so far
        self.failed: object | None = None  # why the message failed
        self._at_line_start = True

    def read(self, buf: bytes) -> tuple[bytes | _Event | None, bytes]:
        """The next event of C{buf}, or None (more input needed), and the
        bytes not consumed (after L{END_OF_DATA}: what follows the message)."""
        while True:
            if self._at_line_start and buf.startswith(b".\r\n"):
                return END_OF_DATA, buf[3:]
            end = buf.rfind(b"\n")
            if end < 0:
                return self._partial(buf)
            # Only CRLF.CRLF ends DATA.  The block runs to the CRLF that
            # ends the last line of the message (the "." line stays in the
            # rest, at a line start), or to the last LF received.
            j = buf.find(b"\r\n.\r\n", 0, end + 1)
            cut = j + 2 if j >= 0 else end + 1
            block, buf = buf[:cut], buf[cut:]
            event = self._block(block)
            if event is not None:
                return event, buf

    def _partial(self, buf: bytes) -> tuple[bytes | _Event | None, bytes]:
        """A partial line (no LF yet): wait for its end, unless it is
        L{PARTIAL_LINE_MAX} octets long already; then take it as message
        bytes but a final CR, which may start the CRLF."""
        if len(buf) < PARTIAL_LINE_MAX:
            return None, buf
        cut = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        data, rest = buf[:cut], buf[cut:]
        if b"\r" in data:  # a CR not followed by LF: bare
            return BARE_LINE_ENDING, buf
        if self._at_line_start and data[:1] == b".":
            data = data[1:]  # "." and more on a line: a dot added for transparency
        self._at_line_start = False
        if self.failed is not None:
            return None, rest
        return self._count(data), rest

    def _block(self, block: bytes) -> bytes | _Event | None:
        """A run of lines, each CRLF-terminated unless a smuggling attempt."""
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            return BARE_LINE_ENDING
        at_line_start, self._at_line_start = self._at_line_start, True
        if self.failed is not None:
            return None  # read on to the final dot; the reply comes then
        if b"\n." not in block and not (at_line_start and block[:1] == b"."):
            data = block  # nothing to unstuff (most blocks): no copy
        elif at_line_start:
            data = (b"\n" + block).replace(b"\n.", b"\n")[1:]
        else:
            data = block.replace(b"\n.", b"\n")
        return self._count(data)

    def _count(self, data: bytes) -> bytes | _Event | None:
        """Message bytes, unless they take the message over its size or
        hold a NUL (never stored, so never relayed as sent)."""
        if b"\0" in data:
            return self._fail(NUL_CHARACTER)
        self.size += len(data)
        if 0 < self.max_size < self.size:
            return self._fail(MESSAGE_TOO_BIG)
        return data

    def fail(self, reason: object) -> None:
        """The message failed elsewhere (it could not be stored): read on
        to its end, returning no more of it."""
        if self.failed is None:
            self.failed = reason

    def _fail(self, event: _Event) -> _Event | None:
        """The first failure is reported; later ones are not."""
        if self.failed is not None:
            return None
        self.failed = event
        return event
