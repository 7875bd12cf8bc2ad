"""The value parsers (mailguard.config.values): one grammar per kind of value."""

import re

import pytest

from mailguard.config import values as V


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    (" mx.Example.COM:25 ", ("mx.example.com", 25)),
    ("[::1]:25", ("::1", 25)),
    ("localhost:587", ("localhost", 587)),
    ("", None),
])
def test_parse_host_port(text, expected):
    assert V.parse_optional_host_port(text) == expected


@pytest.mark.parametrize("text", ["mx.example.com", "host:0", "host:70000", "1.2.3.300:25",
                                  "[zz]:25", "::1:25", "a b:25", "host:25x"])
def test_parse_host_port_refuses(text):
    with pytest.raises(ValueError):
        V.parse_optional_host_port(text)


def test_parse_other_settings():
    assert V.parse_bind_address(" 127.0.0.2 ") == "127.0.0.2"
    assert V.parse_bind_address("") == ""
    with pytest.raises(ValueError):
        V.parse_bind_address("gateway.example.com")
    assert V.parse_domain_list("Example.com, example.NET.;other.test") == ("example.com", "example.net", "other.test")
    with pytest.raises(ValueError):
        V.parse_domain_list("example.com, bad_domain!")
    assert V.parse_connections("8") == 8
    for bad in ("0", "101", "-1", "x"):
        with pytest.raises(ValueError):
            V.parse_connections(bad)
    assert V.parse_timeout("2.5") == 2.5
    for bad in ("0", "301", "nan", "x", "-1"):
        with pytest.raises(ValueError):
            V.parse_timeout(bad)



def test_parse_host_port_grammar_of_the_relay_host():
    assert V.parse_host_port("mx.test:25") == ("mx.test", 25)
    assert V.parse_host_port("[::1]:2525") == ("::1", 2525)
    assert V.parse_optional_host_port("") is None
    with pytest.raises(ValueError):
        V.parse_host_port("mx.test")




# --- numbers: ASCII decimal, a documented range, short messages ------------------

@pytest.mark.parametrize("parser, text, expected", [
    (V.Number(0, 10), "7", 7),
    (V.Number(0, 10), " 10 ", 10),
    (V.Number(1, 100, "a number of connections"), "1", 1),
    (V.Seconds(0, 3600), "25", 25.0),
    (V.Seconds(0, 3600), "0.5", 0.5),
    (V.Seconds(0, 3600), "3600", 3600.0),
    (V.Seconds(0, 300, open_lo=True), "300", 300.0),
])
def test_numbers_accepted(parser, text, expected):
    assert parser(text) == expected


@pytest.mark.parametrize("parser, text", [
    (V.Number(0, 10), "11"),
    (V.Number(1, 10), "0"),
    (V.Number(0, 10), "-1"),
    (V.Number(0, 10), "+1"),
    (V.Number(0, 10), "1_0"),
    (V.Number(0, 10), "\u0663"),  # ARABIC-INDIC DIGIT THREE: int() takes it
    (V.Number(0, 10), "\uff13"),  # FULLWIDTH DIGIT THREE
    (V.Number(0, 10), "1.0"),
    (V.Number(0, 10), ""),
    (V.Seconds(0, 3600), "\u0663"),
    (V.Seconds(0, 3600), "1e3"),
    (V.Seconds(0, 3600), "inf"),
    (V.Seconds(0, 3600), "nan"),
    (V.Seconds(0, 3600), "3_0"),
    (V.Seconds(0, 3600), "3600.5"),
    (V.Seconds(0, 3600), ".5"),
    (V.Seconds(0, 300, open_lo=True), "0"),
])
def test_numbers_refused(parser, text):
    with pytest.raises(ValueError) as e:
        parser(text)
    assert f"from {parser.range}" in str(e.value)


@pytest.mark.parametrize("parser", [V.Number(0, 10), V.Seconds(0, 10), V.parse_uint])
def test_a_huge_number_is_an_ordinary_error(parser):
    """int() of 5,000 digits raises about sys.set_int_max_str_digits():
    that text must never reach an administrator; nor must the 5,000 digits."""
    with pytest.raises(ValueError) as e:
        parser("9" * 5000)
    message = str(e.value)
    assert "set_int_max_str_digits" not in message
    assert "(5000 characters)" in message and len(message) < 200


def test_range_text():
    assert V.Number(0, 4294967295).range == "0 to 4294967295"
    assert V.Seconds(0, 300, open_lo=True).range == "0 (excluded) to 300"


# --- names and addresses -----------------------------------------------------------

@pytest.mark.parametrize("text", ["john", "John.Doe", "a+tag", "o'brien", "*", "?ill", "_..", "žluťoučký",
                                  "x" * 64])
def test_local_parts_accepted(text):
    assert V.parse_local_part(text) == text


@pytest.mark.parametrize("text, fragment", [
    ("x/y", 'contains a path separator ("/")'),
    ("x\\y", 'contains a path separator ("\\")'),
    ("..", "is not allowed (it names a directory)"),
    (".", "is not allowed (it names a directory)"),
    ("john smith", "contains a space (U+0020)"),
    ("a\tb", "contains a control character (U+0009)"),
    ("a\r\nRCPT TO:<x@evil.test>", "contains a control character (U+000D)"),
    ("a\x00b", "contains a control character (U+0000)"),
    ("a\x85b", "contains a control character (U+0085)"),
    ("a\u202eb", "contains a format control character (U+202E)"),
    ("a\u2028b", "contains a line separator (U+2028)"),
    ("a\u00a0b", "contains a space (U+00A0)"),
    ("x@y", 'contains "@"'),
    ("x" * 65, "is longer than 64 octets"),
    ("é" * 33, "is longer than 64 octets"),
    ("", "is empty"),
])
def test_local_parts_refused(text, fragment):
    with pytest.raises(ValueError) as e:
        V.parse_local_part(text, "user name")
    message = str(e.value)
    assert message.startswith("user name") and message.endswith(fragment), message
    assert message.isprintable()  # the value is escaped, never raw


@pytest.mark.parametrize("text, expected", [
    ("John@Example.COM", "John@example.com"),
    ("a+b@mx.test.", "a+b@mx.test"),
])
def test_addresses_accepted(text, expected):
    assert V.parse_address(text) == expected
    assert V.parse_name_or_address(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("a@b@c.test", 'contains more than one "@"'),
    ("@c.test", "the local part is empty"),
    ("a b@c.test", '"a b@c.test" contains a space'),
    ("x@c.test\r\nDATA", "contains a control character (U+000D)"),
    ("..@c.test", "the local part is not allowed (it names a directory)"),
    ("x@bad_domain", "is not a valid domain name"),
    ("x@[127.0.0.1]", "is not a valid domain name"),
    ("x@", "is not a valid domain name"),
])
def test_addresses_refused(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        V.parse_address(text)


def test_shown_escapes_and_cuts():
    assert V.shown("plain") == '"plain"'
    assert V.shown("a\r\nb") == '"a\\r\\nb"'
    assert V.shown("a\u202eb") == '"a\\u202eb"'
    assert V.shown("x" * 50, 10) == '"xxxxxxxxxx..." (50 characters)'
