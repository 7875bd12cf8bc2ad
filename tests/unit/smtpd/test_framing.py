"""Framing on bytes alone: command lines and their limits, the DATA stream
(bare CR/LF, dot-stuffing, the terminating dot, the size limit, lines of
any length), at every split of the input into reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.smtpd.framing import (
    AUTH_LINE_MAX,
    BARE_LINE_ENDING,
    COMMAND_LINE_MAX,
    END_OF_DATA,
    LINE_TOO_LONG,
    MESSAGE_TOO_BIG,
    PARTIAL_LINE_MAX,
    CommandReader,
    DataReader,
)

FINAL = (END_OF_DATA, BARE_LINE_ENDING)


def lines_of(reader: CommandReader, chunks, auth=False) -> list:
    """Every line or LINE_TOO_LONG read from C{chunks}, fed one by one."""
    out, buf = [], b""
    for chunk in chunks:
        buf += chunk
        while True:
            item, buf = reader.read(buf, auth)
            if item is None:
                break
            out.append(item)
    return out


def data_of(chunks, max_size=0):
    """(stored bytes, events, bytes after the message) for DATA fed in C{chunks}."""
    reader = DataReader(max_size)
    body, events, buf = [], [], b""
    chunks = list(chunks)
    while chunks:
        buf += chunks.pop(0)
        while True:
            event, buf = reader.read(buf)
            if event is None:
                break
            if type(event) is bytes:
                assert event, "no empty blocks"
                body.append(event)
                continue
            events.append(event)
            if event in FINAL:
                return b"".join(body), events, buf + b"".join(chunks)
    return b"".join(body), events, buf


def splits(stream: bytes):
    """The stream in two reads, at every byte."""
    for cut in range(len(stream) + 1):
        yield [stream[:cut], stream[cut:]]


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


# --- command lines ---------------------------------------------------------------------


def test_lines_end_at_crlf_or_bare_lf():
    assert lines_of(CommandReader(), [b"EHLO a\r\nNOOP\nQUIT\r\n"]) == [b"EHLO a", b"NOOP", b"QUIT"]


def test_a_partial_line_waits():
    reader = CommandReader()
    assert reader.read(b"NOO") == (None, b"NOO")
    assert lines_of(reader, [b"NO", b"OP\r", b"\n"]) == [b"NOOP"]


@pytest.mark.parametrize("length, ok", [(COMMAND_LINE_MAX, True), (COMMAND_LINE_MAX + 1, False)])
def test_command_line_limit_counts_the_crlf(length, ok):
    line = b"NOOP " + b"x" * (length - 7) + b"\r\n"
    assert len(line) == length
    expected = [line[:-2]] if ok else [LINE_TOO_LONG]
    for chunks in splits(line + b"NOOP\r\n"):
        assert lines_of(CommandReader(), chunks) == expected + [b"NOOP"]


@pytest.mark.parametrize("prefix", [b"AUTH ", b"auth\t", b" AUTH "])
def test_auth_lines_may_be_longer(prefix):
    line = prefix + b"A" * (AUTH_LINE_MAX - len(prefix) - 2) + b"\r\n"
    assert lines_of(CommandReader(), [line]) == [line[:-2]]
    assert lines_of(CommandReader(), [prefix + b"A" * AUTH_LINE_MAX + b"\r\n"]) == [LINE_TOO_LONG]


def test_auth_responses_may_be_longer():
    response = b"A" * 5000 + b"\r\n"
    assert lines_of(CommandReader(), [response], auth=True) == [b"A" * 5000]
    assert lines_of(CommandReader(), [response]) == [LINE_TOO_LONG]


def test_overlong_line_in_pieces_is_reported_once_and_discarded_to_its_end():
    chunks = [b"RCPT TO:<" + b"x" * 200] + [b"x" * 200] * 10 + [b">\r\nNOOP\r\n"]
    assert lines_of(CommandReader(), chunks) == [LINE_TOO_LONG, b"NOOP"]


def test_overlong_line_buffers_nothing_while_discarded():
    reader = CommandReader()
    item, rest = reader.read(b"x" * 600)
    assert (item, rest) == (LINE_TOO_LONG, b"")
    assert reader.read(b"y" * 600) == (None, b"")
    assert reader.read(b"z\r\nNOOP\r\n") == (b"NOOP", b"")


# --- DATA: the end, dot-stuffing ------------------------------------------------------------

TRICKY_LINES = [b"Subject: dots", b"", b".", b"..", b"...x", b".leading", b"middle.dot",
                b"x.", b" .", b"", b".\t", b"end"]


def test_unstuffing_and_the_end_at_every_split():
    body = b"".join(line + b"\r\n" for line in TRICKY_LINES)
    stream = stuffed(TRICKY_LINES) + b".\r\nNOOP\r\n"
    for chunks in splits(stream):
        assert data_of(chunks) == (body, [END_OF_DATA], b"NOOP\r\n"), chunks


@pytest.mark.parametrize("stream, body", [
    (b".\r\n", b""),  # at once
    (b"hello\r\n.\r\n", b"hello\r\n"),
    (b"a.\r\nb .\r\n.\r\n", b"a.\r\nb .\r\n"),  # a dot ends DATA only at a line start
    (b"a\r\n.b\r\n..\r\n.\r\n", b"a\r\nb\r\n.\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),
    (b"x\r\n..\r\n..\r\n.\r\n", b"x\r\n.\r\n.\r\n"),
])
def test_the_terminating_dot_at_every_position(stream, body):
    for chunks in splits(stream + b"QUIT\r\n"):
        assert data_of(chunks) == (body, [END_OF_DATA], b"QUIT\r\n")


def test_nothing_unstuffed_is_not_copied():
    block = b"plain line\r\n" * 10
    event, rest = DataReader(0).read(block)
    assert event is block and rest == b""


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.binary(min_size=0, max_size=12).map(  # NUL is refused: see the NUL tests
        lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n").replace(b"\0", b"0")).map(
        lambda b: b"." + b if b[:1] == b"x" else b), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_stuffing_round_trip_any_chunking(lines, cuts):
    """Any message, cut into any reads (and into two at every split), is
    read back byte for byte, and what follows it is left."""
    stream = stuffed(lines) + b".\r\nNOOP\r\n"
    body = b"".join(line + b"\r\n" for line in lines)
    points = sorted({c for c in cuts if c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    assert data_of(chunks) == (body, [END_OF_DATA], b"NOOP\r\n")
    for two in splits(stream):
        assert data_of(two) == (body, [END_OF_DATA], b"NOOP\r\n")


# --- DATA: SMTP smuggling ------------------------------------------------------------------

@pytest.mark.parametrize("attack", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r",
                                    b"\nX-Header: y\r\n", b"\rX\r\n"])
def test_bare_cr_or_lf_is_refused_at_every_split(attack):
    stream = b"Subject: hi\r\n\r\nhello" + attack + b"MAIL FROM:<a@b.test>\r\nsmuggled\r\n.\r\n"
    for chunks in splits(stream):
        body, events, _ = data_of(chunks)
        assert events == [BARE_LINE_ENDING], chunks
        assert b"MAIL" not in body and b"smuggled" not in body  # the caller aborts the rest


def test_bare_cr_in_a_line_too_long_to_wait_for():
    assert data_of([b"a" * 500 + b"\r" + b"b" * PARTIAL_LINE_MAX])[1] == [BARE_LINE_ENDING]


# --- DATA: lines of any length, the size limit -------------------------------------------

@pytest.mark.parametrize("stream, stored", [
    (b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n"),
    (b".." + b"x" * 997 + b"\r\n.\r\n", b"." + b"x" * 997 + b"\r\n"),  # the stuffing dot does not count
])
def test_text_line_of_998_octets_at_every_split(stream, stored):
    for chunks in splits(stream):
        assert data_of(chunks) == (stored, [END_OF_DATA], b""), chunks


@pytest.mark.parametrize("stream, stored", [
    (b"x" * 999 + b"\r\n.\r\n", b"x" * 999 + b"\r\n"),
    (b"x" * 1200 + b"\r\nRSET\r\nQUIT\r\n.\r\n", b"x" * 1200 + b"\r\nRSET\r\nQUIT\r\n"),  # stays in DATA
    (b"y" * 14000 + b"\r\nQUIT\r\n" + b"x" * 300 + b"\r\n.\r\n", b"y" * 14000 + b"\r\nQUIT\r\n" + b"x" * 300 + b"\r\n"),
    (b".." + b"z" * 9000 + b"\r\n..\r\n.\r\n", b"." + b"z" * 9000 + b"\r\n.\r\n"),  # stuffed long line
])
def test_long_lines_are_stored_unchanged_at_every_split(stream, stored):
    """The 1000-octet rule is gone: a long line is message text like any
    other, and what follows it is message text too, up to the final dot."""
    for chunks in splits(stream):
        assert data_of(chunks) == (stored, [END_OF_DATA], b""), [len(c) for c in chunks]


def test_a_failed_message_is_read_to_its_end_and_stores_nothing_more():
    body, events, rest = data_of([b"ok\r\n", b"x" * 1200, b"tail\r\nmore\r\n.\r\nNOOP\r\n"], max_size=100)
    assert (body, events, rest) == (b"ok\r\n", [MESSAGE_TOO_BIG, END_OF_DATA], b"NOOP\r\n")


def test_no_line_limit():
    line = b"x" * 100000 + b"\r\n"
    assert data_of([line[:50000], line[50000:] + b".\r\n"]) == (line, [END_OF_DATA], b"")


def test_a_long_partial_line_is_taken_before_its_end():
    """Memory stays bounded without a line limit: a partial line of
    PARTIAL_LINE_MAX octets is message bytes at once; a final CR waits,
    as it may start the CRLF; a dot at the line start is unstuffed."""
    reader = DataReader(0)
    assert reader.read(b"x" * (PARTIAL_LINE_MAX - 1)) == (None, b"x" * (PARTIAL_LINE_MAX - 1))
    assert reader.read(b"x" * PARTIAL_LINE_MAX) == (b"x" * PARTIAL_LINE_MAX, b"")
    assert reader.read(b"y" * PARTIAL_LINE_MAX + b"\r") == (b"y" * PARTIAL_LINE_MAX, b"\r")
    assert reader.read(b"\r\n." + b"z" * PARTIAL_LINE_MAX) == (b"\r\n", b"." + b"z" * PARTIAL_LINE_MAX)
    assert reader.read(b"." + b"z" * PARTIAL_LINE_MAX) == (b"z" * PARTIAL_LINE_MAX, b"")
    assert reader.read(b"\r\n.\r\n") == (b"\r\n", b".\r\n")
    assert reader.read(b".\r\n") == (END_OF_DATA, b"")
    assert reader.size == 3 * PARTIAL_LINE_MAX + 4


def test_a_long_line_counts_toward_the_size_limit_as_it_arrives():
    reader = DataReader(PARTIAL_LINE_MAX + 10)
    assert reader.read(b"x" * PARTIAL_LINE_MAX) == (b"x" * PARTIAL_LINE_MAX, b"")
    assert reader.read(b"x" * PARTIAL_LINE_MAX) == (MESSAGE_TOO_BIG, b"")
    assert reader.read(b"x" * PARTIAL_LINE_MAX) == (None, b"")  # read on, store nothing
    assert reader.read(b"\r\n.\r\nNOOP\r\n") == (END_OF_DATA, b"NOOP\r\n")


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.tuples(st.sampled_from([b"", b".", b".."]), st.integers(0, 3 * PARTIAL_LINE_MAX)).map(
        lambda t: t[0] + b"L" * t[1]), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=4 * PARTIAL_LINE_MAX), max_size=6),
)
def test_long_lines_round_trip_any_chunking(lines, cuts):
    stream = stuffed(lines) + b".\r\nNOOP\r\n"
    body = b"".join(line + b"\r\n" for line in lines)
    points = sorted({c for c in cuts if c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    assert data_of(chunks) == (body, [END_OF_DATA], b"NOOP\r\n")


@pytest.mark.parametrize("lines, failure", [(20, None), (21, MESSAGE_TOO_BIG)])
def test_size_limit_is_inclusive_and_counts_unstuffed_octets(lines, failure):
    line = b".." + b"x" * 97 + b"\r\n"  # 101 octets stuffed, 100 unstuffed
    stream = line * lines + b".\r\n"
    body, events, _ = data_of([stream], max_size=2000)
    if failure is None:
        assert events == [END_OF_DATA] and len(body) == 2000
    else:
        assert events == [failure, END_OF_DATA] and body == b""


def test_size_zero_is_no_limit():
    reader = DataReader(0)
    assert reader.read(b"x" * 998 + b"\r\n") == (b"x" * 998 + b"\r\n", b"")
    assert reader.size == 1000
