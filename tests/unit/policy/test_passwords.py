"""Tests for mailguard.policy.passwords."""

from __future__ import annotations

import hashlib
import re

import pytest
from zope.interface.verify import verifyObject

from mailguard.policy import passwords
from mailguard.policy.directorybuild import build
from mailguard.interfaces import IPasswordChecker
from mailguard.policy.passwords import (
    PasswordChecker,
    make_sha_password,
    password_form,
    password_warnings,
    verify_password,
)
from mailguard.config.problems import Where
from mailguard.config.records import DomainRecord, UserRecord

# A known answer: PBKDF2-HMAC-SHA1("secret", salt 00..07, 10000 iterations).
SALT = bytes.fromhex("0001020304050607")
SECRET_SHA = "SHA:0001020304050607" + "0de5ccf5d02346c30378e1ffb869da63747f712c"
# ... and a non-ASCII one (UTF-8 password bytes).
UNICODE_SHA = "SHA:a1b2c3d4e5f60718" + "add05fdb00ba1d6a80f73aa3667c9e8e1ef3c47c"
D3S = "D3S:0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def at(line):
    return Where("users.cfg", line)


# --- the SHA: form --------------------------------------------------------


def test_known_vector_matches_hashlib():
    digest = hashlib.pbkdf2_hmac("sha1", b"secret", SALT, 10000)
    assert SECRET_SHA == f"SHA:{SALT.hex()}{digest.hex()}"


def test_make_sha_password_known_vector():
    assert make_sha_password("secret", SALT) == SECRET_SHA
    assert make_sha_password("pässwörd", bytes.fromhex("a1b2c3d4e5f60718")) == UNICODE_SHA


def test_make_sha_password_format():
    stored = make_sha_password("secret")
    assert re.fullmatch(r"SHA:[0-9a-f]{16}[0-9a-f]{40}", stored)
    assert stored != make_sha_password("secret")  # a fresh salt each time
    assert verify_password(stored, "secret")


def test_make_sha_password_salt_length():
    with pytest.raises(ValueError):
        make_sha_password("secret", b"short")


@pytest.mark.parametrize(
    "stored, offered, expected",
    [
        (SECRET_SHA, "secret", True),
        (SECRET_SHA, b"secret", True),
        (SECRET_SHA, "Secret", False),
        (SECRET_SHA, "", False),
        (SECRET_SHA.upper(), "secret", True),  # hex in any case
        (UNICODE_SHA, "pässwörd", True),
        (UNICODE_SHA, "passwort", False),
    ],
)
def test_verify_sha(stored, offered, expected):
    assert verify_password(stored, offered) is expected


# --- plain text, other forms, none -----------------------------------------


@pytest.mark.parametrize(
    "stored, offered, expected",
    [
        ("hunter2", "hunter2", True),
        ("hunter2", b"hunter2", True),
        ("hunter2", "hunter3", False),
        ("hunter2", "hunter2 ", False),
        ("hunter2", "", False),
        ("žluťoučký kůň", "žluťoučký kůň", True),  # compare_digest wants bytes
        ("žluťoučký kůň", "zlutoucky kun", False),
        ("sha:lower-case is plain text", "sha:lower-case is plain text", True),
    ],
)
def test_verify_plain(stored, offered, expected):
    assert verify_password(stored, offered) is expected


@pytest.mark.parametrize(
    "stored",
    [
        None,
        "",
        D3S,
        "SHA:0001020304050607",  # no digest
        SECRET_SHA + "00",  # too long
        SECRET_SHA[:-1] + "g",  # not hex
        "MD5:whatever",
    ],
)
def test_never_verifies(stored):
    # Not even when the client offers the stored text itself.
    assert verify_password(stored, stored or "") is False
    assert verify_password(stored, "secret") is False


@pytest.mark.parametrize(
    "stored, form",
    [
        (None, "none"),
        ("", "none"),
        ("hunter2", "plain"),
        ("a:b", "plain"),
        ("sha:lower", "plain"),
        (SECRET_SHA, "sha"),
        (D3S, "unsupported"),
        ("SHA:1234", "unsupported"),
        ("MD5:abc", "unsupported"),
    ],
)
def test_password_form(stored, form):
    assert password_form(stored) == form


# --- warnings for `mailguard check` -----------------------------------------


def test_password_warnings():
    users = [
        UserRecord("john", "example.com", D3S, where=at(3)),
        UserRecord("mary", "example.com", "SHA:12", where=at(4)),
        UserRecord("old", "example.com", D3S, enabled=False, where=at(5)),
        UserRecord("plain", "example.com", "hunter2", where=at(6)),
        UserRecord("sha", "example.com", SECRET_SHA, where=at(7)),
        UserRecord("ldap", "example.com", None, where=at(8)),
    ]
    problems = password_warnings(users)
    assert [str(p) for p in problems] == [
        "users.cfg:3: warning: 1 enabled user has a password in D3S: form that cannot be "
        "decoded (bad length, hex or padding) (first: john@example.com); this user cannot authenticate",
        "users.cfg:4: warning: 1 enabled user has a password in SHA: form that is malformed "
        "(expected 56 hex digits) (first: mary@example.com); this user cannot authenticate",
    ]
    assert not any(p.is_error for p in problems)


# --- the checker ----------------------------------------------------------

DOMAINS = [
    DomainRecord("example.com", ("example.net",), at(1)),
    DomainRecord("other.org", (), at(2)),
]
USERS = [
    UserRecord("John", "example.com", SECRET_SHA, aliases=("jsmith",), where=at(10)),
    UserRecord("mary", "example.com", "hunter2", where=at(11)),
    UserRecord("old", "example.com", "hunter2", enabled=False, where=at(12)),
    UserRecord("scrambled", "example.com", D3S, where=at(13)),
    UserRecord("nopass", "example.com", None, where=at(14)),
    UserRecord("mary", "other.org", "other", where=at(15)),
    UserRecord("bob", "other.org", "builder", where=at(16)),
    UserRecord("mary", "example.com", "second record", where=at(17)),  # duplicate
    UserRecord("stray", "nowhere.org", "x", where=at(18)),  # not local
]


@pytest.fixture(scope="module")
def checker():
    directory, _ = build(DOMAINS, USERS, [])
    return PasswordChecker(USERS, directory)


def test_interface(checker):
    assert verifyObject(IPasswordChecker, checker)


@pytest.mark.parametrize(
    "username, password, expected",
    [
        ("john@example.com", "secret", "john@example.com"),
        ("JOHN@Example.COM", "secret", "john@example.com"),
        ("john@example.net", "secret", "john@example.com"),  # domain alias
        ("john@example.com.", "secret", "john@example.com"),
        ("john", "secret", "john@example.com"),  # bare and unambiguous
        ("john@example.com", "wrong", None),
        ("mary@example.com", "hunter2", "mary@example.com"),
        ("mary@example.com", "second record", None),  # first record wins
        ("mary@other.org", "other", "mary@other.org"),
        ("mary", "hunter2", None),  # bare and ambiguous
        ("bob", "builder", "bob@other.org"),
        ("old@example.com", "hunter2", None),  # disabled
        ("scrambled@example.com", D3S, None),  # unsupported form
        ("nopass@example.com", "", None),
        ("nobody@example.com", "secret", None),
        ("stray@nowhere.org", "x", None),
        ("jsmith@example.com", "secret", None),  # extra names do not log in
        ("", "", None),
        ("john@", "secret", None),
    ],
)
def test_check_password(checker, username, password, expected):
    assert checker.check_password(username, password) == expected


def test_without_directory():
    checker = PasswordChecker([UserRecord("a", "X.org", "pw")])
    assert checker.check_password("a@x.org", "pw") == "a@x.org"
    assert checker.check_password("a", "pw") == "a@x.org"


def test_plaintext_password(checker):
    assert checker.plaintext_password("MARY@example.net") == "hunter2"
    assert checker.plaintext_password("bob") == "builder"
    assert checker.plaintext_password("john@example.com") is None  # SHA:
    assert checker.plaintext_password("old@example.com") is None  # disabled
    assert checker.plaintext_password("nobody@example.com") is None


@pytest.mark.parametrize(
    "username, expected",
    [
        ("MARY@example.net", "mary@example.com"),
        ("bob", "bob@other.org"),
        ("mary", None),  # ambiguous
        ("old@example.com", None),  # disabled
        ("nobody@example.com", None),
    ],
)
def test_canonical(checker, username, expected):
    assert checker.canonical(username) == expected


def test_has_plaintext_passwords(checker):
    assert checker.has_plaintext_passwords()
    only_sha = [
        UserRecord("a", "x.org", SECRET_SHA),
        UserRecord("b", "x.org", "plain", enabled=False),
        UserRecord("c", "x.org", D3S),
    ]
    assert not PasswordChecker(only_sha).has_plaintext_passwords()


# --- the same work for every attempt ---------------------------------------


@pytest.fixture
def pbkdf2_calls(monkeypatch):
    calls = []
    real = hashlib.pbkdf2_hmac

    def counting(name, password, salt, iterations, *args):
        calls.append((name, salt, iterations))
        return real(name, password, salt, iterations, *args)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    return calls


@pytest.mark.parametrize(
    "username, password",
    [
        ("john@example.com", "secret"),  # SHA:, right
        ("john@example.com", "wrong"),  # SHA:, wrong
        ("mary@example.com", "hunter2"),  # plain
        ("old@example.com", "hunter2"),  # disabled
        ("scrambled@example.com", "x"),  # D3S:
        ("nopass@example.com", "x"),  # no password
        ("nobody@example.com", "x"),  # unknown
        ("nobody@elsewhere.org", "x"),  # not local
        ("mary", "hunter2"),  # ambiguous
        ("nobody", "x"),  # bare, unknown
    ],
)
def test_one_pbkdf2_per_attempt(checker, pbkdf2_calls, username, password):
    checker.check_password(username, password)
    assert [(n, i) for n, _, i in pbkdf2_calls] == [("sha1", 10000)]


def test_unknown_user_runs_the_dummy(checker, monkeypatch):
    seen = []
    real = passwords.verify_password

    def spy(stored, offered):
        seen.append(stored)
        return real(stored, offered)

    monkeypatch.setattr(passwords, "verify_password", spy)
    assert checker.check_password("nobody@example.com", "secret") is None
    assert seen == [checker._dummy]
    assert password_form(checker._dummy) == "sha"

    seen.clear()
    checker.check_password("mary@example.com", "hunter2")
    assert seen == [checker._dummy, "hunter2"]

    seen.clear()
    checker.check_password("john@example.com", "secret")
    assert seen == [SECRET_SHA]


def test_dummy_is_never_a_password(checker):
    assert checker.check_password("nobody@example.com", checker._dummy) is None


# --- Kerio's D3S: and NUL: forms ----------------------------------------------------

# The published test vector (John the Ripper, "Auditing Kerio Connect").
OPENWALL = "D3S:d1ca0cee090ba26a64869078fcc95e46a74b66447f662068"


def test_d3s_known_vector():
    assert passwords.decode_d3s(OPENWALL) == "openwall"
    assert passwords.decode_d3s("D3S:" + OPENWALL[4:].upper()) == "openwall"
    assert password_form(OPENWALL) == "d3s"
    assert verify_password(OPENWALL, "openwall")
    assert verify_password(OPENWALL, b"openwall")
    assert not verify_password(OPENWALL, "openwal")
    assert not verify_password(OPENWALL, OPENWALL)


def test_d3s_key_is_the_published_one():
    assert passwords.D3S_KEY == bytes.fromhex("61d0e54954733b80" + "80" * 16)


@pytest.mark.parametrize("password", ["", "x", "exactly8", "pässwörd", "a" * 100, "ABC:looks-like-a-scheme"])
def test_d3s_round_trip(password):
    stored = passwords.make_d3s_password(password)
    assert stored != passwords.make_d3s_password(password)  # a fresh salt
    assert passwords.decode_d3s(stored) == password
    assert verify_password(stored, password) is True
    assert verify_password(stored, password + "x") is False


def test_d3s_same_salt_same_value():
    salt = b"5f678b6682"
    assert passwords.make_d3s_password("openwall", salt) == OPENWALL
    with pytest.raises(ValueError):
        passwords.make_d3s_password("x", b"short")


@pytest.mark.parametrize("stored", [
    D3S,  # whole blocks, but the padding is wrong
    "D3S:",
    "D3S:d1ca0cee090ba26a",  # one block: no room for the salt
    OPENWALL[:-2],  # not whole blocks
    OPENWALL[:-1] + "g",  # not hex
    "D3S:" + "00" * 600,  # absurdly long
])
def test_malformed_d3s_is_unsupported(stored):
    assert passwords.decode_d3s(stored) is None
    assert password_form(stored) == "unsupported"
    assert verify_password(stored, "openwall") is False


@pytest.mark.parametrize("stored", ["NUL:", "NUL:anything"])
def test_nul_is_no_password(stored):
    assert password_form(stored) == "nul"
    assert verify_password(stored, "") is False
    assert verify_password(stored, stored) is False


D3S_USERS = [
    UserRecord("kerio", "example.com", OPENWALL, where=at(30)),
    UserRecord("nul", "example.com", "NUL:", where=at(31)),
    UserRecord("odd", "example.com", passwords.make_d3s_password("ABC:def"), where=at(32)),
]


@pytest.fixture(scope="module")
def d3s_checker():
    directory, _ = build(DOMAINS, USERS + D3S_USERS, [])
    return PasswordChecker(USERS + D3S_USERS, directory)


def test_d3s_users_authenticate(d3s_checker):
    assert d3s_checker.check_password("kerio@example.com", "openwall") == "kerio@example.com"
    assert d3s_checker.check_password("kerio", "openwall") == "kerio@example.com"
    assert d3s_checker.check_password("kerio@example.com", "Openwall") is None
    assert d3s_checker.check_password("kerio@example.com", OPENWALL) is None
    assert d3s_checker.check_password("odd@example.com", "ABC:def") == "odd@example.com"
    assert d3s_checker.check_password("nul@example.com", "") is None
    assert d3s_checker.check_password("nul@example.com", "NUL:") is None


def test_d3s_serves_cram_md5(d3s_checker):
    assert d3s_checker.plaintext_password("kerio@example.com") == "openwall"
    assert d3s_checker.plaintext_password("nul@example.com") is None
    only_d3s = [UserRecord("a", "x.org", OPENWALL)]
    assert PasswordChecker(only_d3s).has_plaintext_passwords()
    assert not PasswordChecker([UserRecord("a", "x.org", "NUL:")]).has_plaintext_passwords()


@pytest.mark.parametrize("username, password", [
    ("kerio@example.com", "openwall"),
    ("kerio@example.com", "wrong"),
    ("nul@example.com", "x"),
])
def test_one_pbkdf2_per_attempt_for_kerio_forms(d3s_checker, pbkdf2_calls, username, password):
    d3s_checker.check_password(username, password)
    assert [(n, i) for n, _, i in pbkdf2_calls] == [("sha1", 10000)]


def test_a_decoded_password_is_never_shown(d3s_checker):
    secret = d3s_checker._find("kerio@example.com")[1]
    assert repr(secret) == str(secret) == f"{secret}" == "<secret>"
    assert "openwall" not in repr(d3s_checker.__dict__)


def test_password_forms_are_counted():
    users = [UserRecord(f"u{i}", "x.org", OPENWALL) for i in range(5)] + [
        UserRecord("s", "x.org", SECRET_SHA), UserRecord("p", "x.org", "plain"),
        UserRecord("n", "x.org", "NUL:"), UserRecord("e", "x.org", None),
        UserRecord("m", "x.org", "MD5:x"), UserRecord("off", "x.org", OPENWALL, enabled=False)]
    assert passwords.password_forms(users) == {"d3s": 5, "sha": 1, "plain": 1, "nul": 1, "none": 1,
                                               "unsupported": 1}


def test_warnings_are_one_line_per_form_not_per_user():
    """20,000 users with a form mailguard cannot verify: one line, with the
    count and the first of them."""
    users = [UserRecord(f"u{i}", "x.org", "MD5:abc", where=at(100 + i)) for i in range(20000)]
    users += [UserRecord(f"b{i}", "x.org", D3S, where=at(50000 + i)) for i in range(3)]
    assert [str(p) for p in password_warnings(users)] == [
        "users.cfg:100: warning: 20000 enabled users have a password in MD5: form, which mailguard "
        "cannot verify (first: u0@x.org); they cannot authenticate",
        "users.cfg:50000: warning: 3 enabled users have a password in D3S: form that cannot be decoded "
        "(bad length, hex or padding) (first: b0@x.org); they cannot authenticate",
    ]
