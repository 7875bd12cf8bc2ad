"""The value parsers (mailguard.config.values): one grammar per kind of value."""

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


