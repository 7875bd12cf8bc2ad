"""The message text as the relay queue sends it after DATA: dot-stuffed,
with lines over 998 octets folded the way Postfix's SMTP client folds them.

mailguard accepts DATA lines of any length and stores them unchanged
(L{mailguard.smtpd.framing}); RFC 5321 4.5.3.1.6 lets the next hop refuse
lines over 1000 octets with their CRLF.  Postfix's ``smtp_line_length_limit``
(default 998) is the model, header and body lines alike (``smtp_proto.c``,
``smtp_text_out``): a longer line is broken after 998 octets by inserting
CRLF SPACE, and each continuation holds the space and at most 997 more
octets, so no line on the wire exceeds 998 octets plus CRLF (a dot added
for transparency aside, which RFC 5321 does not count).  A space at the
start of a line continues a header field (RFC 5322 2.2.3), and in a body
it is the least harmful place to break (Postfix: "to minimize the damage
to MIME formatted mail").  A line of exactly 998 octets is sent as it is.

Pure and incremental: L{LineFolder.feed} takes the stored message in any
chunks (a file read in pieces) and returns what to send; lines of normal
length cost one ``split`` and a ``max`` per chunk, and nothing is copied
when no line is long and none starts with a dot.
"""

from __future__ import annotations

__all__ = ["LINE_LIMIT", "LineFolder"]

LINE_LIMIT = 998  # Postfix smtp_line_length_limit: octets per line, CRLF not counted
_EMPTY = b""


class LineFolder:
    """Dot-stuffs (RFC 5321 4.5.2) and folds a CRLF message fed in chunks.

    The message is as mailguard stores it: CRLF line ends (bare CR and LF
    were refused at DATA), so every LF ends a line and every CR starts a
    CRLF; a CR at the end of a chunk is held until the next one shows the
    LF.

    @param limit: octets per line, CRLF not counted; 0: no folding (only
        dot-stuffing).
    """

    __slots__ = ("limit", "column", "folds", "_cr")

    def __init__(self, limit: int = LINE_LIMIT) -> None:
        self.limit = limit
        self.folds = 0  # CRLF SPACE inserted so far
        self.column = 0  # octets of the current line sent (after a fold: the space too)
        self._cr = False  # a CR held back from the end of the last chunk

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send for C{chunk}, the next piece of the message."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        if not chunk:
            return _EMPTY
        at_line_start = self.column == 0
        lines = chunk.split(b"\r\n")
        limit = self.limit
        if limit and self.column + len(chunk) > limit and (
                self.column + len(lines[0]) > limit or max(map(len, lines)) > limit):
            lines = self._fold(lines)
            out = b"\r\n".join(lines)
        else:
            out = chunk
            self.column = len(lines[-1]) if len(lines) > 1 else self.column + len(lines[0])
        # A dot at a line start is doubled; a fold starts its line with a
        # space, so only the message's own lines are stuffed.
        if b"\n." in out:
            out = out.replace(b"\n.", b"\n..")
        if at_line_start and out[:1] == b".":
            out = b"." + out
        return out

    def end(self) -> bytes:
        """What is left at the end of the message (a final CR held back)."""
        held, self._cr = self._cr, False
        return b"\r" if held else _EMPTY

    def _fold(self, lines: list[bytes]) -> list[bytes]:
        """C{lines} (the first continues the current line, the last may be
        partial) with every over-long line broken into several."""
        out: list[bytes] = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            column = self.column if i == 0 else 0
            pieces = self._pieces(line, column)
            self.folds += len(pieces) - 1
            out.append(b"\r\n ".join(pieces))
            if i == last:
                self.column = (len(pieces[-1]) + 1 if len(pieces) > 1 else column + len(line))
        return out

    def _pieces(self, line: bytes, column: int) -> list[bytes]:
        """C{line} cut where the folds go, given C{column} octets of it
        already sent: the first piece fills the line, each later one (sent
        after CRLF SPACE) holds C{limit} - 1 octets."""
        limit = self.limit
        room = limit - column
        if len(line) <= room:
            return [line]
        if room <= 0:  # the line is full already: fold before the next octet
            pieces, rest = [_EMPTY], line
        else:
            pieces, rest = [line[:room]], line[room:]
        step = limit - 1
        pieces += [rest[i:i + step] for i in range(0, len(rest), step)]
        return pieces
