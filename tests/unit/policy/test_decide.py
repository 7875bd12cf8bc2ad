"""Tests for mailguard.policy.decide: trust, relay control, recipients, VRFY.

Decisions are values, so these are tables: a session and an address in, a
reply out.  The directory is an in-test fake (and, where the module is
there, the real L{mailguard.policy.directory.UserDirectory} built from records).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailguard import replies
from mailguard.policy.addresses import AddressError, Mailbox, hidden_destination, parse_path, parse_rcpt_to
from mailguard.interfaces import IIPGroups, IRecipientPolicy, ITrustPolicy, IUserDirectory, IVrfyPolicy
from mailguard.policy.decide import RecipientPolicy, RecipientVerdict, TrustPolicy, VrfyPolicy
from mailguard.policy.session import Session
from mailguard.testing import result_of

try:
    from mailguard.policy.directory import LookupStatus
except ImportError:  # pragma: no cover - before mailguard.policy.directory existed

    class LookupStatus(enum.Enum):  # type: ignore[no-redef]
        KNOWN = "known"
        UNKNOWN = "unknown"
        DISABLED = "disabled"
        NOT_LOCAL = "not-local"


LOCAL = "example.com"
OTHER = "evil.test"
OUR_IP = "192.0.2.1"  # the server's own address, as an address literal


# --- fakes ----------------------------------------------------------------------

@dataclass(frozen=True)
class FakeLookup:
    status: LookupStatus
    address: str
    mailboxes: tuple[str, ...] = ()
    forwards: tuple[str, ...] = ()


def _split(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return local.lower(), domain.lower().rstrip(".")


@implementer(IUserDirectory)
class FakeDirectory:
    """Domains, accounts, disabled accounts and aliases, all in dicts.

    C{calls} records every lookup, so tests can prove one never happened.
    """

    def __init__(self, domains=(LOCAL,), domain_aliases=None, users=(), disabled=(), aliases=None):
        self._primaries = tuple(domains)
        self._domains = {d: d for d in domains}
        self._domains.update(domain_aliases or {})
        self.users = {u.lower() for u in users}
        self.disabled = {u.lower() for u in disabled}
        self.aliases = {k.lower(): v for k, v in (aliases or {}).items()}  # addr -> (mailboxes, forwards)
        self.calls: list[str] = []

    def is_local_domain(self, domain):
        return domain.lower().rstrip(".") in self._domains

    def domains(self):
        return self._primaries

    def lookup(self, address):
        self.calls.append(address)
        local, domain = _split(address)
        if domain not in self._domains:
            return FakeLookup(LookupStatus.NOT_LOCAL, address)
        key = f"{local}@{self._domains[domain]}"
        if key in self.users:
            return FakeLookup(LookupStatus.KNOWN, key, (key,))
        if key in self.disabled:
            return FakeLookup(LookupStatus.DISABLED, key)
        if key in self.aliases:
            mailboxes, forwards = self.aliases[key]
            return FakeLookup(LookupStatus.KNOWN, key, tuple(mailboxes), tuple(forwards))
        return FakeLookup(LookupStatus.UNKNOWN, key)

    def __len__(self):
        return len(self.users) + len(self.disabled)


class PercentHackDirectory(FakeDirectory):
    """A sloppy back-end that reads C{user%other@local} as C{user@local}
    and (like old sendmail) would then forward to C{user@other}."""

    def lookup(self, address):
        local, domain = _split(address)
        for sep in "%!":
            if sep in local:
                real = local.split(sep)[0]
                found = super().lookup(f"{real}@{domain}")
                if found.status is LookupStatus.KNOWN:
                    return FakeLookup(LookupStatus.KNOWN, found.address, found.mailboxes, (f"{real}@{OTHER}",))
        return super().lookup(address)


class CatchAllDirectory(FakeDirectory):
    """Kerio's wildcard alias C{*}: every address of a local domain is
    KNOWN, answered with the address as asked, delivered to a catch-all."""

    def lookup(self, address):
        found = super().lookup(address)
        if found.status is LookupStatus.UNKNOWN:
            return FakeLookup(LookupStatus.KNOWN, found.address, (f"catchall@{LOCAL}",))
        return found


class ExplodingDirectory(FakeDirectory):
    """Fails the test if it is consulted."""

    def is_local_domain(self, domain):
        raise AssertionError("the directory was consulted")

    def lookup(self, address):
        raise AssertionError("the directory was consulted")


@implementer(IIPGroups)
class FakeIPGroups:
    def __init__(self, groups):
        self.groups = {name: set(members) for name, members in groups.items()}

    def names(self):
        return frozenset(self.groups)

    def contains(self, group, address):
        return str(address) in self.groups.get(group, ())


def directory(**kw) -> FakeDirectory:
    kw.setdefault("domain_aliases", {"example.net": LOCAL})
    kw.setdefault("users", [f"alice@{LOCAL}", f"bob@{LOCAL}", f"user@{LOCAL}", f"odd%name@{LOCAL}",
                            f"postmaster@{LOCAL}"])
    kw.setdefault("disabled", [f"carol@{LOCAL}"])
    kw.setdefault("aliases", {
        f"sales@{LOCAL}": ((f"alice@{LOCAL}", f"bob@{LOCAL}"), ()),
        f"ext@{LOCAL}": ((), ("someone@elsewhere.test",)),
        f"both@{LOCAL}": ((f"alice@{LOCAL}",), ("someone@elsewhere.test",)),
        f"nobody@{LOCAL}": ((), ()),
        f"pct%alias@{LOCAL}": ((f"alice@{LOCAL}",), ()),
    })
    return cls_directory(FakeDirectory, **kw)


def cls_directory(cls, **kw):
    return cls(**kw)


GROUPS = FakeIPGroups({"Trusted": {"10.1.2.3", "2001:db8::25"}, "Other": {"198.51.100.7"}})

UNTRUSTED = Session("198.51.100.7", 40001, "smtp")
RELAY_IP = Session("10.1.2.3", 40002, "smtp")
AUTHED = Session("198.51.100.7", 40003, "submission", tls=True, authenticated=f"alice@{LOCAL}")


def trust(relay_group_enabled=True, auth_enabled=True, group="Trusted") -> TrustPolicy:
    return TrustPolicy(GROUPS, relay_group_enabled, group, auth_enabled)


# --- interfaces ---------------------------------------------------------------------

def test_verify_objects():
    t = trust()
    d = directory()
    assert verifyObject(ITrustPolicy, t)
    assert verifyObject(IRecipientPolicy, RecipientPolicy(d, t))
    assert verifyObject(IVrfyPolicy, VrfyPolicy(True, d, t))
    assert verifyObject(IUserDirectory, d)
    assert verifyObject(IIPGroups, GROUPS)


# --- RecipientVerdict ------------------------------------------------------

def test_verdict_invariants():
    v = RecipientVerdict(replies.RECIPIENT_OK, "r", relay=True, address="u@x.test")
    assert v.accepted and v.relay_to == ("u@x.test",)
    v = RecipientVerdict(replies.RECIPIENT_OK, "r", mailboxes=["a@x.test"], relay_to=("f@y.test",))
    assert v.relay and v.mailboxes == ("a@x.test",)
    assert not RecipientVerdict(replies.RELAY_DENIED, "r").accepted
    with pytest.raises(ValueError):
        RecipientVerdict(replies.RELAY_DENIED, "r", relay=True, address="u@x.test")
    with pytest.raises(ValueError):
        RecipientVerdict(replies.UNKNOWN_USER, "r", mailboxes=("a@x.test",))


# --- trust ------------------------------------------------------------------------------

TRUST_TABLE = [
    # (relay_group_enabled, auth_enabled, session, trusted, why)
    (True, True, RELAY_IP, True, "relay-group"),
    (True, True, Session("::ffff:10.1.2.3", 1, "smtp"), True, "relay-group"),
    (True, True, Session("2001:db8::25", 1, "smtp"), True, "relay-group"),
    (True, True, Session("2001:DB8:0::25", 1, "smtp"), True, "relay-group"),
    (False, True, RELAY_IP, False, None),
    (True, True, AUTHED, True, "auth"),
    (True, False, AUTHED, False, None),  # RelayControlAuthEnabled=0: AUTH earns nothing
    (False, False, AUTHED, False, None),
    (False, False, RELAY_IP, False, None),
    (True, True, UNTRUSTED, False, None),
    (True, True, dataclasses.replace(UNTRUSTED, helo=LOCAL, tls=True), False, None),
    (True, True, dataclasses.replace(UNTRUSTED, authenticated=""), False, None),
    (True, True, Session("", 0, "smtp"), False, None),
    (True, True, Session("not an ip", 0, "smtp"), False, None),
    (True, True, Session("10.1.2.4", 1, "smtp"), False, None),
]


@pytest.mark.parametrize("group_on, auth_on, session, trusted, why", TRUST_TABLE)
def test_trust(group_on, auth_on, session, trusted, why):
    policy = trust(group_on, auth_on)
    assert policy.is_trusted(session) is trusted
    assert policy.why_trusted(session) == why


def test_trust_with_unnamed_or_unknown_group():
    assert not TrustPolicy(GROUPS, True, "", True).is_trusted(RELAY_IP)
    assert not TrustPolicy(GROUPS, True, "Nope", True).is_trusted(RELAY_IP)
    assert TrustPolicy(GROUPS, True, "Other", False).is_trusted(UNTRUSTED)


# --- RCPT ---------------------------------------------------------------------------------

OK, UNKNOWN, DISABLED, DENIED = (replies.RECIPIENT_OK, replies.UNKNOWN_USER,
                                 replies.DISABLED_USER, replies.RELAY_DENIED)
A, B = f"alice@{LOCAL}", f"bob@{LOCAL}"

RCPT_TABLE = [
    # (session, path, reply, mailboxes, relay_to)
    (UNTRUSTED, f"<alice@{LOCAL}>", OK, (A,), ()),
    (UNTRUSTED, "<ALICE@EXAMPLE.COM.>", OK, (A,), ()),
    (UNTRUSTED, '<"alice"@example.com>', OK, (A,), ()),
    (UNTRUSTED, "<alice@example.net>", OK, (A,), ()),  # domain alias
    (UNTRUSTED, "<@relay.test:alice@example.com>", OK, (A,), ()),
    (UNTRUSTED, f"<sales@{LOCAL}>", OK, (A, B), ()),
    (UNTRUSTED, f"<ext@{LOCAL}>", OK, (), ("someone@elsewhere.test",)),
    (UNTRUSTED, f"<both@{LOCAL}>", OK, (A,), ("someone@elsewhere.test",)),
    (UNTRUSTED, f"<nobody@{LOCAL}>", UNKNOWN, (), ()),
    (UNTRUSTED, f"<zed@{LOCAL}>", UNKNOWN, (), ()),
    (UNTRUSTED, f"<carol@{LOCAL}>", DISABLED, (), ()),
    (UNTRUSTED, "<user@evil.test>", DENIED, (), ()),
    (UNTRUSTED, f"<user@{OTHER}>", DENIED, (), ()),
    (UNTRUSTED, f"<odd%name@{LOCAL}>", OK, (f"odd%name@{LOCAL}",), ()),  # an exact account
    (UNTRUSTED, f"<pct%alias@{LOCAL}>", UNKNOWN, (), ()),  # an alias is not an exact account
    (UNTRUSTED, f"<user@[{OUR_IP}]>", DENIED, (), ()),
    (RELAY_IP, f"<user@{OTHER}>", OK, (), (f"user@{OTHER}",)),
    (AUTHED, f"<user@{OTHER}>", OK, (), (f"user@{OTHER}",)),
    (AUTHED, f"<USER@{OTHER.upper()}.>", OK, (), (f"USER@{OTHER}",)),
    (RELAY_IP, f"<alice@{LOCAL}>", OK, (A,), ()),
    (RELAY_IP, f"<zed@{LOCAL}>", UNKNOWN, (), ()),  # trust never invents users
    (RELAY_IP, f"<carol@{LOCAL}>", DISABLED, (), ()),
    (RELAY_IP, f"<user@[{OUR_IP}]>", OK, (), (f"user@[{OUR_IP}]",)),
    (RELAY_IP, "<user@[IPv6:2001:db8::5]>", OK, (), ("user@[IPv6:2001:db8::5]",)),
    (RELAY_IP, "<user@[127.0.0.1]>", DENIED, (), ()),
    (RELAY_IP, "<user@[0.0.0.0]>", DENIED, (), ()),
    (RELAY_IP, "<user@[224.0.0.1]>", DENIED, (), ()),
    (RELAY_IP, "<user@[169.254.1.1]>", DENIED, (), ()),
    (RELAY_IP, "<user@[IPv6:::1]>", DENIED, (), ()),
    (RELAY_IP, "<user@[IPv6:::ffff:127.0.0.1]>", DENIED, (), ()),
    (RELAY_IP, "<user@[IPv6:fe80::1]>", DENIED, (), ()),
    # Hidden destinations: never relayed, whoever asks.
    (RELAY_IP, f"<user%{OTHER}@{LOCAL}>", UNKNOWN, (), ()),
    (AUTHED, f"<{OTHER}!user@{LOCAL}>", UNKNOWN, (), ()),
    (AUTHED, f'<"user@{OTHER}"@{LOCAL}>', UNKNOWN, (), ()),
    (AUTHED, f"<user%{LOCAL}@{OTHER}>", DENIED, (), ()),
    (AUTHED, f'<"user@{LOCAL}"@{OTHER}>', DENIED, (), ()),
    (RELAY_IP, f"<user%{OTHER}@[{OUR_IP}]>", DENIED, (), ()),
    (RELAY_IP, f"<odd%name@{LOCAL}>", OK, (f"odd%name@{LOCAL}",), ()),
]


@pytest.mark.parametrize("session, path, reply, mailboxes, relay_to", RCPT_TABLE,
                         ids=[f"{s.client_ip}-{p}" for s, p, *_ in RCPT_TABLE])
def test_recipient(session, path, reply, mailboxes, relay_to):
    policy = RecipientPolicy(directory(), trust())
    verdict = result_of(policy.check_recipient(session, parse_path(path, allow_null=False)))
    assert verdict.reply == reply, verdict.reason
    assert verdict.accepted is reply.positive
    assert verdict.mailboxes == mailboxes
    assert verdict.relay_to == relay_to
    assert verdict.relay is bool(relay_to)
    assert verdict.reason


def test_recipient_canonical_address():
    policy = RecipientPolicy(directory(), trust())
    verdict = result_of(policy.check_recipient(UNTRUSTED, parse_path("<ALICE@example.net.>", allow_null=False)))
    assert verdict.address == A
    verdict = result_of(policy.check_recipient(UNTRUSTED, parse_path("<user@EVIL.test>", allow_null=False)))
    assert verdict.address == "user@evil.test"


def test_relay_denied_when_auth_relay_disabled():
    policy = RecipientPolicy(directory(), trust(auth_enabled=False))
    verdict = result_of(policy.check_recipient(AUTHED, Mailbox("user", OTHER)))
    assert verdict.reply == DENIED and not verdict.relay


def test_ip_literal_never_local():
    """Even a directory that claims every domain is local is not asked
    about an address literal."""
    d = directory()
    d.is_local_domain = lambda domain: True  # type: ignore[method-assign]
    policy = RecipientPolicy(d, trust())
    verdict = result_of(policy.check_recipient(UNTRUSTED, Mailbox("alice", "[127.0.0.1]")))
    assert verdict.reply == DENIED
    assert d.calls == []


def test_directory_not_local_after_local_domain_is_refused():
    d = directory()
    d.lookup = lambda address: FakeLookup(LookupStatus.NOT_LOCAL, address)  # type: ignore[method-assign]
    policy = RecipientPolicy(d, trust())
    verdict = result_of(policy.check_recipient(RELAY_IP, Mailbox("alice", LOCAL)))
    assert verdict.reply == UNKNOWN and not verdict.relay


def test_directory_failure_is_a_failed_deferred():
    d = directory()

    def boom(address):
        raise RuntimeError("directory down")

    d.lookup = boom  # type: ignore[method-assign]
    out = []
    RecipientPolicy(d, trust()).check_recipient(UNTRUSTED, Mailbox("alice", LOCAL)).addErrback(out.append)
    assert out and out[0].check(RuntimeError)


def test_unexpected_status_is_a_failed_deferred():
    d = directory()
    d.lookup = lambda address: FakeLookup("MAYBE", address)  # type: ignore[method-assign,arg-type]
    out = []
    RecipientPolicy(d, trust()).check_recipient(UNTRUSTED, Mailbox("alice", LOCAL)).addErrback(out.append)
    assert out and out[0].check(ValueError)


def test_status_compared_by_name():
    """Any enum with the member names works: the real LookupStatus and a fake."""

    class Other(enum.Enum):
        KNOWN = 1

    d = directory()
    d.lookup = lambda address: FakeLookup(Other.KNOWN, A, (A,))  # type: ignore[method-assign,arg-type]
    verdict = result_of(RecipientPolicy(d, trust()).check_recipient(UNTRUSTED, Mailbox("alice", LOCAL)))
    assert verdict.reply == OK


def test_sender_never_makes_a_client_trusted():
    """Trust depends only on the session: the policy is not even told the
    sender, and a HELO naming our domain changes nothing."""
    session = dataclasses.replace(UNTRUSTED, helo=LOCAL)
    verdict = result_of(RecipientPolicy(directory(), trust()).check_recipient(session, Mailbox("user", OTHER)))
    assert verdict.reply == DENIED


# --- the open-relay test list ------------------------------------------------------------
#
# The classic relay tests (the abuse.net / ORDB / rlytest lists and their
# kin), with the local domain example.com, the victim "evil.test" and the
# server's own address 192.0.2.1.  Each is a RCPT TO argument.

RELAY_TESTS = [
    f"TO:<user@{OTHER}>",
    f"TO:user@{OTHER}",
    f"TO:<user@{OTHER}.>",
    f"TO:<USER@{OTHER.upper()}>",
    "TO:<user@EvIl.TeSt>",
    f'TO:<"user"@{OTHER}>',
    f"TO:<user%{OTHER}@{LOCAL}>",
    f"TO:<USER%{OTHER.upper()}@{LOCAL.upper()}>",
    f"TO:<user%{OTHER}@{LOCAL}.>",
    f"TO:<user%{OTHER}%{LOCAL}@{LOCAL}>",
    f"TO:<user%{OTHER}@[{OUR_IP}]>",
    f"TO:<user%{OTHER}>",
    f'TO:<"user@{OTHER}">',
    f'TO:<"user@{OTHER}"@{LOCAL}>',
    f'TO:<"USER@{OTHER.upper()}"@{LOCAL}>',
    f'TO:<"user@{OTHER}"@[{OUR_IP}]>',
    f'TO:<"user%{OTHER}"@{LOCAL}>',
    f'TO:<"user%{OTHER}@{LOCAL}">',
    f"TO:<user@{OTHER}@{LOCAL}>",
    f"TO:<user@{OTHER}@[{OUR_IP}]>",
    f"TO:<@{LOCAL}:user@{OTHER}>",
    f"TO:<@{LOCAL},@{LOCAL}:user@{OTHER}>",
    f"TO:<@[{OUR_IP}]:user@{OTHER}>",
    f"TO:<{OTHER}!user>",
    f"TO:<{OTHER}!user@{LOCAL}>",
    f"TO:<{OTHER.upper()}!USER@{LOCAL}>",
    f"TO:<{OTHER}!user@[{OUR_IP}]>",
    f'TO:<"{OTHER}!user"@{LOCAL}>',
    f"TO:<{OTHER}!user%{LOCAL}@{LOCAL}>",
    f"TO:<{OTHER}:user@{LOCAL}>",
    f'TO:<"{OTHER}:user"@{LOCAL}>',
    f'TO:<"@{OTHER}:user"@{LOCAL}>',
    "TO:<user@[127.0.0.1]>",
    f"TO:<user@[{OUR_IP}]>",
    "TO:<user@[IPv6:::1]>",
    "TO:<user@[IPv6:::ffff:127.0.0.1]>",
    "TO:<user@127.0.0.1>",
    "TO:<user@localhost>",
    f"TO:<user@{LOCAL}.{OTHER}>",
    f"TO:<user@{OTHER}%{LOCAL}>",
    f"TO:<user@{OTHER},user@{LOCAL}>",
    f"TO:<user@{OTHER}> <user@{LOCAL}>",
    f'TO:<"<user@{OTHER}>"@{LOCAL}>',
    f'TO:<"user\\@{OTHER}"@{LOCAL}>',
    f"TO:<user@{OTHER}\\@{LOCAL}>",
]


def relay_directories():
    out = [
        ("fake", directory()),
        ("percent-hack", cls_directory(PercentHackDirectory, domain_aliases={}, users=[f"user@{LOCAL}"])),
        ("catch-all", cls_directory(CatchAllDirectory, domain_aliases={}, users=[f"user@{LOCAL}"])),
    ]
    real = _real_directory()
    if real is not None:
        out.append(("real", real))
    return out


def _real_directory():
    from mailguard.policy.directorybuild import build
    from mailguard.config.records import AliasRecord, DomainRecord, UserRecord

    d, problems = build(
        [DomainRecord(LOCAL, ("example.net",))],
        [UserRecord("user", LOCAL), UserRecord("alice", LOCAL), UserRecord("carol", LOCAL, enabled=False)],
        [AliasRecord("*", LOCAL, (f"alice@{LOCAL}",)), AliasRecord("fwd", LOCAL, (f"user@{OTHER}",))],
    )
    assert [p for p in problems if p.is_error] == []
    return d


def test_relay_test_list_is_long_enough():
    assert len(RELAY_TESTS) >= 25


@pytest.mark.parametrize("name, dir_", relay_directories(), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("arg", RELAY_TESTS)
def test_open_relay_tests_untrusted(arg, name, dir_):
    """None of the relay tests is accepted from an untrusted client."""
    try:
        mailbox, _ = parse_rcpt_to(arg)
    except AddressError as e:
        assert e.reply.code == 501
        return
    verdict = result_of(RecipientPolicy(dir_, trust()).check_recipient(UNTRUSTED, mailbox))
    assert not verdict.accepted, (arg, verdict)
    assert verdict.reply in (replies.RELAY_DENIED, replies.UNKNOWN_USER)
    assert (verdict.mailboxes, verdict.relay, verdict.relay_to) == ((), False, ())


@pytest.mark.parametrize("name, dir_", relay_directories(), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("arg", RELAY_TESTS)
def test_open_relay_tests_trusted(arg, name, dir_):
    """A trusted client may relay, but a hidden destination is never
    relayed, and a relay goes exactly to the address given."""
    try:
        mailbox, _ = parse_rcpt_to(arg)
    except AddressError:
        return
    verdict = result_of(RecipientPolicy(dir_, trust()).check_recipient(RELAY_IP, mailbox))
    if hidden_destination(mailbox):
        assert not verdict.accepted, (arg, verdict)
    if verdict.relay:
        assert verdict.relay_to == (mailbox.address,)
        assert mailbox.is_ip_literal or not dir_.is_local_domain(mailbox.domain)


def test_trusted_relays_plain_non_local():
    verdict = result_of(RecipientPolicy(directory(), trust()).check_recipient(RELAY_IP, Mailbox("user", OTHER)))
    assert verdict.accepted and verdict.relay
    assert verdict.reply == replies.RECIPIENT_OK
    assert verdict.relay_to == (f"user@{OTHER}",)
    assert verdict.mailboxes == ()


def test_real_directory_contract():
    d = _real_directory()
    policy = RecipientPolicy(d, trust())
    check = lambda s, p: result_of(policy.check_recipient(s, parse_path(p, allow_null=False)))  # noqa: E731
    assert check(UNTRUSTED, f"<USER@{LOCAL}>").mailboxes == (f"user@{LOCAL}",)
    assert check(UNTRUSTED, f"<carol@{LOCAL}>").reply == DISABLED
    assert check(UNTRUSTED, f"<zed@{LOCAL}>").mailboxes == (A,)  # the wildcard
    assert check(UNTRUSTED, f"<user%{OTHER}@{LOCAL}>").reply == UNKNOWN  # wildcard is not exact
    assert check(UNTRUSTED, f"<fwd@{LOCAL}>").relay_to == (f"user@{OTHER}",)
    assert check(UNTRUSTED, f"<user@{OTHER}>").reply == DENIED


# --- the gateway hook ---------------------------------------------------------------------

class FakeGateway:
    def __init__(self, domains, answer=None):
        self.domains = set(domains)
        self.answer = answer
        self.asked: list[Mailbox] = []

    def handles(self, domain):
        return domain in self.domains

    def check(self, mailbox):
        self.asked.append(mailbox)
        if self.answer is not None:
            return self.answer
        return defer.succeed(RecipientVerdict(replies.RECIPIENT_OK, "back-end knows it",
                                              relay=True, address=mailbox.address))


def test_gateway_decides_its_domains():
    gw = FakeGateway({"backend.test"})
    d = directory()
    policy = RecipientPolicy(d, trust(), gateway=gw)
    verdict = result_of(policy.check_recipient(UNTRUSTED, Mailbox("x", "backend.test")))
    assert verdict.accepted and verdict.relay_to == ("x@backend.test",)
    assert gw.asked == [Mailbox("x", "backend.test")]
    assert d.calls == []
    # Other domains are not its business.
    assert result_of(policy.check_recipient(UNTRUSTED, Mailbox("alice", LOCAL))).mailboxes == (A,)
    assert result_of(policy.check_recipient(UNTRUSTED, Mailbox("x", OTHER))).reply == DENIED
    assert gw.asked == [Mailbox("x", "backend.test")]


@pytest.mark.parametrize("mailbox", [
    Mailbox(f"user%{OTHER}", "backend.test"),
    Mailbox(f"{OTHER}!user", "backend.test"),
    Mailbox(f"user@{OTHER}", "backend.test", True),
])
def test_gateway_never_sees_hidden_destinations(mailbox):
    gw = FakeGateway({"backend.test"})
    for session in (UNTRUSTED, RELAY_IP):
        verdict = result_of(RecipientPolicy(directory(), trust(), gateway=gw).check_recipient(session, mailbox))
        assert verdict.reply == UNKNOWN
    assert gw.asked == []


def test_gateway_answer_may_come_later():
    pending = defer.Deferred()
    gw = FakeGateway({"backend.test"}, answer=pending)
    d = RecipientPolicy(directory(), trust(), gateway=gw).check_recipient(UNTRUSTED, Mailbox("x", "backend.test"))
    out = []
    d.addCallback(out.append)
    assert out == []
    pending.callback(RecipientVerdict(replies.UNKNOWN_USER, "back-end: 550"))
    assert out[0].reply == UNKNOWN


def test_gateway_not_asked_about_literals():
    gw = FakeGateway({"[192.0.2.1]"})
    verdict = result_of(RecipientPolicy(directory(), trust(), gateway=gw).check_recipient(
        UNTRUSTED, Mailbox("x", "[192.0.2.1]")))
    assert verdict.reply == DENIED and gw.asked == []


# --- VRFY ---------------------------------------------------------------------------------

KNOWN_250 = replies.VRFY_KNOWN.with_text(f"<{A}>")

VRFY_ARGS = {
    "known": f"alice@{LOCAL}",
    "known-bracketed": f"<Alice@{LOCAL.upper()}>",
    "known-display-name": f'"Alice A." <alice@{LOCAL}>',
    "known-bare": "alice",
    "unknown": f"zed@{LOCAL}",
    "unknown-bare": "zed",
    "disabled": f"carol@{LOCAL}",
    "not-local": f"alice@{OTHER}",
    "literal": f"alice@[{OUR_IP}]",
    "hidden": f"alice%{OTHER}@{LOCAL}",
    "hidden-exact": f"odd%name@{LOCAL}",
    "empty": "",
    "blank": "   ",
    "malformed": "alice@@example.com",
    "malformed-spaces": "Alice Smith",
    "malformed-utf8": "alicé",
}
WELL_FORMED = [k for k in VRFY_ARGS if not k.startswith(("empty", "blank", "malformed"))]

TRUSTED_ANSWERS = {
    "known": KNOWN_250,
    "known-bracketed": KNOWN_250,
    "known-display-name": KNOWN_250,
    "known-bare": KNOWN_250,
    "unknown": replies.VRFY_UNKNOWN,
    "unknown-bare": replies.VRFY_UNKNOWN,
    "disabled": replies.VRFY_UNKNOWN,
    "not-local": replies.VRFY_UNKNOWN,
    "literal": replies.VRFY_UNKNOWN,
    "hidden": replies.VRFY_UNKNOWN,
    "hidden-exact": replies.VRFY_KNOWN.with_text(f"<odd%name@{LOCAL}>"),
    "empty": replies.SYNTAX_ERROR,
    "blank": replies.SYNTAX_ERROR,
    "malformed": replies.SYNTAX_ERROR,
    "malformed-spaces": replies.SYNTAX_ERROR,
    "malformed-utf8": replies.SYNTAX_ERROR,
}


def vrfy_expected(enabled: bool, trusted: bool, kind: str):
    if not enabled:
        return replies.VRFY_DISABLED
    if kind not in WELL_FORMED:
        return replies.SYNTAX_ERROR
    if not trusted:
        return replies.VRFY_WITHHELD
    return TRUSTED_ANSWERS[kind]


VRFY_MATRIX = [
    (enabled, session, kind)
    for enabled in (True, False)
    for session in (UNTRUSTED, RELAY_IP, AUTHED)
    for kind in VRFY_ARGS
]


@pytest.mark.parametrize("enabled, session, kind", VRFY_MATRIX,
                         ids=[f"{'on' if e else 'off'}-{s.client_port}-{k}" for e, s, k in VRFY_MATRIX])
def test_vrfy_matrix(enabled, session, kind):
    t = trust()
    d = directory() if t.is_trusted(session) else ExplodingDirectory()
    reply = result_of(VrfyPolicy(enabled, d, t).answer(session, VRFY_ARGS[kind]))
    assert reply == vrfy_expected(enabled, t.is_trusted(session), kind)


def test_vrfy_known_wire_form():
    reply = result_of(VrfyPolicy(True, directory(), trust()).answer(RELAY_IP, f"<alice@{LOCAL}>"))
    assert reply.to_bytes() == b"250 2.1.5 <alice@example.com>\r\n"
    reply = result_of(VrfyPolicy(True, directory(), trust()).answer(RELAY_IP, f"zed@{LOCAL}"))
    assert reply.to_bytes()[:10] == b"550 5.1.1 "


def test_vrfy_untrusted_is_the_same_for_every_address():
    """SPEC: 252 2.1.5, byte for byte the same for every address, and the
    directory is never consulted (so timing cannot tell either)."""
    t = trust()
    args = [VRFY_ARGS[k] for k in WELL_FORMED] + [
        "postmaster", f"postmaster@{LOCAL}", f"bob@{LOCAL}", f"sales@{LOCAL}", f"ext@{LOCAL}",
        f"nobody@{LOCAL}", f"<user@{OTHER}>", f"{OTHER}!user", '"john doe"',
        f"Full Name <zed@{LOCAL}>", b"alice",
    ]
    answers = set()
    for session in (UNTRUSTED, dataclasses.replace(AUTHED, authenticated=None),
                    dataclasses.replace(UNTRUSTED, helo=LOCAL)):
        policy = VrfyPolicy(True, ExplodingDirectory(), t)
        answers |= {result_of(policy.answer(session, a)).to_bytes() for a in args}
    assert answers == {b"252 2.1.5 Verification not supported\r\n"}
    # Authenticated but RelayControlAuthEnabled=0: still withheld.
    no_auth = trust(auth_enabled=False)
    assert result_of(VrfyPolicy(True, ExplodingDirectory(), no_auth).answer(AUTHED, "alice")) == replies.VRFY_WITHHELD


def test_vrfy_disabled_answers_everything_the_same():
    policy = VrfyPolicy(False, ExplodingDirectory(), trust())
    for session in (UNTRUSTED, RELAY_IP):
        for arg in [*VRFY_ARGS.values(), b"alice", b"\xff"]:
            assert result_of(policy.answer(session, arg)).to_bytes() == b"502 5.5.1 VRFY command is disabled\r\n"


BARE_TABLE = [
    # (primary domains, users, argument, reply)
    ((LOCAL,), [f"alice@{LOCAL}"], "alice", KNOWN_250),
    ((LOCAL,), [f"alice@{LOCAL}"], "ALICE", KNOWN_250),
    ((LOCAL,), [f"alice@{LOCAL}"], "<alice>", KNOWN_250),
    ((LOCAL,), [f"alice@{LOCAL}"], "zed", replies.VRFY_UNKNOWN),
    ((LOCAL, "example.org"), [f"alice@{LOCAL}", "alice@example.org"], "alice", replies.VRFY_AMBIGUOUS),
    ((LOCAL, "example.org"), [f"alice@{LOCAL}", "bob@example.org"], "bob",
     replies.VRFY_KNOWN.with_text("<bob@example.org>")),
    ((LOCAL, "example.org"), [f"alice@{LOCAL}", "bob@example.org"], "alice", KNOWN_250),
    ((LOCAL, "example.org"), [f"alice@{LOCAL}"], "zed", replies.VRFY_UNKNOWN),
    ((), [], "alice", replies.VRFY_UNKNOWN),
]


@pytest.mark.parametrize("domains, users, arg, reply", BARE_TABLE)
def test_vrfy_bare_user(domains, users, arg, reply):
    d = FakeDirectory(domains=domains, users=users)
    # From the directory's domains() ...
    assert result_of(VrfyPolicy(True, d, trust()).answer(RELAY_IP, arg)) == reply
    # ... or given explicitly.
    d2 = FakeDirectory(domains=domains, users=users)
    d2.domains = None  # type: ignore[assignment]
    assert result_of(VrfyPolicy(True, d2, trust(), domains=domains).answer(RELAY_IP, arg)) == reply


def test_vrfy_bare_user_ambiguous_wire_form():
    d = FakeDirectory(domains=(LOCAL, "example.org"), users=[f"alice@{LOCAL}", "alice@example.org"])
    reply = result_of(VrfyPolicy(True, d, trust()).answer(RELAY_IP, "alice"))
    assert reply.to_bytes().startswith(b"553 5.1.4 ")


def test_vrfy_catch_all_hidden_is_unknown():
    d = cls_directory(CatchAllDirectory, domain_aliases={}, users=[f"user@{LOCAL}"])
    policy = VrfyPolicy(True, d, trust())
    assert result_of(policy.answer(RELAY_IP, f"user%{OTHER}@{LOCAL}")) == replies.VRFY_UNKNOWN
    assert result_of(policy.answer(RELAY_IP, f"user@{LOCAL}")) == replies.VRFY_KNOWN.with_text(f"<user@{LOCAL}>")


def test_vrfy_real_directory():
    policy = VrfyPolicy(True, _real_directory(), trust())
    assert result_of(policy.answer(RELAY_IP, "user")) == replies.VRFY_KNOWN.with_text(f"<user@{LOCAL}>")
    assert result_of(policy.answer(RELAY_IP, f"carol@{LOCAL}")) == replies.VRFY_UNKNOWN
    assert result_of(policy.answer(RELAY_IP, f"user@{OTHER}")) == replies.VRFY_UNKNOWN
    assert result_of(policy.answer(UNTRUSTED, "user")) == replies.VRFY_WITHHELD


# --- properties -----------------------------------------------------------------------------

ADDRESSY = st.lists(st.sampled_from(
    ["user", "alice", "carol", "odd", "sales", "ext", "%", "!", "@", ".", '"', ":", ",", "<", ">",
     LOCAL, OTHER, "example.net", f"[{OUR_IP}]", "[127.0.0.1]", "[IPv6:::1]", " "]), max_size=8).map("".join)


@settings(max_examples=400)
@given(text=ADDRESSY)
def test_untrusted_never_relays(text):
    """Whatever parses, an untrusted client gets nothing but local accounts
    and the forwards the administrator configured."""
    try:
        mailbox, _ = parse_rcpt_to(f"TO:<{text}>")
    except AddressError:
        return
    d = directory()
    verdict = result_of(RecipientPolicy(d, trust()).check_recipient(UNTRUSTED, mailbox))
    if verdict.accepted:
        assert d.is_local_domain(mailbox.domain) and not mailbox.is_ip_literal
        assert set(verdict.relay_to) <= {"someone@elsewhere.test"}
        assert all(m.endswith("@" + LOCAL) for m in verdict.mailboxes)
        if hidden_destination(mailbox):
            assert verdict.relay_to == () and len(verdict.mailboxes) == 1


@settings(max_examples=300)
@given(text=st.one_of(ADDRESSY, st.text(max_size=40)))
def test_untrusted_vrfy_reveals_nothing(text):
    reply = result_of(VrfyPolicy(True, ExplodingDirectory(), trust()).answer(UNTRUSTED, text))
    assert reply in (replies.VRFY_WITHHELD, replies.SYNTAX_ERROR)
