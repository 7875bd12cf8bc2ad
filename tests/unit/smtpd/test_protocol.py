"""The ESMTP protocol, bytes in and bytes out: EHLO and its extensions,
framing and limits, DATA (dot-stuffing, smuggling, size), pipelining order,
error budgets and STARTTLS resets.

Sessions run over a StringTransport with a task.Clock against a real
context (``tests/helpers_context.py``), driven by
``mailguard.testing.connect``; AUTH and real-socket TLS are in
``tests/unit/smtpd/test_auth_tls.py``.  One named test per attack, as aiosmtpd does
(``test_smtpsmuggling.py``, ``test_starttls.py``).
"""

from __future__ import annotations

import dataclasses

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from zope.interface import implementer

from mailguard import replies as R
from mailguard.interfaces import IRecipientPolicy
from mailguard.policy.decide import RecipientVerdict
from mailguard.smtpd.framing import PARTIAL_LINE_MAX
from mailguard.testing import LogCapture, connect
from tests.helpers_context import CRAM_MD5, body_of, maildir_messages, make_context

JOHN = "john@example.com"
SENTINEL_TLS = object()  # a stand-in TLS context: the fake transport only records it


def code(reply: R.Reply) -> str:
    return f"{reply.code} {reply.status}".strip()


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path)


def ehlo(ctx, ip="127.0.0.3", listener="smtp", name="client.test"):
    s = connect(ctx, listener=listener, client_ip=ip)
    greeting = s.take()
    assert greeting.startswith(b"220 ")
    out = s.cmd(f"EHLO {name}")
    assert out.startswith(b"250-") or out.startswith(b"250 ")
    return s


def transaction(s, rcpt=JOHN, sender="a@sender.test"):
    out = s.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    assert s.codes(out) == ["250 2.1.0", "250 2.1.5", "354 End"], out
    return out


def ext_lines(out: bytes) -> list[str]:
    lines = out.decode().split("\r\n")[:-1]
    return [line[4:] for line in lines[1:]]


# --- greeting, EHLO, HELO, HELP ---------------------------------------------------


def test_ehlo_lists_the_seed_extensions_in_order(tmp_path):
    ctx = make_context(tmp_path, CRAM_MD5)
    s = connect(ctx)
    s.take()  # the greeting
    out = s.cmd("EHLO client.test")
    assert out.split(b"\r\n")[0] == b"250-mx.example.com"  # no enhanced code on the first line
    # No TLS configured: no STARTTLS, and no plain-text AUTH mechanism.
    assert ext_lines(out) == ["AUTH CRAM-MD5", "SIZE 20971520", "VRFY", "ENHANCEDSTATUSCODES",
                              "8BITMIME", "PIPELINING", "HELP"]


def test_ehlo_with_tls_offers_starttls(tmp_path):
    ctx = make_context(tmp_path, CRAM_MD5, tls=SENTINEL_TLS)
    s = connect(ctx)
    s.take()  # the greeting
    assert ext_lines(s.cmd("EHLO client.test")) == [
        "AUTH CRAM-MD5", "SIZE 20971520", "STARTTLS", "VRFY", "ENHANCEDSTATUSCODES",
        "8BITMIME", "PIPELINING", "HELP"]


def test_ehlo_advertises_no_etrn_or_dsn_without_a_queue(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    out = s.cmd("EHLO client.test")
    assert b"ETRN" not in out and b"DSN" not in out
    assert s.codes(s.cmd("ETRN example.com")) == ["502 5.5.1"]


def test_ehlo_without_vrfy(tmp_path):
    ctx = make_context(tmp_path, {"VRFYEnabled": "0", "MaxMessageSize": "1000"})
    s = connect(ctx)
    s.take()  # the greeting
    ext = ext_lines(s.cmd("EHLO client.test"))
    assert "VRFY" not in ext and "SIZE 1000" in ext


def test_ehlo_without_password_checker_offers_no_auth(tmp_path):
    ctx = make_context(tmp_path, CRAM_MD5, passwords=False)
    s = connect(ctx)
    s.take()  # the greeting
    assert not any(e.startswith("AUTH") for e in ext_lines(s.cmd("EHLO client.test")))
    assert s.codes(s.cmd("AUTH CRAM-MD5")) == ["504 5.5.4"]


def test_helo_lists_no_extensions(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    assert s.cmd("HELO client.test") == b"250 mx.example.com\r\n"


def test_ehlo_and_helo_need_a_domain(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    assert s.codes(s.cmd("EHLO")) == ["501 5.5.4"]
    assert s.codes(s.cmd("HELO")) == ["501 5.5.4"]


def test_help_is_214_and_lists_only_working_commands(tmp_path):
    s = connect(make_context(tmp_path, CRAM_MD5))
    s.take()  # the greeting
    out = s.cmd("HELP")
    assert out.startswith(b"214 2.0.0 ")
    words = out.decode().split()
    assert "BDAT" not in words and "ETRN" not in words and "STARTTLS" not in words
    assert {"EHLO", "MAIL", "RCPT", "DATA", "VRFY", "AUTH"} <= set(words)


def test_help_lists_no_auth_where_no_mechanism_is_offered(ctx):
    """The default (no CRAM-MD5) offers no mechanism before TLS."""
    s = connect(ctx)
    s.take()  # the greeting
    words = s.cmd("HELP").decode().split()
    assert "AUTH" not in words and {"EHLO", "MAIL", "VRFY"} <= set(words)


def test_no_software_name_anywhere(ctx):
    s = connect(ctx)
    greeting = s.take()
    out = greeting + s.cmd("EHLO client.test") + s.cmd("HELP")
    transaction(s)
    out += s.send("Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    stored = maildir_messages(ctx, JOHN)[0]
    for text in (out, stored):
        assert not re.search(rb"twisted|mailguard|python", text, re.I), text


def test_mail_before_helo_refused(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    assert s.codes(s.cmd("MAIL FROM:<a@b.test>")) == ["503 5.5.1"]


# --- the Received header ---------------------------------------------------------


def received(ctx, mailbox=JOHN) -> str:
    msg = maildir_messages(ctx, mailbox)[-1]
    msg = msg[msg.index(b"Received: "):]
    return msg[: msg.index(b";")].decode()


def test_return_path_records_the_envelope_sender(ctx):
    s = ehlo(ctx)
    transaction(s)
    s.send("hi\r\n.\r\n")
    assert maildir_messages(ctx, JOHN)[-1].startswith(b"Return-Path: <a@sender.test>\r\nReceived: ")


def test_received_header_esmtp_after_ehlo(ctx):
    s = ehlo(ctx)
    transaction(s)
    s.send("hi\r\n.\r\n")
    header = received(ctx)
    assert header.startswith("Received: from client.test ([127.0.0.3])\r\n\tby mx.example.com with ESMTP id ")
    assert header.endswith("\r\n\tfor <john@example.com>")


def test_received_header_smtp_after_helo(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("HELO old.client.test")
    transaction(s)
    s.send("hi\r\n.\r\n")
    assert "from old.client.test ([127.0.0.3])\r\n\tby mx.example.com with SMTP id " in received(ctx)


def test_received_header_helo_name_cannot_inject_lines(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    s.cmd("EHLO evil\x01name")
    transaction(s)
    s.send("hi\r\n.\r\n")
    assert received(ctx).startswith("Received: from evil?name ([127.0.0.3])")


# --- MAIL parameters: SIZE, BODY ---------------------------------------------------


@pytest.fixture
def small(tmp_path):
    return make_context(tmp_path, {"MaxMessageSize": "2000"})


def test_mail_size_over_limit_refused_early(small):
    s = ehlo(small)
    assert s.codes(s.cmd("MAIL FROM:<a@b.test> SIZE=2001")) == [code(R.MESSAGE_TOO_BIG)] == ["552 5.3.4"]
    assert s.codes(s.cmd("MAIL FROM:<a@b.test> SIZE=2000")) == ["250 2.1.0"]


def test_mail_size_must_be_a_number(small):
    s = ehlo(small)
    assert s.codes(s.cmd("MAIL FROM:<a@b.test> SIZE=big")) == ["501 5.5.4"]
    assert s.codes(s.cmd("MAIL FROM:<a@b.test> SIZE")) == ["501 5.5.4"]


def test_size_enforced_on_the_bytes(small):
    s = ehlo(small)
    transaction(s)
    out = s.send(("x" * 98 + "\r\n") * 21 + ".\r\n")  # 2100 bytes, no SIZE= declared
    assert s.codes(out) == ["552 5.3.4"]
    assert maildir_messages(small, JOHN) == []
    assert s.codes(s.cmd("RSET")) == ["250 2.0.0"]  # the session goes on


def test_size_limit_is_inclusive(small):
    s = ehlo(small)
    transaction(s)
    out = s.send(("x" * 98 + "\r\n") * 20 + ".\r\n")  # exactly 2000 bytes
    assert s.codes(out) == ["250 2.0.0"]


def test_size_counts_unstuffed_bytes(small):
    s = ehlo(small)
    transaction(s)
    line = ".." + "x" * 97 + "\r\n"  # ".xxx...\r\n" (100 octets) stuffed
    out = s.send(line * 20 + "..\r\n.\r\n")
    assert s.codes(out) == ["552 5.3.4"]  # 2000 + ".\r\n" = 2003
    transaction(s)
    out = s.send(line * 20 + ".\r\n")  # 2020 on the wire, 2000 unstuffed
    assert s.codes(out) == ["250 2.0.0"]


@pytest.mark.parametrize("body", ["7BIT", "8BITMIME", "8bitmime"])
def test_body_parameter_accepted(ctx, body):
    s = ehlo(ctx)
    assert s.codes(s.cmd(f"MAIL FROM:<a@b.test> BODY={body}")) == ["250 2.1.0"]


@pytest.mark.parametrize("arg", ["BODY=BINARYMIME", "BODY", "SMTPUTF8", "FOO=bar", "RET=FULL"])
def test_unsupported_mail_parameters(ctx, arg):
    s = ehlo(ctx)
    assert s.codes(s.cmd(f"MAIL FROM:<a@b.test> {arg}")) == ["555 5.5.4"]


def test_eight_bit_body_stored_intact(ctx):
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<a@b.test> BODY=8BITMIME")
    s.send(f"RCPT TO:<{JOHN}>\r\nDATA\r\n")
    text = "Subject: caf\u00e9\r\n\r\n\u017elu\u0165ou\u010dk\u00fd k\u016f\u0148\r\n"
    assert s.codes(s.send(text + ".\r\n")) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == text.encode("utf-8")


def test_mail_auth_parameter_accepted_and_ignored(ctx):
    s = ehlo(ctx)
    assert s.codes(s.cmd("MAIL FROM:<a@b.test> AUTH=<>")) == ["250 2.1.0"]


# --- command framing --------------------------------------------------------------


def test_command_line_of_512_octets_is_accepted(ctx):
    s = ehlo(ctx)
    line = "NOOP " + "x" * (512 - 2 - 5)
    assert len(line) + 2 == 512
    assert s.codes(s.cmd(line)) == ["250 2.0.0"]


def test_command_line_of_513_octets_is_refused(ctx):
    s = ehlo(ctx)
    line = "NOOP " + "x" * (513 - 2 - 5)
    assert s.codes(s.cmd(line)) == ["500 5.5.2"]
    assert s.codes(s.cmd("NOOP")) == ["250 2.0.0"]


def test_overlong_command_in_pieces_is_discarded_to_its_end(ctx):
    s = ehlo(ctx)
    out = b""
    for _ in range(10):
        out += s.send("RCPT TO:<" + "x" * 200)
    out += s.send(">\r\nNOOP\r\n")
    assert s.codes(out) == ["500 5.5.2", "250 2.0.0"]  # one error for the whole line


def test_bare_lf_ends_a_command_line(ctx):
    s = connect(ctx)
    s.take()  # the greeting
    assert s.codes(s.send("EHLO client.test\nNOOP\n")) == ["250 HELP", "250 2.0.0"]


def test_unknown_and_non_ascii_commands(ctx):
    s = ehlo(ctx)
    assert s.codes(s.cmd("BDAT 10 LAST")) == ["500 5.5.2"]
    assert s.codes(s.send(b"N\xc3\xb6OP\r\n")) == ["500 5.5.2"]
    assert s.codes(s.send(b"MAIL FROM:<\xff@b.test>\r\n")) == ["501 5.5.4"]


# --- DATA framing: dot-stuffing and the end marker -----------------------------------

TRICKY_LINES = [b"Subject: dots", b"", b".", b"..", b"...x", b".leading", b"middle.dot",
                b"x.", b" .", b"", b".\t", b"end"]


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def stored_by_id(ctx, out: bytes) -> bytes:
    """The message the last "queued as ID" reply of C{out} names."""
    queued = re.findall(rb"queued as (\S+)", out)
    assert queued, out
    ident = queued[-1].decode()
    new = os.path.join(ctx.store.spool, "mail", "example.com", "john", "Maildir", "new")
    names = [n for n in os.listdir(new) if f".{ident}." in n]
    assert len(names) == 1
    with open(os.path.join(new, names[0]), "rb") as f:
        return body_of(f.read())


def run_split(ctx, stream: bytes, cuts: list[int]) -> bytes:
    """MAIL/RCPT, then C{stream} (DATA ... QUIT) fed in pieces cut at C{cuts}."""
    s = ehlo(ctx)
    s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\n")
    out = b""
    prev = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        out += s.send(stream[prev:cut])
        prev = cut
    s.lose()
    return out


def test_dot_unstuffing_at_every_split_point(ctx):
    """The whole DATA exchange, split into two TCP reads at every byte."""
    body = b"".join(line + b"\r\n" for line in TRICKY_LINES)
    stream = b"DATA\r\n" + stuffed(TRICKY_LINES) + b".\r\nNOOP\r\n"
    for cut in range(len(stream) + 1):
        out = run_split(ctx, stream, [cut])
        assert re.sub(rb"queued as \S+", b"", out) == (
            b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: \r\n250 2.0.0 OK\r\n"), (cut, out)
        assert stored_by_id(ctx, out) == body, cut


def test_end_marker_split_across_chunks(ctx):
    for i in range(1, 5):
        s = ehlo(ctx)
        transaction(s)
        marker = b"\r\n.\r\n"
        assert s.send(b"hello" + marker[:i]) == b""
        assert s.codes(s.send(marker[i:] + b"NOOP\r\n")) == ["250 2.0.0", "250 2.0.0"], i
        assert body_of(maildir_messages(ctx, JOHN)[-1]) == b"hello\r\n"


def test_end_marker_immediately_after_data(ctx):
    s = ehlo(ctx)
    out = s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n.\r\n")
    assert s.codes(out) == ["250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b""


def test_end_marker_alone_in_its_own_chunk(ctx):
    s = ehlo(ctx)
    transaction(s)
    assert s.send("hello\r\n") == b""
    assert s.codes(s.send(".")) == []
    assert s.codes(s.send("\r")) == []
    assert s.codes(s.send("\n")) == ["250 2.0.0"]


def test_dot_only_ends_data_at_a_line_start(ctx):
    s = ehlo(ctx)
    transaction(s)
    assert s.send("a.\r\nb .\r\n") == b""
    assert s.codes(s.send(".\r\n")) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b"a.\r\nb .\r\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.binary(min_size=0, max_size=12).map(  # NUL is refused: see the NUL tests
        lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n").replace(b"\0", b"0")).map(
        lambda b: b"." + b if b[:1] == b"x" else b), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_dot_unstuffing_round_trip_any_chunking(ctx, lines, cuts):
    """Any message, cut into any TCP reads, is stored byte for byte."""
    stream = b"DATA\r\n" + stuffed(lines) + b".\r\nNOOP\r\n"
    out = run_split(ctx, stream, [c for c in cuts if c < len(stream)])
    assert out.endswith(b"250 2.0.0 OK\r\n"), out
    assert stored_by_id(ctx, out) == b"".join(line + b"\r\n" for line in lines)


# --- DATA limits ------------------------------------------------------------------------


def test_data_line_of_998_octets_is_accepted(ctx):
    s = ehlo(ctx)
    transaction(s)
    assert s.codes(s.send("x" * 998 + "\r\n.\r\n")) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b"x" * 998 + b"\r\n"


def test_data_line_of_998_octets_plus_stuffed_dot_is_accepted(ctx):
    s = ehlo(ctx)
    transaction(s)
    out = s.send("." * 2)
    out += s.send("x" * 997 + "\r\n.\r\n")
    assert s.codes(out) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b"." + b"x" * 997 + b"\r\n"


def test_stuffed_998_octet_line_waiting_for_its_lf(ctx):
    """1000 octets without LF on the wire are still a legal line when the
    first is a stuffing dot and the last a CR."""
    s = ehlo(ctx)
    transaction(s)
    out = s.send(".." + "x" * 997 + "\r")
    assert out == b""
    assert s.codes(s.send("\n.\r\n")) == ["250 2.0.0"]


def test_999_octet_line_waiting_for_its_lf_is_accepted(ctx):
    s = ehlo(ctx)
    transaction(s)
    assert s.send("x" * 999 + "\r") == b""
    assert s.codes(s.send("\n.\r\n")) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b"x" * 999 + b"\r\n"


def test_long_data_line_is_stored_and_data_goes_on(ctx):
    """A line over 1000 octets is accepted and stored unchanged (as Postfix
    and Exim accept it), and it does not drop the session into command
    mode: the lines after it are message text, not commands, up to the
    final dot."""
    s = ehlo(ctx)
    transaction(s)
    text = "x" * 1200 + "\r\nRSET\r\nMAIL FROM:<evil@b.test>\r\nQUIT\r\n"
    out = s.send(text)
    assert out == b"" and not s.closed
    out = s.send(".\r\n")
    assert s.codes(out) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == text.encode()
    assert s.codes(s.cmd("MAIL FROM:<a@b.test>")) == ["250 2.1.0"]  # the transaction was reset


def test_long_data_line_in_many_chunks_stays_in_data(ctx):
    s = ehlo(ctx)
    transaction(s)
    out = b""
    for _ in range(20):
        out += s.send("y" * 700)
    out += s.send("\r\nQUIT\r\n")
    out += s.send("x" * 300)
    out += s.send("\r\n")
    assert out == b"" and not s.closed
    assert s.codes(s.send(".\r\nNOOP\r\n")) == ["250 2.0.0", "250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b"y" * 14000 + b"\r\nQUIT\r\n" + b"x" * 300 + b"\r\n"


def test_a_long_line_without_end_is_bounded_by_the_message_size(small):
    """No line limit, but no unbounded buffer either: an endless line is
    written as it comes and fails at MaxMessageSize; the session reads on
    to the final dot."""
    s = ehlo(small)
    transaction(s)
    for _ in range(10):
        assert s.send("z" * 10000) == b""
        assert s.proto.smtp.buffered < 10000 + PARTIAL_LINE_MAX
    assert s.codes(s.send("\r\n.\r\n")) == ["552 5.3.4"]
    assert maildir_messages(small, JOHN) == []


def test_long_data_line_then_end_marker_in_later_chunks(ctx):
    s = ehlo(ctx)
    transaction(s)
    s.send("y" * 1500)
    s.send("tail\r\n")
    assert s.codes(s.send(".\r\n")) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b"y" * 1500 + b"tail\r\n"


# --- SMTP smuggling: one test per attack ------------------------------------------------

SMUGGLED = "MAIL FROM:<admin@example.com>\r\nRCPT TO:<jane@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n"


def smuggle(ctx, attack: str, pieces: int = 1):
    s = ehlo(ctx)
    transaction(s)
    stream = ("Subject: hi\r\n\r\nhello" + attack + SMUGGLED + "\r\n.\r\n").encode()
    out = b""
    step = max(1, len(stream) // pieces)
    for i in range(0, len(stream), step):
        if s.closed:
            break
        out += s.send(stream[i:i + step])
    assert s.codes(out) == [code(R.BARE_LINE_ENDING)] == ["554 5.6.0"], out
    assert s.closed
    assert maildir_messages(ctx, JOHN) == [] and maildir_messages(ctx, "jane@example.com") == []


def test_smuggling_lf_dot_lf(ctx):
    smuggle(ctx, "\n.\n")


def test_smuggling_lf_dot_crlf(ctx):
    smuggle(ctx, "\n.\r\n")


def test_smuggling_crlf_dot_lf(ctx):
    smuggle(ctx, "\r\n.\n")


def test_smuggling_cr_dot_cr(ctx):
    smuggle(ctx, "\r.\r")


def test_smuggling_cr_dot_crlf(ctx):
    smuggle(ctx, "\r.\r\n")


def test_smuggling_crlf_dot_cr(ctx):
    smuggle(ctx, "\r\n.\r")


def test_smuggling_bare_lf_anywhere(ctx):
    smuggle(ctx, "\nX-Header: y\r\n")


def test_smuggling_bare_cr_anywhere(ctx):
    smuggle(ctx, "\rX\r\n")


def test_smuggling_byte_by_byte(ctx):
    smuggle(ctx, "\n.\r\n", pieces=10000)


def test_smuggling_bare_cr_in_an_overlong_line(ctx):
    """A bare CR in a line long enough to be taken before its end."""
    s = ehlo(ctx)
    transaction(s)
    out = s.send("a" * 500 + "\r" + "b" * PARTIAL_LINE_MAX)
    assert s.codes(out) == ["554 5.6.0"] and s.closed
    assert maildir_messages(ctx, JOHN) == []


def test_crlf_dot_crlf_is_the_only_end(ctx):
    """CRLF inside a line that is not followed by a dot is ordinary text."""
    s = ehlo(ctx)
    transaction(s)
    assert s.codes(s.send("a\r\n.b\r\n..\r\n.\r\n")) == ["250 2.0.0"]
    assert body_of(maildir_messages(ctx, JOHN)[0]) == b"a\r\nb\r\n.\r\n"


# --- DATA sequence ----------------------------------------------------------------------


def test_data_needs_mail_and_rcpt(ctx):
    s = ehlo(ctx)
    assert s.codes(s.cmd("DATA")) == ["503 5.5.1"]
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.codes(s.cmd("DATA")) == ["503 5.5.1"]


def test_data_before_mail_and_before_rcpt_say_what_is_missing(ctx):
    """Each says what to send first (it once said "Need MAIL before RCPT")."""
    s = ehlo(ctx)
    assert s.cmd("DATA") == R.NEED_MAIL_BEFORE_DATA.to_bytes() == b"503 5.5.1 Need MAIL before DATA\r\n"
    assert s.cmd(f"RCPT TO:<{JOHN}>") == b"503 5.5.1 Need MAIL before RCPT\r\n"
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.cmd("DATA") == b"503 5.5.1 Need RCPT before DATA\r\n"


def test_data_with_argument_refused(ctx):
    s = ehlo(ctx)
    s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\n")
    assert s.codes(s.cmd("DATA now")) == ["501 5.5.4"]


def test_data_after_every_rcpt_failed_is_554(ctx):
    s = ehlo(ctx)
    out = s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@example.com>\r\nRCPT TO:<x@evil.test>\r\nDATA\r\n")
    assert s.codes(out) == ["250 2.1.0", "550 5.1.1", "554 5.7.1", code(R.NO_VALID_RECIPIENTS)]


# --- pipelining order (twisted/twisted#8126) --------------------------------------------


@implementer(IRecipientPolicy)
class SlowRecipients:
    """A recipient policy whose answers arrive later, when the test says."""

    def __init__(self):
        self.pending: list[tuple[str, defer.Deferred]] = []

    def check_recipient(self, session, recipient):
        d = defer.Deferred()
        self.pending.append((recipient.address, d))
        return d

    def answer(self, accept: bool = True):
        address, d = self.pending.pop(0)
        if accept:
            d.callback(RecipientVerdict(R.RECIPIENT_OK, "test", mailboxes=(JOHN,), address=address))
        else:
            d.callback(RecipientVerdict(R.UNKNOWN_USER, "test", address=address))

    def fail(self):
        _, d = self.pending.pop(0)
        d.errback(RuntimeError("back-end down"))


def test_pipelining_replies_in_order_while_a_check_is_pending(tmp_path):
    slow = SlowRecipients()
    ctx = make_context(tmp_path, recipients=slow)
    s = ehlo(ctx)
    out = s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.com>\r\nRCPT TO:<two@example.com>\r\n"
                 "NOOP\r\nRCPT TO:<three@example.com>\r\nDATA\r\n")
    # Replies to a pipelined group are held until the group is drained
    # (RFC 2920 3.2), and nothing past the pending RCPT is asked yet.
    assert s.codes(out) == []
    assert [a for a, _ in slow.pending] == ["one@example.com"]
    slow.answer(False)
    assert s.codes(s.take()) == []
    assert [a for a, _ in slow.pending] == ["two@example.com"]
    slow.answer(True)
    s.send("hello")  # more input while a check is pending is queued, not answered
    slow.answer(True)
    assert s.codes(s.take()) == ["250 2.1.0", "550 5.1.1", "250 2.1.5", "250 2.0.0", "250 2.1.5", "354 End"]
    assert s.codes(s.send("\r\n.\r\n")) == ["250 2.0.0"]


def test_pipelined_group_is_answered_in_one_write(tmp_path):
    """One write per pipelined group: no small packets for Nagle and the
    client's delayed ACK to stall (the gateway bench found this)."""
    slow = SlowRecipients()
    ctx = make_context(tmp_path, recipients=slow)
    s = ehlo(ctx)
    writes = []
    real_write = s.transport.write
    s.transport.write = lambda data: (writes.append(data), real_write(data))
    s.send("MAIL FROM:<a@b.test>\r\n" + "".join(f"RCPT TO:<r{i}@example.com>\r\n" for i in range(5)))
    for _ in range(5):
        slow.answer(True)
    assert len(writes) == 1
    assert s.codes(writes[0]) == ["250 2.1.0"] + ["250 2.1.5"] * 5


def test_quit_after_pipelined_commands_sends_every_reply(tmp_path):
    slow = SlowRecipients()
    ctx = make_context(tmp_path, recipients=slow)
    s = ehlo(ctx)
    s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.com>\r\nQUIT\r\nNOOP\r\n")
    slow.answer(True)
    assert s.codes(s.take()) == ["250 2.1.0", "250 2.1.5", "221 2.0.0"]
    assert s.transport.disconnecting


def test_pipelining_failed_check_is_451_in_order(tmp_path):
    slow = SlowRecipients()
    ctx = make_context(tmp_path, recipients=slow)
    s = ehlo(ctx)
    with LogCapture():
        s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.com>\r\nNOOP\r\n")
        slow.fail()
    assert s.codes(s.take()) == ["250 2.1.0", "451 4.3.0", "250 2.0.0"]


def test_a_verdict_the_session_cannot_take_is_451_in_order(tmp_path):
    """A policy answering nonsense is an internal error: logged, 451, and
    the session goes on (no hang waiting for a reply that never comes)."""
    @implementer(IRecipientPolicy)
    class Nonsense:
        def check_recipient(self, session, recipient):
            return defer.succeed(object())

    s = ehlo(make_context(tmp_path, recipients=Nonsense()))
    with LogCapture() as logs:
        out = s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.com>\r\nNOOP\r\n")
    assert s.codes(out) == ["250 2.1.0", "451 4.3.0", "250 2.0.0"]
    assert "internal error" in logs.text()


def test_pipelining_with_real_policy_in_one_packet(ctx):
    s = ehlo(ctx)
    out = s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@example.com>\r\nRCPT TO:<{JOHN}>\r\n"
                 "RCPT TO:<x@evil.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    assert s.codes(out) == ["250 2.1.0", "550 5.1.1", "250 2.1.5", "554 5.7.1", "354 End", "250 2.0.0",
                            "221 2.0.0"]


def test_disconnect_while_a_check_is_pending(tmp_path):
    slow = SlowRecipients()
    ctx = make_context(tmp_path, recipients=slow)
    s = ehlo(ctx)
    # MAIL's reply waits for the pipelined group; RCPT is being checked
    assert s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\nNOOP\r\n") == b""
    s.lose()
    slow.answer(True)  # must not write to a closed session or raise
    assert s.take() == b""  # nothing was written after the connection was lost
    assert s.proto.smtp.transaction is None or s.proto.smtp.transaction.recipients == []
    assert ctx.clock.getDelayedCalls() == []


# --- relay control at RCPT ----------------------------------------------------------


def test_relay_denied_is_554_and_logged(ctx):
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<john@example.com>")  # a local sender changes nothing
    with LogCapture() as logs:
        out = s.cmd("RCPT TO:<user@evil.test>")
    assert s.codes(out) == ["554 5.7.1"]
    assert re.search(r'^reject session=\w{12} ip=127\.0\.0\.3 command=RCPT code=554 status=5\.7\.1 '
                     r'reason="Relay access denied" helo=\S+ from=john@example\.com to=user@evil\.test '
                     r'detail="relay denied[^"]*"$', logs.text(), re.M)


def test_relay_group_client_may_relay(ctx):
    s = ehlo(ctx, ip="127.0.0.2")
    s.cmd("MAIL FROM:<>")
    assert s.codes(s.cmd("RCPT TO:<user@evil.test>")) == ["250 2.1.5"]


def test_too_many_recipients(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxRecipients": "2"})
    s = ehlo(ctx)
    out = s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\nRCPT TO:<jane@example.com>\r\n"
                 f"RCPT TO:<sales@example.com>\r\n")
    assert s.codes(out) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3"]


def test_rcpt_syntax_errors(ctx):
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.codes(s.cmd("RCPT TO:<>")) == ["501 5.1.3"]
    assert s.codes(s.cmd("RCPT TO:<user@[300.1.1.1]>")) == ["501 5.1.3"]
    assert s.codes(s.cmd(f"RCPT TO:<{JOHN}> NOTIFY=NEVER")) == ["555 5.5.4"]  # no DSN yet


# --- error budgets ------------------------------------------------------------------------


def test_error_budget_then_421(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxErrors": "3"})
    s = ehlo(ctx)
    out = s.send("FOO\r\nBAR\r\nBAZ\r\n")
    assert s.codes(out) == ["500 5.5.2"] * 3 and not s.closed
    out = s.send("QUUX\r\nNOOP\r\n")
    assert s.codes(out) == [code(R.TOO_MANY_ERRORS)] == ["421 4.7.0"]
    assert s.closed
    s.lose()
    assert ctx.clock.getDelayedCalls() == []


def test_junk_commands_count_as_errors_past_their_budget(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxErrors": "3"})
    s = ehlo(ctx)
    out = s.send("NOOP\r\nRSET\r\n" * 50)
    assert s.codes(out) == ["250 2.0.0"] * 100
    out = s.send("NOOP\r\nHELP\r\nRSET\r\n")  # answered, but each is now an error
    assert [c[:3] for c in s.codes(out)] == ["250", "214", "250"] and not s.closed
    assert s.codes(s.cmd("NOOP")) == ["421 4.7.0"] and s.closed


def test_idle_timeout_421(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "60"})
    s = ehlo(ctx)
    ctx.clock.advance(59)
    s.cmd("NOOP")
    ctx.clock.advance(59)
    assert not s.closed
    ctx.clock.advance(2)
    assert s.codes(s.take()) == ["421 4.4.2"] and s.closed


# --- STARTTLS: state reset and injection, one test per attack ---------------------------


@pytest.fixture
def tctx(tmp_path):
    return make_context(tmp_path, CRAM_MD5, tls=SENTINEL_TLS)


def starttls(s, pipelined: str = "") -> bytes:
    """Send STARTTLS (and whatever the attacker pipelines behind it in the
    same packet); return what was written after TLS started."""
    after = s.send("STARTTLS\r\n" + pipelined)
    assert s.transport.tls_context is SENTINEL_TLS
    assert s.transport.before_tls == b"220 2.0.0 Ready to start TLS\r\n"
    return after


def test_starttls_pipelined_commands_are_not_executed(tctx):
    s = ehlo(tctx)
    with LogCapture() as logs:
        after = starttls(s, f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")
    assert after == b""  # not one of them answered inside TLS
    assert "discarded" in logs.text()
    # Inside TLS the session starts over: EHLO first, no transaction open.
    assert s.codes(s.cmd("MAIL FROM:<a@b.test>")) == ["503 5.5.1"]
    s.cmd("EHLO client.test")
    assert s.codes(s.cmd(f"RCPT TO:<{JOHN}>")) == ["503 5.5.1"]


def test_starttls_pipelined_ehlo_is_not_kept(tctx):
    s = connect(tctx)
    s.take()  # the greeting
    s.cmd("EHLO client.test")
    assert starttls(s, "EHLO injected.test\r\n") == b""
    assert s.codes(s.cmd("MAIL FROM:<a@b.test>")) == ["503 5.5.1"]


def test_starttls_pipelined_auth_is_not_executed(tctx):
    s = ehlo(tctx)
    assert starttls(s, "AUTH PLAIN AGpvaG4AYm9ndXM=\r\nAUTH PLAIN AGpvaG4Aam9obi1zZWNyZXQ=\r\n") == b""
    assert s.proto.session.authenticated is None
    assert s.proto.smtp.mode == "COMMAND"


def test_starttls_pipelined_in_separate_reads_before_the_reply(tctx):
    """Bytes already buffered behind STARTTLS when it is processed (a
    pending RCPT check held them back) are discarded too."""
    slow = SlowRecipients()
    tctx.policies = dataclasses.replace(tctx.policies, recipients=slow)
    s = ehlo(tctx)
    out = s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\nSTARTTLS\r\n")
    out += s.send("RSET\r\nMAIL FROM:<evil@b.test>\r\n")
    assert s.codes(out) == []  # held: a pipelined group is answered together
    slow.answer(True)
    assert s.transport.tls_context is SENTINEL_TLS
    assert s.codes(s.transport.before_tls) == ["250 2.1.0", "250 2.1.5", "220 2.0.0"]
    assert s.take() == b""
    assert s.proto.smtp.transaction is None


def test_starttls_resets_the_session(tctx):
    s = ehlo(tctx)
    s.send(f"MAIL FROM:<a@b.test>\r\nRCPT TO:<{JOHN}>\r\n")
    starttls(s)
    sess = s.proto.session
    assert (sess.tls, sess.helo, sess.authenticated) == (True, None, None)
    assert s.proto.smtp.transaction is None  # no sender, no recipients
    out = s.cmd("EHLO client.test")
    ext = ext_lines(out)
    assert "STARTTLS" not in ext  # RFC 3207 4.2
    assert "AUTH CRAM-MD5 PLAIN LOGIN" in ext  # plain-text mechanisms only now


def test_starttls_twice_is_refused(tctx):
    s = ehlo(tctx)
    starttls(s)
    s.cmd("EHLO client.test")
    assert s.codes(s.cmd("STARTTLS")) == ["503 5.5.1"]


def test_starttls_unavailable_without_certificate(ctx):
    s = ehlo(ctx)
    assert s.codes(s.cmd("STARTTLS")) == ["454 4.7.0"]


def test_starttls_with_argument_refused(tctx):
    s = ehlo(tctx)
    assert s.codes(s.cmd("STARTTLS now")) == ["501 5.5.4"]
    assert s.transport.tls_context is None


def test_received_header_esmtps_after_starttls(tctx):
    s = ehlo(tctx)
    starttls(s)
    s.cmd("EHLO client.test")
    transaction(s)
    s.send("hi\r\n.\r\n")
    assert " with ESMTPS id " in received(tctx)


def test_smtps_listener_is_tls_from_the_start(tctx):
    s = ehlo(tctx, listener="smtps")
    ext = ext_lines(s.cmd("EHLO client.test"))
    assert "STARTTLS" not in ext and "AUTH CRAM-MD5 PLAIN LOGIN" in ext
    assert s.codes(s.cmd("STARTTLS")) == ["503 5.5.1"]
    transaction(s)
    s.send("hi\r\n.\r\n")
    assert " with ESMTPS id " in received(tctx)


def test_reads_grow_only_while_a_large_message_arrives(ctx):
    """256 KiB per recv after 256 KiB of DATA, the transport's own size
    again after the final dot (a big buffer would cost small reads)."""
    s = ehlo(ctx)
    s.transport.bufferSize = 65536
    transaction(s)
    s.send(("x" * 78 + "\r\n") * 1000)  # 80 KB
    assert s.transport.bufferSize == 65536
    s.send(("x" * 78 + "\r\n") * 3000)  # 320 KB in all
    assert s.transport.bufferSize == 1 << 18
    assert s.codes(s.send(".\r\n")) == ["250 2.0.0"]
    assert s.transport.bufferSize == 65536
    assert len(body_of(maildir_messages(ctx, JOHN)[0])) == 80 * 4000


# --- found in review: limits that must hold ------------------------------------

def test_input_is_not_buffered_without_limit_while_a_check_is_pending(tmp_path):
    """A client that keeps sending while its RCPT is being checked is
    paused (TCP backpressure), not buffered without bound."""
    from mailguard.smtpd.protocol import INPUT_HOLD_MAX

    slow = SlowRecipients()
    s = ehlo(make_context(tmp_path, recipients=slow))
    s.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.com>\r\n")
    assert s.transport.producerState == "producing"
    for _ in range(INPUT_HOLD_MAX // 4096 + 2):
        s.proto.dataReceived(b"x" * 4096)
    assert s.transport.producerState == "paused"
    slow.answer(True)  # the check ends; the junk is discarded as an over-long line
    assert s.transport.producerState == "producing"
    assert s.proto.smtp.buffered <= 4096 * 2


def test_vrfy_while_disabled_counts_as_an_error(tmp_path):
    ctx = make_context(tmp_path, {"VRFYEnabled": "0", "SmtpErrorSleepTime": "0"})
    s = ehlo(ctx)
    for _ in range(ctx.config.max_errors):
        assert s.codes(s.cmd("VRFY john")) == ["502 5.5.1"]
    assert s.codes(s.cmd("VRFY john")) == ["421 4.7.0"]
    assert s.transport.disconnecting


def test_malformed_vrfy_from_a_trusted_client_counts_as_an_error(tmp_path):
    ctx = make_context(tmp_path, {"SmtpErrorSleepTime": "0"})
    s = ehlo(ctx, ip="127.0.0.2")
    for _ in range(ctx.config.max_errors):
        assert s.codes(s.cmd("VRFY")) == ["501 5.5.4"]
    assert s.codes(s.cmd("VRFY")) == ["421 4.7.0"]


def test_zero_idle_timeout_and_session_time_mean_no_limit(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "0", "SmtpMaxSessionTime": "0"})
    s = ehlo(ctx)
    assert ctx.clock.getDelayedCalls() == []
    ctx.clock.advance(10 ** 6)
    assert not s.transport.disconnecting
    assert s.codes(s.cmd("NOOP")) == ["250 2.0.0"]
