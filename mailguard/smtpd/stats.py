"""What the SMTP sessions count, for the metrics: plain integers.

Counting is on the hot path, so it is an attribute or dict increment and
nothing more: no locks, no labels built per event, no formatting.  The
Prometheus collector (L{mailguard.metrics}) reads these at scrape time,
with what it can compute from live objects (connections held now, the
queue's size and age).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

__all__ = ["Histogram", "Stats", "COMMIT_BUCKETS"]

# Seconds from the final dot to the 250: fsync-bound, so milliseconds.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The refusals of a message (a 4xx/5xx answering DATA or its final dot),
# by reply: the label of mailguard_messages_refused_total.  A 501/503 to
# DATA (a syntax or sequence error) refuses no message; anything else
# unlisted is "other".
MESSAGE_REFUSALS = {
    (552, "5.3.4"): "too_big",
    (554, "5.6.0"): "bare_line_ending",
    (452, "4.3.1"): "storage",
    (451, "4.3.0"): "local_error",
    (554, "5.5.1"): "no_valid_recipients",
    (421, "4.4.2"): "timeout",
}


class Histogram:
    """Cumulative counts per upper bound (Prometheus buckets), the sum and
    the count: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds=COMMIT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs, ending with ``+Inf``."""
        out, total = [], 0
        for bound, n in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out


class Stats:
    """The SMTP side's counters, shared by every session of every listener.

    @ivar connections: by outcome: ``greeted`` (a session began),
        ``early_talker``, ``gave_up`` (closed while held), ``limit``
        (refused by a connection limit).
    @ivar refusals: every 4xx/5xx sent, by (command, code, enhanced code).
    @ivar messages_refused: by reason (L{MESSAGE_REFUSALS}).
    @ivar auth: by result: ``success``, ``failure``, ``error``.
    @ivar relay_denied: RCPTs refused ``554 5.7.1`` (relaying denied).
    @ivar commit_seconds: from the final dot to the ``250``.
    """

    __slots__ = ("connections", "refusals", "messages_accepted", "bytes_accepted", "messages_refused",
                 "auth", "relay_denied", "commit_seconds")

    def __init__(self) -> None:
        self.connections = dict.fromkeys(("greeted", "early_talker", "gave_up", "limit"), 0)
        self.refusals: Counter[tuple[str, int, str]] = Counter()
        self.messages_accepted = 0
        self.bytes_accepted = 0
        self.messages_refused: Counter[str] = Counter()
        self.auth = dict.fromkeys(("success", "failure", "error"), 0)
        self.relay_denied = 0
        self.commit_seconds = Histogram()

    def refused(self, command: str, code: int, status: str) -> None:
        """One 4xx/5xx reply (not the hot path: the accepted mail's is
        never a refusal)."""
        self.refusals[(command, code, status)] += 1
        if command == "DATA" and code not in (501, 503):
            self.messages_refused[MESSAGE_REFUSALS.get((code, status), "other")] += 1
        elif command == "RCPT" and code == 554 and status == "5.7.1":
            self.relay_denied += 1
