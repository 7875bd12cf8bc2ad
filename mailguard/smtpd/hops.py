"""Mail loops: the ``Received:`` fields of a message, counted as it streams.

Every MTA a message passes adds a ``Received:`` field at the top of its
header (RFC 5321 4.4), so a message that circles between two servers that
relay to each other by mistake grows one per hop; RFC 5321 6.3 asks a
server to refuse it past a limit (Postfix: ``hopcount_limit``, 50).  The
count is taken on the DATA blocks as they arrive, in the header section
only (it ends at the first empty line, RFC 5322 2.1): a C-level search
for the empty line and one for the field name in each block that holds
header lines, and nothing at all once the body begins, so the DATA path
stays as fast as before and the body is never read again.

Bytes in, a number out: the session (L{mailguard.smtpd.session}) feeds it
and asks L{mailguard.policy.rules.hops_refusal} what to do.
"""

from __future__ import annotations

import re

__all__ = ["ReceivedCounter"]

# A field name "Received", optional blanks (RFC 5322 obsolete syntax), ":".
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)
_RECEIVED_AFTER_LF = re.compile(rb"\nreceived[ \t]*:", re.IGNORECASE)
_HEAD = 16  # bytes of an unfinished line kept to classify it: "Received" + blanks + ":"


class ReceivedCounter:
    """Counts the ``Received:`` fields of one message's header section.

    L{feed} takes the message's bytes in order, in blocks of any size (the
    DATA reader hands whole lines; a block may also end inside a line).
    Lines end with CRLF: the DATA reader refuses a bare CR or LF before any
    of it gets here.  C{count} is the number seen so far; C{in_header} turns False at
    the empty line that ends the header section, after which L{feed}
    returns at once.
    """

    __slots__ = ("count", "in_header", "_carry")

    def __init__(self) -> None:
        self.count = 0
        self.in_header = True
        self._carry: bytes | None = None  # the start of a line a block ended inside

    def feed(self, data: bytes) -> None:
        if not self.in_header or not data:
            return
        start = 0
        if self._carry is not None:  # first, the end of the line the last block ended inside
            end = data.find(b"\n")
            head = self._carry + data[:_HEAD]
            if end < 0:
                self._carry = head[:_HEAD]
                return
            self._carry = None
            self._line(head)
            start = end + 1
        if not self.in_header:
            return
        # From C{start}, a line start, to the empty line (or the last LF).
        empty = _empty_line(data, start)
        if empty >= 0:
            self.in_header = False
            end = empty
        else:
            end = data.rfind(b"\n", start) + 1
            if end < len(data):  # the block ends inside a line: classify it later
                self._carry = data[max(end, start):max(end, start) + _HEAD]
        if end > start:
            self.count += (_RECEIVED.match(data, start) is not None) + \
                len(_RECEIVED_AFTER_LF.findall(data, start, end))

    def _line(self, head: bytes) -> None:
        """A whole line, of which C{head} is the start."""
        if head.startswith(b"\r\n"):
            self.in_header = False
        elif _RECEIVED.match(head) is not None:
            self.count += 1


def _empty_line(data: bytes, start: int) -> int:
    """Where the empty line that ends the header section begins, at or
    after C{start} (a line start), or -1."""
    if data.startswith(b"\r\n", start):
        return start
    i = data.find(b"\n\r\n", start)
    return i + 1 if i >= 0 else -1
