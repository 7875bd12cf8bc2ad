"""Tests for mailguard.policy.addresses: strict RFC 5321 paths, MAIL/RCPT, VRFY."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mailguard import replies
from mailguard.policy.addresses import (
    AddressError,
    Mailbox,
    hidden_destination,
    parse_mail_from,
    parse_path,
    parse_rcpt_to,
    parse_etrn_argument,
    parse_vrfy_argument,
)

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
L64 = "a" * 64


# --- parse_path: what is accepted, and what it becomes ------------------------

VALID_PATHS = [
    # (text, expected Mailbox)
    ("<user@example.com>", Mailbox("user", "example.com")),
    ("<User.Name+tag@Example.COM>", Mailbox("User.Name+tag", "example.com")),
    ("<user@example.com.>", Mailbox("user", "example.com")),
    ("<user@mail.example.com>", Mailbox("user", "mail.example.com")),
    ("<user@a-b.example>", Mailbox("user", "a-b.example")),
    ("<user@123.example>", Mailbox("user", "123.example")),
    ("<user@localhost>", Mailbox("user", "localhost")),
    ("<user@xn--bcher-kva.example>", Mailbox("user", "xn--bcher-kva.example")),
    (f"<{ATEXT[:60]}@x.test>", Mailbox(ATEXT[:60], "x.test")),
    (f"<{ATEXT[60:]}@x.test>", Mailbox(ATEXT[60:], "x.test")),
    (f"<{L64}@x.test>", Mailbox(L64, "x.test")),
    (f"<u@{'a' * 63}.test>", Mailbox("u", f"{'a' * 63}.test")),
    ("<@relay.test:user@example.com>", Mailbox("user", "example.com")),
    ("<@a.test,@b.test:user@example.com>", Mailbox("user", "example.com")),
    ('<"john"@example.com>', Mailbox("john", "example.com")),
    ('<"john.smith"@example.com>', Mailbox("john.smith", "example.com")),
    ('<"a\\b"@example.com>', Mailbox("ab", "example.com")),
    ('<"john doe"@example.com>', Mailbox("john doe", "example.com", True)),
    ('<"a\\"b"@example.com>', Mailbox('a"b', "example.com", True)),
    ('<"a\\\\b"@example.com>', Mailbox("a\\b", "example.com", True)),
    ('<"a..b"@example.com>', Mailbox("a..b", "example.com", True)),
    ('<"a>b"@example.com>', Mailbox("a>b", "example.com", True)),
    ("<user@[192.0.2.1]>", Mailbox("user", "[192.0.2.1]")),
    ("<user@[IPv6:2001:DB8:0:0::1]>", Mailbox("user", "[IPv6:2001:db8::1]")),
    ("<user@[ipv6:::1]>", Mailbox("user", "[IPv6:::1]")),
    ("<user@[IPv6:::ffff:192.0.2.1]>", Mailbox("user", "[IPv6:::ffff:c000:201]")),
    ("user@example.com", Mailbox("user", "example.com")),  # bare, for interop
    ("USER@EXAMPLE.COM.", Mailbox("USER", "example.com")),
    (b"<user@example.com>", Mailbox("user", "example.com")),
]


@pytest.mark.parametrize("text, expected", VALID_PATHS, ids=[repr(t) for t, _ in VALID_PATHS])
def test_parse_path_valid(text, expected):
    assert parse_path(text, allow_null=False) == expected
    assert parse_path(text, allow_null=True) == expected


def test_null_path():
    assert parse_path("<>", allow_null=True) is None
    assert parse_path(b"<>", allow_null=True) is None
    with pytest.raises(AddressError) as e:
        parse_path("<>", allow_null=False)
    assert e.value.reply == replies.BAD_ADDRESS_SYNTAX


INVALID_PATHS = [
    "",
    "<",
    ">",
    "<<>>",
    "<user@example.com",
    "user@example.com>",
    "<<user@example.com>>",
    "<user>",
    "user",
    "<@example.com>",
    "<user@>",
    "<@>",
    "<.user@x.test>",
    "<user.@x.test>",
    "<us..er@x.test>",
    "<user@-x.test>",
    "<user@x-.test>",
    "<user@x..test>",
    "<user@.x.test>",
    "<user@x.test..>",
    "<user@.>",
    "<user@y_z.test>",
    "<user@127.0.0.1>",  # an IP address needs brackets
    "<user@example.123>",
    "<user@[127.0.0.01]>",
    "<user@[256.0.0.1]>",
    "<user@[1.2.3]>",
    "<user@[1.2.3.4.5]>",
    "<user@[]>",
    "<user@[IPv6:]>",
    "<user@[IPv6:fe80::1%eth0]>",
    "<user@[IPv6:1.2.3.4]>",
    "<user@[IPv6:12345::]>",
    "<user@[tag:content]>",
    "<user@[1.2.3.4>",
    "<user@1.2.3.4]>",
    "<user@ex ample.test>",
    "< user@x.test>",
    "<user@x.test >",
    "<user @x.test>",
    "user @x.test",
    '"a b"@x.test',  # bare form holds no whitespace
    "<user@x.test@y.test>",
    "<user@@x.test>",
    '<"unterminated@x.test>',
    '<"a"b"@x.test>',
    '<"a\\',
    '<"a\x00b"@x.test>',
    '<"a\tb"@x.test>',
    "<a\tb@x.test>",
    "<user@x.test\n>",
    "<user@x.test>\r\n",
    "<user\r\n@x.test>",
    '<""@x.test>',
    "<usér@x.test>",  # SMTPUTF8 is not supported
    "<user@bücher.test>",
    b"<us\xc3\xa9r@x.test>",
    b"<user@x.test\xff>",
    f"<{L64}a@x.test>",
    f'<"{"a" * 63}"@x.test>',  # 65 octets with the quotes
    f"<u@{'a' * 64}.test>",
    f"<u@{'.'.join(['a' * 63] * 4)}.tst>",  # > 255 octets
    "<@x.test,user@y.test>",
    "<@x.test:@y.test:user@z.test>",
    "<@x.test,y.test:user@z.test>",
    "<@[192.0.2.1]:user@y.test>",
    "<@:user@y.test>",
    "@x.test:user@y.test",  # no route in the bare form
    "<x.test:user@y.test>",
    "<x.test!user>",
    "<user%x.test>",
]


@pytest.mark.parametrize("text", INVALID_PATHS, ids=[repr(t) for t in INVALID_PATHS])
def test_parse_path_invalid(text):
    for allow_null in (False, True):
        with pytest.raises(AddressError) as e:
            parse_path(text, allow_null=allow_null)
        assert e.value.reply == replies.BAD_ADDRESS_SYNTAX
    with pytest.raises(AddressError) as e:
        parse_path(text, allow_null=True, reply=replies.BAD_SENDER_SYNTAX)
    assert e.value.reply == replies.BAD_SENDER_SYNTAX


def test_path_length_limit():
    # 256 octets in all is the most RFC 5321 4.5.3.1.3 allows, even when
    # the local part (64) and the domain (255) are each within their limits.
    domain = ".".join(["a" * 60] * 3) + ".example"  # 190 octets
    path = "<" + "u" * 63 + "@" + domain + ">"
    assert len(path) == 256
    assert parse_path(path, allow_null=False).domain == domain
    longer = "<" + "u" * 64 + "@" + domain + ">"
    with pytest.raises(AddressError, match="path longer"):
        parse_path(longer, allow_null=False)
    with pytest.raises(AddressError, match="path longer"):
        parse_path("<@relay.test:" + path[1:], allow_null=False)


def test_type_error_for_non_text():
    with pytest.raises(TypeError):
        parse_path(None, allow_null=True)  # type: ignore[arg-type]


def test_address_error_is_value_error_with_reply():
    err = AddressError("why")
    assert isinstance(err, ValueError)
    assert err.reply == replies.BAD_ADDRESS_SYNTAX
    assert str(err) == "why"


# --- Mailbox --------------------------------------------------------------------

MAILBOX_FORMS = [
    (Mailbox("user", "example.com"), "user@example.com", False),
    (Mailbox("john doe", "example.com", True), '"john doe"@example.com', False),
    (Mailbox('a"b\\c', "example.com", True), '"a\\"b\\\\c"@example.com', False),
    (Mailbox("user", "[192.0.2.1]"), "user@[192.0.2.1]", True),
    (Mailbox("user", "[IPv6:2001:db8::1]"), "user@[IPv6:2001:db8::1]", True),
]


@pytest.mark.parametrize("mailbox, address, literal", MAILBOX_FORMS)
def test_mailbox_address(mailbox, address, literal):
    assert mailbox.address == address
    assert str(mailbox) == address
    assert mailbox.is_ip_literal is literal
    assert parse_path(f"<{address}>", allow_null=False) == mailbox


def test_mailbox_ip_literal():
    import ipaddress

    assert Mailbox("u", "example.com").ip_literal is None
    assert Mailbox("u", "[192.0.2.1]").ip_literal == ipaddress.ip_address("192.0.2.1")
    assert Mailbox("u", "[IPv6:::1]").ip_literal == ipaddress.ip_address("::1")


def test_mailbox_is_frozen():
    mailbox = Mailbox("user", "example.com")
    with pytest.raises(AttributeError):
        mailbox.local = "other"  # type: ignore[misc]


# --- MAIL FROM / RCPT TO ------------------------------------------------------------

MB = Mailbox("a", "x.test")

MAIL_FROM_OK = [
    ("FROM:<a@x.test>", MB, {}),
    ("from:<a@x.test>", MB, {}),
    ("From: <a@x.test>", MB, {}),
    ("FROM:   <a@x.test>", MB, {}),
    ("FROM:<>", None, {}),
    ("FROM:<> RET=HDRS ENVID=QQ314159", None, {"RET": "HDRS", "ENVID": "QQ314159"}),
    ("FROM:<a@x.test> SIZE=1000 BODY=8BITMIME", MB, {"SIZE": "1000", "BODY": "8BITMIME"}),
    ("FROM:<a@x.test> size=1000 body=8bitmime", MB, {"SIZE": "1000", "BODY": "8bitmime"}),
    ("FROM:<a@x.test> SMTPUTF8", MB, {"SMTPUTF8": None}),
    ("FROM:<a@x.test>  SIZE=10  ", MB, {"SIZE": "10"}),
    ("FROM:<a@x.test> AUTH=<>", MB, {"AUTH": "<>"}),
    ("FROM:<a@x.test> AUTH=a+2Bb@x.test", MB, {"AUTH": "a+2Bb@x.test"}),
    ("FROM:a@x.test", MB, {}),
    ("FROM:a@x.test SIZE=10", MB, {"SIZE": "10"}),
    ('FROM:<"a b"@x.test> SIZE=10', Mailbox("a b", "x.test", True), {"SIZE": "10"}),
    ('FROM:<"a> b"@x.test>', Mailbox("a> b", "x.test", True), {}),
    ("FROM:<@r.test:a@x.test>", MB, {}),
    (b"FROM:<a@x.test> SIZE=1", MB, {"SIZE": "1"}),
]


@pytest.mark.parametrize("arg, sender, params", MAIL_FROM_OK, ids=[repr(a) for a, *_ in MAIL_FROM_OK])
def test_parse_mail_from(arg, sender, params):
    assert parse_mail_from(arg) == (sender, params)


MAIL_FROM_BAD = [
    ("", replies.SYNTAX_ERROR),
    ("FROM", replies.SYNTAX_ERROR),
    ("FROM <a@x.test>", replies.SYNTAX_ERROR),
    ("FROM : <a@x.test>", replies.SYNTAX_ERROR),
    ("TO:<a@x.test>", replies.SYNTAX_ERROR),
    ("FROM:", replies.BAD_SENDER_SYNTAX),
    ("FROM:   ", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@x.test", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@@x.test>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a>", replies.BAD_SENDER_SYNTAX),
    ("FROM:a b@x.test", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@x.tést>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@x.test> X=é", replies.BAD_SENDER_SYNTAX),
    ('FROM:<"a@x.test>', replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@x.test>SIZE=1", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> SIZE=1 SIZE=2", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> size=1 SIZE=1", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> SIZE=", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> =1", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> -X=1", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> A=b=c", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> A_B=1", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test>\tSIZE=1", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> SIZE=1\x00", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test> <b@x.test>", replies.SYNTAX_ERROR),
]


@pytest.mark.parametrize("arg, reply", MAIL_FROM_BAD, ids=[repr(a) for a, _ in MAIL_FROM_BAD])
def test_parse_mail_from_refused(arg, reply):
    with pytest.raises(AddressError) as e:
        parse_mail_from(arg)
    assert e.value.reply == reply


RCPT_TO_OK = [
    ("TO:<a@x.test>", MB, {}),
    ("to: <a@x.test>", MB, {}),
    ("TO:<a@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@x.test",
     MB, {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@x.test"}),
    ("TO:<postmaster@example.com>", Mailbox("postmaster", "example.com"), {}),
    ("TO:a@x.test", MB, {}),
]


@pytest.mark.parametrize("arg, rcpt, params", RCPT_TO_OK, ids=[repr(a) for a, *_ in RCPT_TO_OK])
def test_parse_rcpt_to(arg, rcpt, params):
    assert parse_rcpt_to(arg) == (rcpt, params)


RCPT_TO_BAD = [
    ("TO:<>", replies.BAD_ADDRESS_SYNTAX),
    ("TO:", replies.BAD_ADDRESS_SYNTAX),
    ("TO:<a>", replies.BAD_ADDRESS_SYNTAX),
    ("TO:<Postmaster>", replies.BAD_ADDRESS_SYNTAX),  # no postmaster_domain given
    ("TO:<a@x.test> NOTIFY=", replies.SYNTAX_ERROR),
    ("TO:<a@x.test> NOTIFY=NEVER notify=NEVER", replies.SYNTAX_ERROR),
    ("FROM:<a@x.test>", replies.SYNTAX_ERROR),
    ("T0:<a@x.test>", replies.SYNTAX_ERROR),
]


@pytest.mark.parametrize("arg, reply", RCPT_TO_BAD, ids=[repr(a) for a, _ in RCPT_TO_BAD])
def test_parse_rcpt_to_refused(arg, reply):
    with pytest.raises(AddressError) as e:
        parse_rcpt_to(arg)
    assert e.value.reply == reply


@pytest.mark.parametrize("arg", ["TO:<Postmaster>", "TO:<postmaster>", "TO:<POSTMASTER> NOTIFY=NEVER"])
def test_rcpt_postmaster_without_domain(arg):
    """RFC 5321 4.5.1: <Postmaster> with no domain must be accepted; it is
    mapped onto the domain the caller names."""
    rcpt, _ = parse_rcpt_to(arg, postmaster_domain="Example.COM.")
    assert rcpt.local.lower() == "postmaster"
    assert rcpt.domain == "example.com"


# --- hidden destinations -----------------------------------------------------------

HIDDEN = [
    "<user%evil.test@example.com>",
    "<user%evil.test%example.com@example.com>",
    "<evil.test!user@example.com>",
    '<"user@evil.test"@example.com>',
    '<"user%evil.test"@example.com>',
    '<"evil.test!user"@example.com>',
    '<"@evil.test:user"@example.com>',
    '<"user,other"@example.com>',
    '<"user;other"@example.com>',
    '<"<user@evil.test>"@example.com>',
    '<"user(comment)"@example.com>',
    '<"[192.0.2.1]"@example.com>',
    '<"a\\"b"@example.com>',
    '<"a\\\\b"@example.com>',
    "<USER%EVIL.TEST@EXAMPLE.COM>",
]
NOT_HIDDEN = [
    "<user@example.com>",
    "<first.last+tag@example.com>",
    "<o'brien@example.com>",
    "<bounce=user=evil.test@example.com>",
    '<"john doe"@example.com>',
    '<"john"@example.com>',
    "</G=John/S=Doe/@example.com>",
]


@pytest.mark.parametrize("path", HIDDEN)
def test_hidden_destination(path):
    assert hidden_destination(parse_path(path, allow_null=False)) is True


@pytest.mark.parametrize("path", NOT_HIDDEN)
def test_not_hidden_destination(path):
    assert hidden_destination(parse_path(path, allow_null=False)) is False


# --- VRFY arguments -----------------------------------------------------------------

VRFY_ARGS = [
    ("user", "user"),
    ("User.Name", "User.Name"),
    ("user@Example.COM", "user@example.com"),
    ("user@example.com.", "user@example.com"),
    ("<user@example.com>", "user@example.com"),
    ("<user>", "user"),
    ("Full Name <user@example.com>", "user@example.com"),
    ('"Full Name" <user@example.com>', "user@example.com"),
    ('"Name, Full <x>" <user@example.com>', "user@example.com"),
    ("Full Name<user@example.com>", "user@example.com"),
    ("  user@example.com  ", "user@example.com"),
    ("\tuser\t", "user"),
    ('"john"', "john"),
    ('"john doe"', '"john doe"'),
    ('<"john doe"@example.com>', '"john doe"@example.com'),
    ('"a@b"', '"a@b"'),
    ("user%evil.test@example.com", "user%evil.test@example.com"),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
    ("<@relay.test:user@example.com>", "user@example.com"),
    (b"user@example.com", "user@example.com"),
    ("", None),
    ("   ", None),
    ("<>", None),
    ("<", None),
    (">", None),
    ("a b", None),
    ("Full Name", None),
    ("user@", None),
    ("@example.com", None),
    ("<user@example.com", None),
    ("<user@example.com> trailing", None),
    ("<user@example.com>>", None),
    ("Full <Name> <user@example.com>", None),
    ("user@127.0.0.1", None),
    ("user@example.com@evil.test", None),
    ('"john doe"@example.com', None),  # bare form holds no whitespace
    ("usér", None),
    (b"\xff", None),
    ("user\r\n", None),
    ("..", None),
    (f"{L64}a", None),
]


@pytest.mark.parametrize("text, expected", VRFY_ARGS, ids=[repr(t) for t, _ in VRFY_ARGS])
def test_parse_vrfy_argument(text, expected):
    assert parse_vrfy_argument(text) == expected


# --- properties -------------------------------------------------------------------

# Characters that exercise every branch of the grammar.
TRICKY = st.lists(
    st.sampled_from(list('<>@".:,[]\\%! \t\r\n\x00aZ09-_+=é') + ["IPv6:", "::1", "1.2.3.4", "x.test", "FROM:", "TO:"]),
    max_size=30,
).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=300), TRICKY, st.binary(max_size=100))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(text=ANY_TEXT, allow_null=st.booleans())
@example(text="<" + "a" * 300 + "@x.test>", allow_null=True)
@example(text='<"\\', allow_null=False)
def test_parse_path_only_raises_address_error(text, allow_null):
    try:
        mailbox = parse_path(text, allow_null=allow_null)
    except AddressError as e:
        assert e.reply in (replies.BAD_ADDRESS_SYNTAX,)
        return
    if mailbox is None:
        assert allow_null
        return
    # Whatever parses is canonical and parses back to itself.
    assert parse_path(f"<{mailbox.address}>", allow_null=False) == mailbox
    assert mailbox.domain == mailbox.domain.lower() or mailbox.is_ip_literal
    assert mailbox.address.isascii()


@settings(max_examples=300)
@given(text=ANY_TEXT)
def test_command_parsers_only_raise_address_error(text):
    for parse, prefix in ((parse_mail_from, "FROM:"), (parse_rcpt_to, "TO:")):
        for arg in (text, prefix + text if isinstance(text, str) else prefix.encode() + text):
            try:
                mailbox, params = parse(arg)
            except AddressError as e:
                assert e.reply.code == 501
                continue
            assert all(k == k.upper() for k in params)


@settings(max_examples=300)
@given(text=ANY_TEXT)
def test_vrfy_parser_never_raises(text):
    result = parse_vrfy_argument(text)
    if result is not None:
        assert result and result.isascii()
        # Spaces only inside a quoted local part ('" "@x' is a valid mailbox).
        unquoted = result if not result.startswith('"') else result[result.rindex('"') + 1:]
        assert " " not in unquoted


atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
dot_atom = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
tld = st.from_regex(r"[A-Za-z]{2,6}", fullmatch=True)
domain = st.tuples(st.lists(label, min_size=0, max_size=3), tld).map(lambda t: ".".join([*t[0], t[1]]))


@given(local=dot_atom, domain=domain, bracketed=st.booleans(), trailing_dot=st.booleans())
def test_round_trip_dot_atom(local, domain, bracketed, trailing_dot):
    address = f"{local}@{domain}{'.' if trailing_dot else ''}"
    mailbox = parse_path(f"<{address}>" if bracketed else address, allow_null=False)
    assert mailbox == Mailbox(local, domain.lower(), False)
    assert mailbox.address == f"{local}@{domain.lower()}"
    assert parse_path(f"<{mailbox.address}>", allow_null=False) == mailbox
    assert parse_vrfy_argument(address) == mailbox.address
    assert parse_rcpt_to(f"TO:<{address}> NOTIFY=NEVER") == (mailbox, {"NOTIFY": "NEVER"})


@given(content=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30),
       domain=domain)
def test_round_trip_quoted(content, domain):
    wire = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assume(len(wire) <= 64)
    mailbox = parse_path(f"<{wire}@{domain}>", allow_null=False)
    assert mailbox.local == content
    assert parse_path(f"<{mailbox.address}>", allow_null=False) == mailbox
    assert mailbox.quoted is (content != mailbox.wire_local)


@pytest.mark.parametrize("text, expected", [
    ("example.com", "example.com"),
    (" @Example.COM ", "@example.com"),
    ("#queue", None),
    ("#", ValueError),
    ("#two words", ValueError),
    ("", ValueError),
    ("exa mple.com", ValueError),
    ("@", ValueError),
])
def test_parse_etrn_argument(text, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            parse_etrn_argument(text)
    else:
        assert parse_etrn_argument(text) == expected
