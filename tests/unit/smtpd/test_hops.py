"""Mail loops: the Received fields counted as DATA streams
(L{mailguard.smtpd.hops}), and the session that refuses a looping message
at the final dot with ``554 5.4.6`` (``SmtpHopCountLimit``, default 50)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import formatEvent

from mailguard.smtpd.hops import ReceivedCounter
from mailguard.testing import LogCapture, connect
from tests.helpers_context import maildir_messages, make_context

JOHN = "john@example.com"


def received(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.test (hop%d.test [192.0.2.%d])\r\n\tby mx%d.test; Mon, 1 Jan 2026 00:00:00 +0000\r\n"
                    % (i, i, i % 250, i) for i in range(n))


def message(hops: int, body: bytes = b"looping\r\n") -> bytes:
    return received(hops) + b"Subject: loop\r\n\r\n" + body


def count(data: bytes, cuts=()) -> ReceivedCounter:
    counter = ReceivedCounter()
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        counter.feed(data[start:cut])
        start = cut
    return counter


# --- the counter ------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected, in_header", [
    (message(60), 60, False),
    (message(0), 0, False),
    (b"received: a\r\nRECEIVED : b\r\nReceived\t: c\r\n\r\n", 3, False),  # any case, blanks before the colon
    (b"X-Received: a\r\nSubject: Received: no\r\n Received: folded\r\nReceived-SPF: pass\r\n\r\n", 0, False),
    (b"Subject: s\r\n\r\nReceived: in the body\r\nReceived: too\r\n", 0, False),
    (b"\r\nReceived: after an empty first line (the body)\r\n", 0, False),
    (b"Received: a\r\nReceived: b\r\n", 2, True),  # no body yet
])
def test_counted_in_the_header_section_only(data, expected, in_header):
    counter = count(data)
    assert (counter.count, counter.in_header) == (expected, in_header)


def reference(data: bytes) -> tuple[int, bool]:
    """The count by the book: header lines up to the first empty one."""
    n = 0
    for line in data.split(b"\r\n")[:-1]:
        if line == b"":
            return n, False
        n += re.match(rb"received[ \t]*:", line, re.IGNORECASE) is not None
    return n, True


LINES = st.sampled_from([b"Received: x", b"received :y", b"RECEIVED\t:z", b"X-Received: no", b" Received: fold",
                         b"Receive: no", b"Received", b"Subject: s", b"", b"Received: " + b"r" * 40])


@given(lines=st.lists(LINES, max_size=30), cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=12))
def test_any_cut_of_the_stream_counts_the_same(lines, cuts):
    data = b"".join(line + b"\r\n" for line in lines)
    counter = count(data, [c for c in cuts if c < len(data)])
    assert (counter.count, counter.in_header) == reference(data)


def test_the_body_is_not_read():
    """After the empty line, feeding returns at once: a body of any size
    costs nothing (it is not scanned)."""
    counter = count(message(3))
    assert not counter.in_header

    class Unreadable(bytes):
        def find(self, *a):
            raise AssertionError("the body was scanned")

        rfind = startswith = find

    counter.feed(Unreadable(b"Received: x\r\n" * 1000))
    assert counter.count == 3


# --- the session: 554 5.4.6 at the final dot ---------------------------------------------

def session(tmp_path, variables=None):
    ctx = make_context(tmp_path, variables)
    s = connect(ctx)
    s.take()
    s.cmd("EHLO client.test")
    return ctx, s


def send(s, data: bytes) -> bytes:
    s.send(f"MAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")
    s.take()
    return s.send(data + b".\r\nNOOP\r\n")


def test_sixty_received_fields_are_refused_with_554_5_4_6_and_logged(tmp_path):
    ctx, s = session(tmp_path)
    with LogCapture() as logs:
        out = send(s, message(60))
    assert s.codes(out) == ["554 5.4.6", "250 2.0.0"]  # answered at the final dot; the session goes on
    assert out.startswith(b"554 5.4.6 Too many hops (Received header fields): mail loop\r\n")
    assert maildir_messages(ctx, JOHN) == []
    [reject] = [formatEvent(e) for e in logs.events if e.get("code") == 554]
    assert reject.startswith("reject session=") and reject.endswith(
        ' ip=127.0.0.3 command=DATA code=554 status=5.4.6 reason="Too many hops (Received header fields): mail loop" '
        'helo=client.test from=a@sender.test detail="mail loop: at least 60 Received header fields '
        '(SmtpHopCountLimit 50)"')
    assert s.codes(send(s, message(3))) == ["250 2.0.0", "250 2.0.0"]  # the next message is fine


@pytest.mark.parametrize("hops, codes", [
    (49, ["250 2.0.0"]),  # stored with 50 Received fields: the limit
    (50, ["554 5.4.6"]),  # it would leave here with 51
])
def test_the_limit_counts_the_received_field_mailguard_adds(tmp_path, hops, codes):
    ctx, s = session(tmp_path)
    with LogCapture():
        assert s.codes(send(s, message(hops)))[:-1] == codes
    stored = maildir_messages(ctx, JOHN)
    assert [m.count(b"\nReceived: ") + m.startswith(b"Received: ") for m in stored] == \
        ([50] if codes == ["250 2.0.0"] else [])


def test_received_in_the_body_and_split_packets_do_not_count(tmp_path):
    ctx, s = session(tmp_path)
    s.send(f"MAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")
    s.take()
    data = message(10, body=received(100)) + b".\r\n"
    out = b"".join(s.send(data[i:i + 7]) for i in range(0, len(data), 7))  # 7 octets per packet
    assert s.codes(out) == ["250 2.0.0"]


@pytest.mark.parametrize("limit, hops, code", [("5", 5, "554 5.4.6"), ("5", 4, "250 2.0.0"), ("0", 200, "250 2.0.0")])
def test_the_limit_is_a_setting(tmp_path, limit, hops, code):
    ctx, s = session(tmp_path, {"SmtpHopCountLimit": limit})
    with LogCapture():
        assert s.codes(send(s, message(hops)))[0] == code


def test_a_long_header_line_read_in_pieces_is_one_line(tmp_path):
    """The DATA reader hands a line over 64 KiB on in pieces: the count
    carries across them (a Received field after it still counts, the
    long line's own text does not)."""
    data = (b"Received: a\r\nX-Long: 12345" + b"Received: " * 30000 + b"\r\nReceived: b\r\n"
            b"Subject: long\r\n\r\nReceived: body\r\n.\r\n")
    for limit, code in (("2", "554 5.4.6"), ("3", "250 2.0.0")):
        (tmp_path / limit).mkdir()
        ctx, s = session(tmp_path / limit, {"SmtpHopCountLimit": limit})
        s.send(f"MAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")
        s.take()
        with LogCapture():
            out = b"".join(s.send(data[i:i + 65536]) for i in range(0, len(data), 65536))
        assert s.codes(out) == [code]
