"""The session rules, as tables: what is offered, what is refused, and
whether a refusal counts against the error budget."""

from __future__ import annotations

import pytest

from mailguard import replies
from mailguard.policy.rules import (
    Refusal,
    auth_mechanisms,
    connection_limit_exempt,
    counts_as_error,
    ehlo_keywords,
    etrn_refusal,
    help_commands,
    hops_refusal,
    mail_parameters,
    mail_refusal,
    rcpt_parameters,
    sender_login_refusal,
    vrfy_budgeted,
    vrfy_refusal,
)
from mailguard.policy.directory import Lookup, LookupStatus
from mailguard.policy.session import Session
from mailguard.testing import FakeUserDirectory
from mailguard.store.dsn import check_mail_parameter, check_rcpt_parameter

SIZE_TEXT = "SIZE requires a number"


class _Passwords:
    def __init__(self, plaintext: bool):
        self.plaintext = plaintext

    def has_plaintext_passwords(self) -> bool:
        return self.plaintext


class _Trust:
    """Trusts the client IPs it is given."""

    def __init__(self, *ips: str):
        self.ips = set(ips)

    def is_trusted(self, session) -> bool:
        return session.client_ip in self.ips


class _Greeting:
    def __init__(self, *exceptions: str):
        self.exceptions = set(exceptions)

    def is_exception(self, session) -> bool:
        return session.client_ip in self.exceptions


@pytest.mark.parametrize("listener, tls, plaintext, expected", [
    ("smtp", False, False, []),
    ("smtp", False, True, ["CRAM-MD5"]),
    ("smtp", True, False, ["PLAIN", "LOGIN"]),
    ("smtp", True, True, ["CRAM-MD5", "PLAIN", "LOGIN"]),
    ("smtps", True, True, ["CRAM-MD5", "PLAIN", "LOGIN"]),
    ("submission", False, True, ["CRAM-MD5"]),
])
def test_auth_mechanisms(listener, tls, plaintext, expected):
    session = Session("127.0.0.3", 1, listener, tls=tls)
    assert auth_mechanisms(session, _Passwords(plaintext), cram_md5=True) == expected
    assert auth_mechanisms(session, None, cram_md5=True) == []


@pytest.mark.parametrize("listener, tls, expected", [
    ("smtp", False, []),  # no AUTH at all before TLS
    ("submission", False, []),
    ("smtp", True, ["PLAIN", "LOGIN"]),
    ("smtps", True, ["PLAIN", "LOGIN"]),
])
def test_cram_md5_is_off_by_default(listener, tls, expected):
    """SmtpAuthCramMd5Enabled=0 (the default): never CRAM-MD5, even where
    every user has a plain-text (or D3S:) password."""
    session = Session("127.0.0.3", 1, listener, tls=tls)
    assert auth_mechanisms(session, _Passwords(True)) == expected
    assert auth_mechanisms(session, _Passwords(True), cram_md5=False) == expected


@pytest.mark.parametrize("listener, authenticated, expected", [
    ("smtp", None, None),
    ("smtps", None, None),
    ("submission", None, Refusal(replies.AUTH_REQUIRED, error=True)),
    ("submission", "john@example.com", None),
])
def test_mail_refusal(listener, authenticated, expected):
    assert mail_refusal(Session("127.0.0.3", 1, listener, authenticated=authenticated)) == expected


BAD_PARAMETER = replies.BAD_PARAMETER


@pytest.mark.parametrize("params, dsn, expected", [
    ({}, False, None),
    ({"SIZE": "2000"}, False, None),
    ({"SIZE": "0"}, False, None),  # RFC 1870: no size declared
    ({"SIZE": "2001"}, False, Refusal(replies.MESSAGE_TOO_BIG, error=False)),
    ({"SIZE": "big"}, False, Refusal(replies.SYNTAX_ERROR.with_text(SIZE_TEXT), error=True)),
    ({"SIZE": None}, False, Refusal(replies.SYNTAX_ERROR.with_text(SIZE_TEXT), error=True)),
    ({"BODY": "8bitmime"}, False, None),
    ({"BODY": "7BIT"}, False, None),
    ({"BODY": "BINARYMIME"}, False,
     Refusal(BAD_PARAMETER.with_text("BODY must be 7BIT or 8BITMIME"), error=False)),
    ({"AUTH": "<>"}, False, None),
    ({"FOO": "bar"}, False, Refusal(BAD_PARAMETER.with_text("Unsupported MAIL parameter FOO"), error=False)),
    ({"RET": "FULL"}, False, Refusal(BAD_PARAMETER.with_text("Unsupported MAIL parameter RET"), error=False)),
    ({"RET": "FULL"}, True, None),
    ({"RET": "ALL"}, True, Refusal(replies.SYNTAX_ERROR.with_text("RET must be FULL or HDRS"), error=True)),
    ({"ENVID": "abc"}, True, None),
    ({"SIZE": "1", "FOO": "x"}, False,
     Refusal(BAD_PARAMETER.with_text("Unsupported MAIL parameter FOO"), error=False)),
])
def test_mail_parameters(params, dsn, expected):
    assert mail_parameters(params, max_size=2000, dsn=check_mail_parameter if dsn else None) == expected


def test_mail_size_zero_limit_is_no_limit():
    assert mail_parameters({"SIZE": str(10 ** 12)}, max_size=0, dsn=None) is None


@pytest.mark.parametrize("params, dsn, expected", [
    ({}, False, None),
    ({"NOTIFY": "NEVER"}, False,
     Refusal(BAD_PARAMETER.with_text("Unsupported RCPT parameter NOTIFY"), error=True)),
    ({"NOTIFY": "NEVER"}, True, None),
    ({"NOTIFY": None}, True, Refusal(replies.SYNTAX_ERROR.with_text("NOTIFY requires a value"), error=True)),
    ({"ORCPT": "rfc822;a@b.test"}, True, None),
    ({"ORCPT": "nonsense"}, True, Refusal(replies.SYNTAX_ERROR.with_text("ORCPT must be addr-type;xtext"), error=True)),
    ({"FOO": "x"}, True, Refusal(BAD_PARAMETER.with_text("Unsupported RCPT parameter FOO"), error=True)),
])
def test_rcpt_parameters(params, dsn, expected):
    assert rcpt_parameters(params, dsn=check_rcpt_parameter if dsn else None) == expected


UNTRUSTED = Session("127.0.0.3", 1, "smtp")
TRUSTED = Session("127.0.0.2", 1, "smtp")


@pytest.mark.parametrize("session, enabled, budgeted", [
    (UNTRUSTED, True, True),
    (UNTRUSTED, False, False),  # disabled: every VRFY is an error instead
    (TRUSTED, True, False),  # gateways ask without limit
    (TRUSTED, False, False),
])
def test_vrfy_budget(session, enabled, budgeted):
    assert vrfy_budgeted(session, enabled=enabled, trust=_Trust("127.0.0.2")) is budgeted


@pytest.mark.parametrize("enabled, argument, expected", [
    (False, "john", Refusal(replies.VRFY_DISABLED, error=True)),
    (False, "", Refusal(replies.VRFY_DISABLED, error=True)),
    (True, "", Refusal(replies.SYNTAX_ERROR, error=True)),
    (True, "a@b@c", Refusal(replies.SYNTAX_ERROR, error=True)),
    (True, "john", None),
    (True, "<john@example.com>", None),
])
def test_vrfy_refusal(enabled, argument, expected):
    assert vrfy_refusal(enabled, argument) == expected


@pytest.mark.parametrize("received, limit, expected", [
    (0, 50, None),
    (49, 50, None),  # stored with 50: at the limit
    (50, 50, Refusal(replies.TOO_MANY_HOPS, error=False)),  # would leave with 51
    (60, 50, Refusal(replies.TOO_MANY_HOPS, error=False)),
    (5, 5, Refusal(replies.TOO_MANY_HOPS, error=False)),
    (4, 5, None),
    (1000, 0, None),  # 0: no limit
])
def test_hops_refusal(received, limit, expected):
    assert hops_refusal(received, limit) == expected


def test_too_many_hops_is_554_5_4_6():
    assert (replies.TOO_MANY_HOPS.code, replies.TOO_MANY_HOPS.status) == (554, "5.4.6")


@pytest.mark.parametrize("session, expected", [
    (UNTRUSTED, Refusal(replies.ETRN_NOT_AVAILABLE, error=False)),
    (TRUSTED, None),
])
def test_etrn_is_for_trusted_clients(session, expected):
    assert etrn_refusal(session, _Trust("127.0.0.2")) == expected


@pytest.mark.parametrize("ip, exempt", [
    ("127.0.0.2", True),  # trusted
    ("127.0.0.4", True),  # the greeting-delay exceptions group
    ("127.0.0.3", False),
])
def test_connection_limit_exemption(ip, exempt):
    session = Session(ip, 1, "smtp")
    assert connection_limit_exempt(session, _Greeting("127.0.0.4"), _Trust("127.0.0.2")) is exempt


ALL = dict(mechanisms=["CRAM-MD5"], max_size=1000, starttls=True, vrfy=True, etrn=True, dsn=True)
BASE = ["SIZE 1000", "ENHANCEDSTATUSCODES", "8BITMIME", "PIPELINING", "HELP"]


@pytest.mark.parametrize("session, offer, expected", [
    (UNTRUSTED, ALL, ["AUTH CRAM-MD5", "SIZE 1000", "STARTTLS", "VRFY", "ENHANCEDSTATUSCODES",
                      "8BITMIME", "PIPELINING", "ETRN", "DSN", "HELP"]),
    (UNTRUSTED, dict(ALL, mechanisms=[], starttls=False, vrfy=False, etrn=False, dsn=False), BASE),
    (Session("127.0.0.3", 1, "smtps", tls=True), dict(ALL, vrfy=False, etrn=False, dsn=False),
     ["AUTH CRAM-MD5"] + BASE),  # TLS on: no STARTTLS
    (Session("127.0.0.3", 1, "smtp", authenticated="j@x.test"), dict(ALL, starttls=False, vrfy=False,
                                                                      etrn=False, dsn=False), BASE),
])
def test_ehlo_keywords_only_where_they_work(session, offer, expected):
    assert ehlo_keywords(session, **offer) == expected


@pytest.mark.parametrize("session, offer, extra", [
    (UNTRUSTED, dict(mechanisms=["CRAM-MD5"], starttls=True, vrfy=True, etrn=True),
     ["VRFY", "STARTTLS", "AUTH", "ETRN"]),
    (UNTRUSTED, dict(mechanisms=[], starttls=False, vrfy=False, etrn=False), []),
    (Session("127.0.0.3", 1, "smtps", tls=True, authenticated="j@x.test"),
     dict(mechanisms=["PLAIN"], starttls=True, vrfy=False, etrn=False), []),
])
def test_help_lists_what_works_now(session, offer, extra):
    base = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP"]
    assert help_commands(session, **offer) == base + extra


# --- refused recipients count as errors ---------------------------------------------------


@pytest.mark.parametrize("reply, counts", [
    (replies.UNKNOWN_USER, True),
    (replies.DISABLED_USER, True),
    (replies.RELAY_DENIED, True),
    (replies.RECIPIENT_TRY_LATER, False),  # a gateway back-end's "try later": not the client's doing
    (replies.BACKEND_NO_ANSWER, False),
    (replies.RECIPIENT_OK, False),
])
def test_which_refused_recipients_count_as_errors(reply, counts):
    assert counts_as_error(reply) is counts


# --- sender must match login ----------------------------------------------------------------

_DIRECTORY = FakeUserDirectory(
    {
        "alice@example.com": "known",
        "bob@example.com": "known",
        "old@example.com": "disabled",
        # alice's extra name (a user's Aliases): the lookup answers with her address
        "a.smith@example.com": Lookup(LookupStatus.KNOWN, "alice@example.com", ("alice@example.com",)),
        # an Alias record delivering to both (a shared address)
        "sales@example.com": Lookup(LookupStatus.KNOWN, "sales@example.com",
                                    ("alice@example.com", "bob@example.com")),
        # an Alias record that only forwards elsewhere
        "fwd@example.com": Lookup(LookupStatus.KNOWN, "fwd@example.com", (), ("x@elsewhere.test",)),
    },
    domains=["example.com"],
    domain_aliases={"example.net": "example.com"},
)
ALICE = Session("192.0.2.9", 1, "submission", tls=True, authenticated="alice@example.com", helo="c")


@pytest.mark.parametrize("sender, refused", [
    ("alice@example.com", False),
    ("ALICE@Example.COM", False),
    ("alice@example.net", False),  # an alias domain
    ("a.smith@example.com", False),  # her own alias name
    ("a.smith@example.net", False),
    ("sales@example.com", False),  # an alias that delivers to her
    (None, False),  # the null sender: bounces
    ("bob@example.com", True),  # another user
    ("old@example.com", True),  # a disabled account
    ("fwd@example.com", True),  # an alias that does not deliver to her
    ("nobody@example.com", True),  # unknown
    ("alice@elsewhere.test", True),  # not a local address at all
    ('"bob"@example.com', True),
])
def test_an_authenticated_user_sends_only_as_themselves(sender, refused):
    refusal = sender_login_refusal(ALICE, sender, enabled=True, directory=_DIRECTORY, trust=_Trust())
    assert (refusal is not None) is refused
    if refused:
        assert refusal == Refusal(replies.SENDER_NOT_OWNED)
        assert (refusal.reply.code, refusal.reply.status) == (553, "5.7.1")


@pytest.mark.parametrize("session, enabled, trust", [
    (ALICE, False, _Trust()),  # SmtpSenderLoginMatch=0
    (ALICE, True, _Trust("192.0.2.9")),  # trusted by its address (the relay IP group)
    (Session("192.0.2.9", 1, "smtp", helo="c"), True, _Trust()),  # not authenticated
])
def test_sender_login_is_not_checked(session, enabled, trust):
    assert sender_login_refusal(session, "bob@example.com", enabled=enabled, directory=_DIRECTORY,
                                trust=trust) is None
