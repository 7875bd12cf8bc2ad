"""Long lines folded for the next hop as Postfix's SMTP client folds them
(mailguard.store.folding), and dot-stuffing beside it, at any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.store.folding import LINE_LIMIT, LineFolder


def postfix_text_out(line: bytes, limit: int = LINE_LIMIT) -> bytes:
    """One whole record as Postfix's smtp_text_out() writes it (smtp_proto.c,
    Postfix 3.x, REC_TYPE_NORM), transcribed: the reference the folder is
    held to."""
    out, data, space_left = [], line, limit
    while True:
        if space_left == limit and data[:1] == b".":
            out.append(b".")
        if limit > 0 and len(data) >= space_left:
            out.append(data[:space_left] + b"\r\n")
            data = data[space_left:]
            space_left = limit
            if data:
                out.append(b" ")
                space_left -= 1
        else:
            out.append(data + b"\r\n")
            break
        if not data:
            break
    return b"".join(out)


def send(message: bytes, cuts=(), limit: int = LINE_LIMIT) -> tuple[bytes, LineFolder]:
    folder, out, start = LineFolder(limit), [], 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(message))) + [len(message)]:
        out.append(folder.feed(message[start:cut]))
        start = cut
    out.append(folder.end())
    return b"".join(out), folder


@pytest.mark.parametrize("length, wire", [
    (997, b"x" * 997 + b"\r\n"),
    (998, b"x" * 998 + b"\r\n"),  # the limit itself: unchanged
    (999, b"x" * 998 + b"\r\n x\r\n"),
    (1200, b"x" * 998 + b"\r\n " + b"x" * 202 + b"\r\n"),
    (998 + 997, b"x" * 998 + b"\r\n " + b"x" * 997 + b"\r\n"),  # the continuation full
    (998 + 998, b"x" * 998 + b"\r\n " + b"x" * 997 + b"\r\n x\r\n"),
])
def test_fold_points(length, wire):
    line = b"x" * length + b"\r\n"
    assert postfix_text_out(b"x" * length) == wire
    for cut in range(0, len(line) + 1, 97):
        assert send(line, [cut])[0] == wire


def test_a_line_at_every_split():
    line = b"y" * 2500 + b"\r\n"
    wire = postfix_text_out(b"y" * 2500)
    for cut in range(len(line) + 1):
        assert send(line, [cut])[0] == wire, cut


def test_no_line_on_the_wire_is_over_998_octets_and_unfolding_restores_the_text():
    message = b"Subject: " + b"s" * 3000 + b"\r\n\r\n" + b"b" * 5000 + b"\r\nshort\r\n"
    wire, folder = send(message, [4096, 8192])
    assert max(len(line) for line in wire.split(b"\r\n")) <= LINE_LIMIT
    assert folder.folds == 3 + 5
    assert wire.replace(b"\r\n ", b"") == message  # each fold added CRLF and a space, nothing else
    assert wire.split(b"\r\n")[1].startswith(b" ")  # a header continuation (RFC 5322 2.2.3)


def test_dots_are_stuffed_at_line_starts_not_at_folds():
    message = b"." + b"d" * 1500 + b"\r\n.\r\n" + b"x" * 997 + b".\r\n"
    wire, _ = send(message)
    assert wire == (b".." + b"d" * 997 + b"\r\n " + b"d" * 503 + b"\r\n..\r\n" + b"x" * 997 + b".\r\n")


def test_a_cr_at_a_chunk_end_waits_for_its_lf():
    folder = LineFolder()
    assert folder.feed(b"a\r") == b"a"
    assert folder.feed(b"\n.b\r\n") == b"\r\n..b\r\n"
    assert folder.feed(b"c\r") == b"c" and folder.end() == b"\r"


def test_a_full_line_folds_only_when_more_of_it_comes():
    folder = LineFolder()
    assert folder.feed(b"x" * 998) == b"x" * 998
    assert folder.feed(b"\r\n") == b"\r\n"  # it ended there: no fold
    assert folder.feed(b"y" * 998) == b"y" * 998
    assert folder.feed(b"yy\r\n") == b"\r\n yy\r\n"
    assert folder.folds == 1


def test_zero_limit_only_stuffs():
    message = b"." + b"z" * 5000 + b"\r\n"
    assert send(message, limit=0)[0] == b"." + message


def test_nothing_to_do_copies_nothing():
    chunk = b"plain line\r\n" * 100
    assert LineFolder().feed(chunk) is chunk


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.tuples(st.sampled_from([b"", b".", b"..", b" "]), st.integers(0, 2400)).map(
        lambda t: t[0] + b"q" * t[1]), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10000), max_size=8),
)
def test_any_message_at_any_chunking_is_sent_as_postfix_sends_it(lines, cuts):
    message = b"".join(line + b"\r\n" for line in lines)
    expected = b"".join(postfix_text_out(line) for line in lines)
    assert send(message, cuts)[0] == expected
