"""The trace headers always parse (issue 10, item 6): whatever the client
says in EHLO, the ``Received:`` header mailguard writes is valid RFC 5322.

Each header is parsed back with Python's ``email`` package: the message
with ``BytesParser(policy=email.policy.strict)`` (it raises on a message
defect) and ``default``, and the ``Received:`` value token by token with
the package's RFC 5322 tokenizer (``email._header_value_parser``: comments,
quoted strings, angle addresses, domain literals, dot-atoms), which
reports an unclosed comment or a stray character as a defect.  The
``email`` package itself treats ``Received`` as unstructured and would
accept ``from a(b ([127.0.0.2])`` without a word: hence the tokenizer.
"""

from __future__ import annotations

import email.policy
import email.utils
from email import _header_value_parser as hvp
from email.errors import HeaderParseError
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.policy.session import Session
from mailguard.smtpd.transaction import HELO_MAX, helo_token, trace_headers
from mailguard.store.envelope import Envelope
from mailguard.testing import connect
from tests.helpers_context import maildir_messages, make_context

T = 1_700_000_000.0
BODY = b"Subject: after the trace\r\nX-Test: 1\r\n\r\nbody line\r\n"


def _bare(token) -> tuple[str, list[str]]:
    """A parsed token's text without its comments and folding, and the
    comments' contents."""
    if isinstance(token, hvp.Comment):
        return "", [token.content]
    if isinstance(token, hvp.AngleAddr):
        return f"<{token.addr_spec}>", []
    if not isinstance(token, hvp.TokenList):
        return ("" if token.token_type in ("fws", "cfws") else str(token)), []
    text, comments = "", []
    for part in token:
        t, c = _bare(part)
        text, comments = text + t, comments + c
    return text.strip(), comments


def received_tokens(value: str, comments: list | None = None) -> tuple[list[str], str]:
    """The received-tokens of a Received value (RFC 5322 3.6.7:
    ``*received-token ";" date-time``) without their comments (which go
    to C{comments}), and the date text.  Raises AssertionError on any
    defect the tokenizer reports."""
    tokens, rest = [], value
    comments = [] if comments is None else comments
    while rest and rest[0] != ";":
        try:
            if rest[0] in hvp.CFWS_LEADER:
                token, rest = hvp.get_cfws(rest)
            elif rest[0] == "<":
                token, rest = hvp.get_angle_addr(rest)
            elif rest[0] == "[":
                token, rest = hvp.get_domain_literal(rest)
            else:
                token, rest = hvp.get_word(rest) if rest[0] == '"' else hvp.get_dot_atom(rest)
        except HeaderParseError as e:
            raise AssertionError(f"not an RFC 5322 received-token at {rest[:40]!r}: {e}") from None
        assert token.all_defects == [], (rest[:40], token.all_defects)
        text, found = _bare(token)
        comments += found
        if text:
            tokens.append(text)
    assert rest.startswith(";"), f"no ';' date-time in {value!r}"
    return tokens, rest[1:].strip()


def parse_trace(header: bytes, ip: str = "127.0.0.2", when: float = T):
    """Parse C{header} + a small message back with the strict and the
    default policy; return the Received value and its tokens."""
    data = header + BODY
    for line in data.split(b"\r\n"):
        assert len(line) <= 998  # RFC 5322 2.1.1
        assert all(32 <= b < 127 or b == 9 for b in line), line  # printable ASCII and HTAB only
    for policy in (email.policy.strict, email.policy.default):
        msg = BytesParser(policy=policy).parsebytes(data)
        assert msg.defects == []
        assert list(msg.keys()) == ["Return-Path", "Received", "Subject", "X-Test"]
        assert msg["Subject"] == "after the trace" and msg.get_content() == "body line\r\n"
        received = msg["Received"]
        assert received.defects == ()
    value, comments = str(received), []
    tokens, date = received_tokens(value, comments)
    assert comments == [f"[{ip}]"]  # the client's address, and no other comment
    assert email.utils.parsedate_to_datetime(date).timestamp() == when
    return value, tokens


def trace_for(helo: str | None, rcpts=("john@example.com",), sender="a@sender.test", **facts) -> bytes:
    envelope = Envelope(mail_from=sender, mailboxes=tuple(rcpts), relay_recipients=(), mail_params={},
                        rcpt_params={}, client_ip="127.0.0.2", helo=helo or "")
    session = Session("127.0.0.2", 40000, "smtp", helo=helo, esmtp=True, **facts)
    return trace_headers(envelope, session, "mx.example.com", T)


# --- the HELO name -----------------------------------------------------------------------


@pytest.mark.parametrize("helo, token", [
    ("client.test", "client.test"),
    ("Client-1.Example.COM.", "Client-1.Example.COM"),  # a dot-atom ends without a dot
    ("[127.0.0.2]", "[127.0.0.2]"),
    ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
    ("a(b", "a?b"),  # the issue's EHLO a(b c)d: its first word
    ("a(b)c", "a?b?c"),
    ("x\\(", "x??"),
    ("a\x00b", "a?b"),
    ("a\x1bb\x7f", "a?b?"),
    ("münchen.example", "m?nchen.example"),
    ('"quoted"', "?quoted?"),
    ("<a@b>", "?a?b?"),
    ("[not-a-literal]", "?not-a-literal?"),
    ("..a..b..", "a.b"),
    ("...", "unknown"),
    ("", "unknown"),
    ("x;y", "x?y"),  # a ';' would end the tokens before the date
    ("a" * 300 + ".test", "a" * HELO_MAX),
])
def test_helo_token(helo, token):
    assert helo_token(helo) == token


@pytest.mark.parametrize("helo", ["a(b", "a(b c)d", "x)y", "\\", "a\\)b", "((((", "a\x00b", "m\u00fcnchen",
                                  "a\r\nX-Injected: yes", "x" * 1000, ";", "<x>", '"', "[1.2.3.4"])
def test_hostile_helo_gives_a_header_that_parses(helo):
    value, tokens = parse_trace(trace_for(helo))
    assert tokens[0] == "from" and tokens[1] == helo_token(helo)
    assert tokens[2:] == ["by", "mx.example.com", "with", "ESMTP", "id", tokens[7], "for",
                          "<john@example.com>"]
    assert value.startswith(f"from {tokens[1]} ([127.0.0.2])\tby ")


def test_the_issues_example_no_longer_swallows_the_header():
    """``EHLO a(b c)d`` was written ``from a(b ([127.0.0.2])``: an unclosed
    comment that ran to the end of the header."""
    old = (b"Return-Path: <a@sender.test>\r\nReceived: from a(b ([127.0.0.2])\r\n"
           b"\tby mx.example.com with ESMTP id 1; Tue, 14 Nov 2023 22:13:20 +0000\r\n")
    with pytest.raises(AssertionError):
        parse_trace(old)
    value, _ = parse_trace(trace_for("a(b"))
    assert value.startswith("from a?b ([127.0.0.2])")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=600))
def test_any_helo_gives_a_header_that_parses(helo):
    _, tokens = parse_trace(trace_for(helo))
    assert tokens[:2] == ["from", helo_token(helo)]
    assert len(tokens[1]) <= HELO_MAX


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_helo_bytes_give_a_header_that_parses(raw):
    helo = raw.decode("utf-8", "surrogateescape")
    parse_trace(trace_for(helo))


# --- the envelope addresses --------------------------------------------------------------


@pytest.mark.parametrize("address", ['"a b(c"@example.com', '"x\\"y)"@example.com', '"(("@example.com'])
def test_quoted_local_parts_stay_inside_their_quotes(address):
    value, tokens = parse_trace(trace_for("client.test", rcpts=(address,), sender=address))
    assert tokens[-1] == f"<{address}>"


def test_an_address_the_parser_would_never_give_is_still_made_safe():
    value, tokens = parse_trace(trace_for("client.test", rcpts=("a\x00(b@x\r\n.test",),
                                          sender="c>d\x07@e.test"))
    assert tokens[-1] == "<a??b@x??.test>"
    assert value.count("<") == 1 and tokens[1] == "client.test"


def test_null_sender_and_several_recipients():
    data = trace_for("client.test", rcpts=("a@x.test", "b@x.test"), sender="")
    assert data.startswith(b"Return-Path: <>\r\n")
    _, tokens = parse_trace(data)
    assert "for" not in tokens  # RFC 5321 4.4: only for a single recipient


@pytest.mark.parametrize("facts, kind", [({}, "ESMTP"), ({"tls": True}, "ESMTPS"),
                                         ({"tls": True, "authenticated": "john@example.com"}, "ESMTPSA")])
def test_protocol_types_parse(facts, kind):
    _, tokens = parse_trace(trace_for("client.test", **facts))
    assert tokens[4:6] == ["with", kind]


# --- on the wire: hostile EHLO arguments through a real session --------------------------


@pytest.mark.parametrize("ehlo, token", [
    (b"a(b c)d", "a?b"),
    (b"x\\y(", "x?y?"),
    (b"a\x00b", "a?b"),
    (b"a\rX-Injected: 1", "a"),  # a bare CR is whitespace in a command line
    ("m\u00fcnchen.example".encode(), "m?nchen.example"),
    (b"(" * 400, "?" * 255),
])
def test_hostile_ehlo_on_the_wire(tmp_path, ehlo, token):
    ctx = make_context(tmp_path)
    s = connect(ctx)
    s.take()  # the greeting
    assert s.send(b"EHLO " + ehlo + b"\r\n").startswith(b"250-mx.example.com\r\n")
    s.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
    assert s.codes(s.send(BODY + b".\r\n")) == ["250 2.0.0"]
    [stored] = maildir_messages(ctx, "john@example.com")
    value, tokens = parse_trace(stored[:stored.index(BODY)], ip="127.0.0.3", when=ctx.clock.seconds())
    assert tokens[:2] == ["from", token] and "X-Injected" not in value
