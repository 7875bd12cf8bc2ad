"""Hostile configuration values are refused with FILE:LINE, one regression
test per attack (issue 11, item 7)."""

from __future__ import annotations

import pytest

from mailguard.policy import build
from tests.conftest import write_config


def _errors(tmp_path, *, users=None, aliases=None, body="", variables=None):
    kwargs = {}
    if users is not None:
        kwargs["users"] = users
    if aliases is not None:
        kwargs["aliases"] = aliases
    cfg = write_config(tmp_path / "mailserver.cfg", variables, body, **kwargs)
    config, _tables, problems = build.read(str(cfg))
    lines = cfg.read_text().splitlines()
    return config, [p for p in problems if p.is_error], lines, str(cfg)


def _line_of(lines, needle: str) -> int:
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def test_crlf_in_deliver_to_is_refused(tmp_path):
    """&#13;&#10; in DeliverTo reached the relay host as injected commands."""
    target = "x@elsewhere.test&#13;&#10;RCPT TO:&lt;victim@elsewhere.test&gt;&#13;&#10;DATA"
    config, errors, lines, cfg = _errors(tmp_path, aliases=[("fwd", "example.com", target)])
    assert config is None
    [error] = errors
    assert str(error) == (f"{cfg}:{_line_of(lines, 'fwd')}: Alias \"fwd@example.com\": DeliverTo address "
                          '"x@elsewhere.test\\r\\nrcpt to:<victim@elsewh..." (55 characters) '
                          "contains a control character (U+000D)")
    assert "\r" not in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("name, fragment", [
    ("x/y", 'name "x/y" contains a path separator ("/")'),
    ("x\\y", 'name "x\\\\y" contains a path separator ("\\")'),
    ("..", 'name ".." is not allowed (it names a directory)'),
    ("john smith", 'name "john smith" contains a space (U+0020)'),
    ("a&#9;b", 'name "a\\tb" contains a control character (U+0009)'),
    ("a&#13;b", 'name "a\\rb" contains a control character (U+000D)'),
    ("a&#10;b", 'name "a\\nb" contains a control character (U+000A)'),
    ("a&#x85;b", 'name "a\\u0085b" contains a control character (U+0085)'),
    ("a&#x202e;b", 'name "a\\u202eb" contains a format control character (U+202E)'),
])
def test_hostile_user_names(tmp_path, name, fragment):
    config, errors, lines, cfg = _errors(tmp_path, users=[(name, "example.com", "pw", True)])
    assert config is None
    assert [str(e) for e in errors] == [f"{cfg}:{_line_of(lines, 'User') + 1}: User: {fragment}"]


def test_nul_cannot_even_be_written(tmp_path):
    """XML refuses &#0;: the file is malformed, at its line."""
    config, errors, lines, cfg = _errors(tmp_path, users=[("a&#0;b", "example.com", "pw", True)])
    assert config is None
    assert str(errors[0]).startswith(f"{cfg}:{_line_of(lines, '&#0;')}: malformed XML")


def test_at_in_a_user_name_with_a_domain(tmp_path):
    body = ('<list name="User"><listitem><variable name="Name">a@b</variable>'
            '<variable name="Domain">example.com</variable></listitem></list>')
    config, errors, lines, cfg = _errors(tmp_path, users=(), body=body)
    assert [str(e) for e in errors] == [f'{cfg}:{_line_of(lines, "a@b")}: User: name "a@b" contains "@"']


def test_hostile_user_domain(tmp_path):
    config, errors, lines, cfg = _errors(tmp_path, users=[("john", "../../etc", "pw", True)])
    assert [str(e) for e in errors] == [
        f'{cfg}:{_line_of(lines, "../../etc")}: User "john": not a valid host name: "../../etc"']


def test_hostile_alias_name_and_user_alias(tmp_path):
    body = ('<list name="User">\n<listitem><variable name="Name">bob</variable>'
            '<variable name="Domain">example.com</variable>'
            '<variable name="Aliases">bobby, b/ob</variable></listitem>\n</list>')
    config, errors, lines, cfg = _errors(tmp_path, users=(), body=body,
                                         aliases=[("sa les", "example.com", "john@example.com")])
    assert [str(e) for e in errors] == [
        f'{cfg}:{_line_of(lines, "b/ob")}: User "bob@example.com": alias "b/ob" contains a path separator ("/")',
        f'{cfg}:{_line_of(lines, "sa les")}: Alias: name "sa les" contains a space (U+0020)',
    ]


@pytest.mark.parametrize("variable, value, message", [
    ("SmtpGreetingDelay", "\u0663", 'expected a number of seconds from 0 to 3600, got "\u0663"'),
    ("SmtpGreetingDelay", "1e2", 'expected a number of seconds from 0 to 3600, got "1e2"'),
    ("MaxMessageSize", "9" * 5000,
     'expected a non-negative decimal number from 0 to 4294967295, got "' + "9" * 40 + '..." (5000 characters)'),
    ("SmtpMaxConnectionsPerIp", "-1", 'expected a non-negative decimal number from 0 to 1000000, got "-1"'),
    ("SmtpMaxRecipients", "0", 'expected a non-negative decimal number from 1 to 100000, got "0"'),
    ("GatewayTimeout", "900", 'expected a number of seconds from 0 (excluded) to 300, got "900"'),
])
def test_numbers_are_ascii_decimal_in_a_range(tmp_path, variable, value, message):
    config, errors, lines, cfg = _errors(tmp_path, variables={variable: value})
    assert config is None
    assert [str(e) for e in errors] == [f'{cfg}:{_line_of(lines, variable)}: variable "{variable}": {message}']
