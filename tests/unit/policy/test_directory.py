"""Tests for mailguard.policy.directory and the fake in mailguard.testing.

L{DirectoryContract} holds what every L{IUserDirectory} must do; it runs
against the real L{UserDirectory} and against L{FakeUserDirectory}.  The
real directory's build rules (aliases, loops, problems) follow.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mailguard.policy.directory import (
    Lookup,
    LookupStatus,
    UserDirectory,
    split_address,
)
from mailguard.policy.directorybuild import build
from mailguard.interfaces import IUserDirectory
from mailguard.config.problems import Where
from mailguard.config.records import AliasRecord, DomainRecord, UserRecord
from mailguard.testing import FakeUserDirectory

KNOWN = LookupStatus.KNOWN
UNKNOWN = LookupStatus.UNKNOWN
DISABLED = LookupStatus.DISABLED
NOT_LOCAL = LookupStatus.NOT_LOCAL

CFG = "mailserver.cfg"


def at(line: int) -> Where:
    return Where(CFG, line)


def domain(name, *aliases, line=1):
    return DomainRecord(name, tuple(aliases), at(line))


def user(address, line=10, enabled=True, aliases=(), password=None):
    name, _, dom = address.rpartition("@")
    return UserRecord(name, dom, password, enabled, tuple(aliases), at(line))


def alias(address, *targets, line=20):
    name, _, dom = address.rpartition("@")
    return AliasRecord(name, dom, tuple(targets), at(line))


def built(domains, users=(), aliases=()):
    directory, problems = build(domains, users, aliases)
    return directory, [str(p) for p in problems]


def clean(domains, users=(), aliases=()):
    directory, problems = built(domains, users, aliases)
    assert problems == []
    return directory


# --- the contract: real and fake ------------------------------------------


class DirectoryContract:
    """The behaviour every IUserDirectory shares.

    The fixture C{directory} holds: local domains example.com (alias
    example.net) and other.org; users john@example.com (enabled),
    old@example.com (disabled) and mary@other.org (enabled).
    """

    @pytest.fixture
    def directory(self):
        raise NotImplementedError

    def test_interface(self, directory):
        assert verifyObject(IUserDirectory, directory)

    def test_known(self, directory):
        assert directory.lookup("john@example.com") == Lookup(
            KNOWN, "john@example.com", ("john@example.com",)
        )

    def test_unknown(self, directory):
        assert directory.lookup("nobody@example.com") == Lookup(UNKNOWN, "nobody@example.com")

    def test_disabled(self, directory):
        found = directory.lookup("old@example.com")
        assert (found.status, found.address, found.mailboxes) == (
            DISABLED,
            "old@example.com",
            (),
        )

    def test_not_local(self, directory):
        # A remote local part keeps its case: only the domain is ours to fold.
        assert directory.lookup("John@Elsewhere.ORG") == Lookup(NOT_LOCAL, "John@elsewhere.org")

    @pytest.mark.parametrize(
        "address",
        ["JOHN@EXAMPLE.COM", "John@Example.Com", "john@example.com.", '"john"@example.com'],
    )
    def test_case_and_form_insensitive(self, directory, address):
        found = directory.lookup(address)
        assert (found.status, found.address) == (KNOWN, "john@example.com")

    @pytest.mark.parametrize("address", ["john@example.net", "JOHN@Example.NET."])
    def test_domain_alias(self, directory, address):
        assert directory.lookup(address) == Lookup(
            KNOWN, "john@example.com", ("john@example.com",)
        )

    def test_domain_alias_disabled(self, directory):
        assert directory.lookup("old@example.net").status == DISABLED

    def test_domain_alias_unknown(self, directory):
        assert directory.lookup("nobody@example.net").status == UNKNOWN

    def test_other_domain(self, directory):
        assert directory.lookup("mary@other.org").address == "mary@other.org"
        assert directory.lookup("mary@example.com").status == UNKNOWN

    @pytest.mark.parametrize(
        "name, expected",
        [
            ("example.com", True),
            ("EXAMPLE.COM.", True),
            ("example.net", True),
            ("other.org", True),
            ("elsewhere.org", False),
            ("com", False),
            ("", False),
        ],
    )
    def test_is_local_domain(self, directory, name, expected):
        assert directory.is_local_domain(name) is expected

    def test_canonical_domain(self, directory):
        assert directory.canonical_domain("Example.NET.") == "example.com"
        assert directory.canonical_domain("elsewhere.org") is None

    @pytest.mark.parametrize(
        "address, status, normalised",
        [
            ("john", UNKNOWN, "john"),
            ("Postmaster", UNKNOWN, "postmaster"),
            ("", UNKNOWN, ""),
            ("john@", UNKNOWN, "john@"),
            ("@example.com", UNKNOWN, "@example.com"),
            ("@elsewhere.org", NOT_LOCAL, "@elsewhere.org"),
            ("@", UNKNOWN, "@"),
        ],
    )
    def test_malformed(self, directory, address, status, normalised):
        assert directory.lookup(address) == Lookup(status, normalised)

    def test_len_counts_accounts(self, directory):
        assert len(directory) == 3

    def test_domains_are_primary(self, directory):
        assert set(directory.domains()) == {"example.com", "other.org"}

    def test_users(self, directory):
        assert set(directory.users()) == {
            "john@example.com",
            "old@example.com",
            "mary@other.org",
        }

    # Property tests are built per call: hypothesis wants one executor per
    # test function, and the contract runs on several.

    def test_never_raises(self, directory):
        @settings(max_examples=200, deadline=None)
        @given(address=st.text())
        def check(address):
            found = directory.lookup(address)
            assert isinstance(found.status, LookupStatus)
            assert isinstance(found.address, str)

        check()

    def test_any_case(self, directory):
        text = "john@example.com"

        @settings(max_examples=100, deadline=None)
        @given(flips=st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        def check(flips):
            mixed = "".join(c.upper() if f else c for c, f in zip(text, flips))
            assert directory.lookup(mixed) == directory.lookup(text)

        check()


class TestRealDirectory(DirectoryContract):
    @pytest.fixture
    def directory(self):
        return clean(
            [domain("example.com", "example.net"), domain("other.org", line=2)],
            [
                user("John@example.com", line=10),
                user("old@example.com", line=11, enabled=False),
                user("mary@other.org", line=12),
            ],
        )


class TestFakeDirectory(DirectoryContract):
    @pytest.fixture
    def directory(self):
        return FakeUserDirectory(
            {
                "John@example.com": "known",
                "old@example.com": "disabled",
                "mary@other.org": "known",
            },
            domains=["example.com", "other.org"],
            domain_aliases={"example.net": "example.com"},
        )


# --- the fake's own extras --------------------------------------------------


class TestFake:
    def test_domains_default_to_the_users(self):
        fake = FakeUserDirectory({"a@x.org": "known", "b@y.org": "disabled"})
        assert fake.domains() == ("x.org", "y.org")

    def test_lookup_values(self):
        sales = Lookup(KNOWN, "sales@x.org", ("a@x.org",), ("out@remote.org",))
        fake = FakeUserDirectory({"a@x.org": "known", "Sales@x.org": sales})
        assert fake.lookup("SALES@x.org") is sales
        assert len(fake) == 1

    def test_bad_value(self):
        with pytest.raises(ValueError):
            FakeUserDirectory({"a@x.org": "maybe"})


# --- the real directory: users --------------------------------------------


class TestUsers:
    def test_empty_directory(self):
        directory = UserDirectory()
        assert verifyObject(IUserDirectory, directory)
        assert len(directory) == 0
        assert directory.lookup("a@example.com").status == NOT_LOCAL

    def test_users_may_be_a_generator(self):
        directory = clean(
            [domain("example.com")], (user(f"u{i}@example.com", line=i) for i in range(5))
        )
        assert len(directory) == 5
        assert list(directory.users()) == [f"u{i}@example.com" for i in range(5)]

    def test_canonical_is_lower_case(self):
        directory = clean([domain("Example.COM.")], [user("John.Smith@EXAMPLE.com")])
        assert directory.lookup("john.smith@example.com").address == "john.smith@example.com"
        assert directory.domains() == ("example.com",)

    def test_user_in_a_domain_alias(self):
        directory = clean([domain("example.com", "example.net")], [user("john@example.net")])
        assert directory.lookup("john@example.com").address == "john@example.com"

    def test_extra_names(self):
        directory = clean(
            [domain("example.com", "example.net"), domain("other.org", line=2)],
            [user("john@example.com", aliases=("jsmith", "J.Smith@other.org"))],
        )
        for address in ["jsmith@example.com", "JSMITH@example.net", "j.smith@other.org"]:
            assert directory.lookup(address) == Lookup(
                KNOWN, "john@example.com", ("john@example.com",)
            ), address
        assert len(directory) == 1

    def test_extra_names_as_kerio_text(self):
        directory = clean([domain("example.com")], [user("john@example.com", aliases=("js, jo",))])
        assert directory.lookup("jo@example.com").address == "john@example.com"
        assert directory.lookup("js@example.com").address == "john@example.com"

    def test_extra_name_of_a_disabled_user(self):
        directory = clean(
            [domain("example.com")], [user("old@example.com", enabled=False, aliases=("o",))]
        )
        assert directory.lookup("o@example.com") == Lookup(DISABLED, "old@example.com")

    def test_enabled_users_cost_no_object_of_their_own(self):
        directory = clean([domain("example.com")], [user("john@example.com")])
        (canonical,) = directory.users()
        assert directory._entries["john@example.com"] is canonical

    def test_memory_per_user(self):
        # The bench measures a million; this keeps the layout honest.
        n = 20000
        directory = clean(
            [domain(f"d{i}.example") for i in range(10)],
            [user(f"user{i:06d}@d{i % 10}.example", line=i) for i in range(n)],
        )
        entries = directory._entries
        size = sys.getsizeof(entries) + sys.getsizeof(directory._accounts)
        size += sum(sys.getsizeof(k) for k in entries)
        assert size / n < 200


# --- the real directory: aliases ------------------------------------------


class TestAliases:
    domains = [domain("example.com", "example.net"), domain("other.org", line=2)]
    users = [
        user("john@example.com", line=10, aliases=("jsmith",)),
        user("mary@example.com", line=11),
        user("old@example.com", line=12, enabled=False),
        user("bob@other.org", line=13),
    ]

    def resolve(self, *aliases, address):
        directory = clean(self.domains, self.users, aliases)
        return directory.lookup(address)

    def test_simple(self):
        found = self.resolve(
            alias("sales@example.com", "john", "mary"), address="sales@example.com"
        )
        assert found == Lookup(
            KNOWN, "sales@example.com", ("john@example.com", "mary@example.com")
        )

    def test_chain_is_flattened(self):
        found = self.resolve(
            alias("a@example.com", "b"),
            alias("b@example.com", "c@example.net"),
            alias("c@example.com", "bob@other.org", "out@remote.org"),
            address="A@Example.NET",
        )
        assert found == Lookup(KNOWN, "a@example.com", ("bob@other.org",), ("out@remote.org",))

    def test_records_with_one_name_merge(self):
        # Kerio writes one Alias row per DeliverTo.
        found = self.resolve(
            alias("team@example.com", "john", line=20),
            alias("team@example.com", "mary", "john", line=21),
            address="team@example.com",
        )
        assert found.mailboxes == ("john@example.com", "mary@example.com")

    def test_to_an_extra_name(self):
        found = self.resolve(alias("js@example.com", "jsmith"), address="js@example.com")
        assert found.mailboxes == ("john@example.com",)

    def test_forward_only(self):
        found = self.resolve(
            alias("ext@example.com", "Someone@Remote.ORG."), address="ext@example.com"
        )
        assert found == Lookup(KNOWN, "ext@example.com", (), ("Someone@remote.org",))

    def test_only_disabled_is_disabled(self):
        found = self.resolve(
            alias("olds@example.com", "old"),
            alias("olds2@example.com", "olds"),
            address="olds2@example.com",
        )
        assert found == Lookup(DISABLED, "olds2@example.com")

    def test_disabled_members_are_dropped(self):
        found = self.resolve(alias("mix@example.com", "old", "mary"), address="mix@example.com")
        assert found == Lookup(KNOWN, "mix@example.com", ("mary@example.com",))

    def test_disabled_and_forward(self):
        found = self.resolve(
            alias("mix@example.com", "old", "x@remote.org"), address="mix@example.com"
        )
        assert found == Lookup(KNOWN, "mix@example.com", (), ("x@remote.org",))

    def test_diamond(self):
        found = self.resolve(
            alias("top@example.com", "left", "right"),
            alias("left@example.com", "john"),
            alias("right@example.com", "john", "mary"),
            address="top@example.com",
        )
        assert found.mailboxes == ("john@example.com", "mary@example.com")

    def test_long_chain(self):
        # Deeper than the recursion limit: resolution is iterative.
        n = sys.getrecursionlimit() + 100
        chain = [alias(f"a{i}@example.com", f"a{i + 1}", line=100 + i) for i in range(n)]
        chain.append(alias(f"a{n}@example.com", "john"))
        found = self.resolve(*chain, address="a0@example.com")
        assert found.mailboxes == ("john@example.com",)

    def test_shadowing_alias_wins(self):
        directory, problems = built(
            self.domains,
            self.users,
            [alias("mary@example.com", "john", line=30)],
        )
        assert problems == [
            f"{CFG}:30: warning: alias mary@example.com shadows user mary@example.com "
            f"({CFG}:11); mail to mary@example.com follows the alias"
        ]
        assert directory.lookup("mary@example.com").mailboxes == ("john@example.com",)

    def test_shadowing_alias_to_itself_reaches_the_user(self):
        # sherlock -> sherlock, watson: Kerio's loop flag delivers the first
        # to the mailbox, and it is no loop.
        directory, problems = built(
            self.domains,
            self.users,
            [alias("mary@example.com", "mary", "bob@other.org", line=30)],
        )
        assert len(problems) == 1 and "shadows user" in problems[0]
        assert directory.lookup("mary@example.com").mailboxes == (
            "mary@example.com",
            "bob@other.org",
        )

    def test_wildcards(self):
        directory = clean(
            self.domains,
            self.users,
            [
                alias("?ill@example.com", "john", line=30),
                alias("*erlock@example.com", "mary", line=31),
                alias("*@example.com", "bob@other.org", line=32),
            ],
        )
        assert directory.lookup("kill@example.com") == Lookup(
            KNOWN, "kill@example.com", ("john@example.com",)
        )
        assert directory.lookup("Scherlock@example.net").mailboxes == ("mary@example.com",)
        assert directory.lookup("anything@example.com").mailboxes == ("bob@other.org",)
        # exact names come first; other domains are untouched
        assert directory.lookup("mary@example.com").mailboxes == ("mary@example.com",)
        assert directory.lookup("nobody@other.org").status == UNKNOWN
        # the wildcard is no address of its own, nor does it take empty names
        assert directory.lookup("@example.com").status == UNKNOWN

    def test_catch_all_to_its_own_domain_is_a_loop(self):
        _, problems = built(self.domains, self.users, [alias("*@other.org", "nobody", line=30)])
        assert problems == [f"{CFG}:30: alias loop: *@other.org -> *@other.org"]

    def test_target_through_a_wildcard(self):
        found = self.resolve(
            alias("*@other.org", "john@example.com", line=30),
            alias("x@example.com", "whoever@other.org", line=31),
            address="x@example.com",
        )
        assert found.mailboxes == ("john@example.com",)


LOOP_AB = "a@example.com -> b@example.com -> a@example.com"


class TestLoops:
    domains = [domain("example.com")]
    users = [user("john@example.com", line=10)]

    def test_two(self):
        directory, problems = built(
            self.domains,
            self.users,
            [alias("a@example.com", "b", line=20), alias("b@example.com", "a", line=21)],
        )
        assert problems == [f"{CFG}:20: alias loop: {LOOP_AB}"]
        assert directory.lookup("a@example.com").status == UNKNOWN

    def test_self(self):
        _, problems = built(self.domains, self.users, [alias("a@example.com", "a", line=20)])
        assert problems == [f"{CFG}:20: alias loop: a@example.com -> a@example.com"]

    def test_reported_once_with_the_shortest_chain(self):
        _, problems = built(
            self.domains,
            self.users,
            [
                alias("a@example.com", "b", line=20),
                alias("b@example.com", "c", "a", line=21),
                alias("c@example.com", "a", line=22),
                alias("entry@example.com", "b", line=23),
            ],
        )
        assert problems == [f"{CFG}:20: alias loop: {LOOP_AB}"]

    def test_two_loops_two_problems(self):
        _, problems = built(
            self.domains,
            self.users,
            [
                alias("a@example.com", "b", line=20),
                alias("b@example.com", "a", line=21),
                alias("c@example.com", "d", line=22),
                alias("d@example.com", "c", line=23),
            ],
        )
        assert len(problems) == 2
        assert problems[1].startswith(f"{CFG}:22: alias loop: c@example.com")

    def test_members_deliver_to_what_the_loop_reaches(self):
        directory, problems = built(
            self.domains,
            self.users,
            [
                alias("a@example.com", "b", line=20),
                alias("b@example.com", "a", "john", "x@remote.org", line=21),
            ],
        )
        assert len(problems) == 1
        for address in ["a@example.com", "b@example.com"]:
            found = directory.lookup(address)
            assert found.mailboxes == ("john@example.com",), address
            assert found.forwards == ("x@remote.org",), address


# --- every problem names its place ----------------------------------------


PROBLEMS = [
    pytest.param(
        [domain("example.com", line=1), domain("EXAMPLE.com.", line=2)],
        [],
        [],
        [f"{CFG}:2: duplicate domain example.com (first defined at {CFG}:1)"],
        id="duplicate-domain",
    ),
    pytest.param(
        [domain("", line=3)],
        [],
        [],
        [f"{CFG}:3: domain with an empty name"],
        id="empty-domain",
    ),
    pytest.param(
        [domain("example.com", line=1), domain("other.org", "example.com", line=2)],
        [],
        [],
        [
            f"{CFG}:2: domain alias example.com of other.org collides with domain "
            f"example.com ({CFG}:1)"
        ],
        id="domain-alias-is-a-domain",
    ),
    pytest.param(
        [domain("other.org", "example.com", line=1), domain("example.com", line=2)],
        [],
        [],
        [
            f"{CFG}:1: domain alias example.com of other.org collides with domain "
            f"example.com ({CFG}:2)"
        ],
        id="domain-alias-is-a-later-domain",
    ),
    pytest.param(
        [domain("a.org", "x.org", line=1), domain("b.org", "X.org", line=2)],
        [],
        [],
        [
            f"{CFG}:2: domain alias x.org of b.org collides with alias x.org of domain "
            f"a.org ({CFG}:1)"
        ],
        id="domain-alias-twice",
    ),
    pytest.param(
        [domain("example.com")],
        [user("john@example.com", line=10), user("JOHN@Example.com", line=14)],
        [],
        [
            f"{CFG}:14: duplicate user JOHN@example.com: john@example.com is already "
            f"defined at {CFG}:10 (user names are case-insensitive)"
        ],
        id="duplicate-user",
    ),
    pytest.param(
        [domain("example.com", "example.net")],
        [user("john@example.com", line=10), user("john@example.net", line=14)],
        [],
        [
            f"{CFG}:14: duplicate user john@example.net: john@example.com is already "
            f"defined at {CFG}:10 (user names are case-insensitive)"
        ],
        id="duplicate-user-through-domain-alias",
    ),
    pytest.param(
        [domain("example.com")],
        [user("bob@elsewhere.org", line=11)],
        [],
        [f"{CFG}:11: user bob@elsewhere.org: domain elsewhere.org is not a local domain"],
        id="user-not-local",
    ),
    pytest.param(
        [domain("example.com")],
        [user("@example.com", line=11)],
        [],
        [f"{CFG}:11: user with an empty name in domain example.com"],
        id="user-empty-name",
    ),
    pytest.param(
        [domain("example.com")],
        [user("john@example.com", line=10, aliases=("js@elsewhere.org",))],
        [],
        [
            f"{CFG}:10: user john@example.com: alias js@elsewhere.org is not an address "
            "in a local domain"
        ],
        id="user-extra-name-not-local",
    ),
    pytest.param(
        [domain("example.com")],
        [
            user("john@example.com", line=10, aliases=("js",)),
            user("jane@example.com", line=11, aliases=("JS",)),
        ],
        [],
        [
            f"{CFG}:11: user jane@example.com: alias js@example.com already names user "
            f"john@example.com ({CFG}:10)"
        ],
        id="user-extra-name-taken",
    ),
    pytest.param(
        [domain("example.com")],
        [
            user("john@example.com", line=10, aliases=("mary",)),
            user("mary@example.com", line=11),
        ],
        [],
        [
            f"{CFG}:11: user mary@example.com is also an alias of user john@example.com "
            f"({CFG}:10); the alias is ignored"
        ],
        id="user-is-another-users-extra-name",
    ),
    pytest.param(
        [domain("example.com")],
        [],
        [alias("sales@elsewhere.org", "john", line=21)],
        [f"{CFG}:21: alias sales@elsewhere.org: domain elsewhere.org is not a local domain"],
        id="alias-not-local",
    ),
    pytest.param(
        [domain("example.com")],
        [],
        [alias("@example.com", "john", line=21)],
        [f"{CFG}:21: alias with an empty name in domain example.com"],
        id="alias-empty-name",
    ),
    pytest.param(
        [domain("example.com")],
        [user("john@example.com", line=10)],
        [alias("john@example.com", "x@remote.org", line=21)],
        [
            f"{CFG}:21: warning: alias john@example.com shadows user john@example.com "
            f"({CFG}:10); mail to john@example.com follows the alias"
        ],
        id="alias-shadows-user",
    ),
    pytest.param(
        [domain("example.com")],
        [user("john@example.com", line=10, aliases=("js",))],
        [alias("js@example.com", "x@remote.org", line=21)],
        [
            f"{CFG}:21: warning: alias js@example.com shadows user john@example.com "
            f"({CFG}:10); mail to js@example.com follows the alias"
        ],
        id="alias-shadows-extra-name",
    ),
    pytest.param(
        [domain("example.com", "example.net")],
        [],
        [alias("sales@example.com", "nobody@Example.NET", line=22)],
        [
            f"{CFG}:22: alias sales@example.com: target nobody@example.com is not a local "
            "user or alias"
        ],
        id="alias-target-unknown",
    ),
    pytest.param(
        [domain("example.com")],
        [],
        [alias("sales@example.com", line=23)],
        [f"{CFG}:23: alias sales@example.com delivers to nothing"],
        id="alias-delivers-to-nothing",
    ),
    pytest.param(
        [domain("example.com")],
        [],
        [alias("a@example.com", "b", line=24), alias("b@example.com", "a", line=25)],
        [f"{CFG}:24: alias loop: {LOOP_AB}"],
        id="alias-loop",
    ),
]


@pytest.mark.parametrize("domains, users, aliases, expected", PROBLEMS)
def test_problem(domains, users, aliases, expected):
    _, problems = built(domains, users, aliases)
    assert problems == expected


def test_warning_is_not_an_error():
    _, problems = build(
        [domain("example.com")],
        [user("john@example.com")],
        [alias("john@example.com", "x@remote.org")],
    )
    assert [p.is_error for p in problems] == [False]


def test_problems_in_file_order():
    _, problems = build(
        [domain("example.com", line=1)],
        [user("a@nowhere.org", line=30), user("b@nowhere.org", line=5)],
        [alias("x@nowhere.org", "a", line=17)],
    )
    assert [p.where.line for p in problems] == [5, 17, 30]


def test_first_duplicate_wins():
    directory, _ = build(
        [domain("example.com")],
        [user("john@example.com", line=10), user("John@example.com", line=11, enabled=False)],
        [],
    )
    assert directory.lookup("john@example.com").status == KNOWN
    assert len(directory) == 1


def test_dropped_domain_takes_its_aliases():
    directory, problems = build(
        [domain("example.com", line=1), domain("example.com", "example.net", line=2)],
        [],
        [],
    )
    assert len(problems) == 1
    assert not directory.is_local_domain("example.net")


# --- build never raises; aliases resolve to what they reach ---------------

NAMES = st.sampled_from(["a", "b", "c", "d", "A", "*", "?", ""])
DOMAINS = st.sampled_from(["x.org", "y.org", "X.org.", "z.net", ""])


@st.composite
def configurations(draw):
    domains = draw(
        st.lists(
            st.builds(
                lambda n, a, line: DomainRecord(n, tuple(a), at(line)),
                DOMAINS,
                st.lists(DOMAINS, max_size=2),
                st.integers(1, 99),
            ),
            max_size=3,
        )
    )
    users = draw(
        st.lists(
            st.builds(
                lambda n, d, e, a, line: UserRecord(n, d, None, e, tuple(a), at(line)),
                NAMES,
                DOMAINS,
                st.booleans(),
                st.lists(NAMES, max_size=2),
                st.integers(1, 99),
            ),
            max_size=6,
        )
    )
    targets = st.one_of(NAMES, st.builds("{}@{}".format, NAMES, DOMAINS))
    aliases = draw(
        st.lists(
            st.builds(
                lambda n, d, t, line: AliasRecord(n, d, tuple(t), at(line)),
                NAMES,
                DOMAINS,
                st.lists(targets, max_size=3),
                st.integers(1, 99),
            ),
            max_size=8,
        )
    )
    return domains, users, aliases


@settings(max_examples=300, deadline=None)
@given(configurations())
def test_build_never_raises(config):
    directory, problems = build(*config)
    accounts = set(directory.users())
    assert len(accounts) == len(directory)
    for problem in problems:
        assert str(problem).startswith(f"{CFG}:")
    for key, value in directory._entries.items():
        found = directory.lookup(key)
        assert found.status in (KNOWN, DISABLED, UNKNOWN)
        assert set(found.mailboxes) <= accounts
        assert found.status != KNOWN or found.mailboxes or found.forwards


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcdef"), st.lists(st.sampled_from("abcdefuvw"), max_size=3)),
        max_size=8,
    )
)
def test_flattening_matches_reachability(graph):
    """Aliases a..f over users u, v, w: what a lookup answers is what a
    plain search of the alias graph reaches."""
    rows = [alias(f"{name}@x.org", *targets) for name, targets in graph]
    users = [user(f"{n}@x.org") for n in "uvw"]
    directory, _ = build([domain("x.org")], users, rows)

    edges: dict[str, list[str]] = {}
    for name, targets in graph:
        edges.setdefault(name, []).extend(targets)

    def reach(start):
        seen, todo, found = {start}, [start], set()
        while todo:
            for target in edges.get(todo.pop(), ()):
                if target in edges:
                    if target not in seen:
                        seen.add(target)
                        todo.append(target)
                elif target in "uvw":
                    found.add(f"{target}@x.org")
        return found

    for name in edges:
        assert set(directory.lookup(f"{name}@x.org").mailboxes) == reach(name), name


def test_split_address():
    assert split_address('"a@b"@Example.COM.') == ("a@b", "example.com", True)
    assert split_address('"a\\"b"@x.org') == ('a"b', "x.org", True)
    assert split_address("Postmaster") == ("Postmaster", "", False)


# --- Maildir directories ----------------------------------------------------------


@pytest.mark.parametrize("mailbox, dirs", [
    ("john@example.com", ("example.com", "john")),
    ("x/y@example.com", ("example.com", "x_y")),
    ("a\0b@example.com", ("example.com", "a_b")),
    ("..@example.com", ("example.com", "_..")),
    (".@..", ("_..", "_.")),
    ("@example.com", ("example.com", "_")),
])
def test_maildir_dirs(mailbox, dirs):
    from mailguard.policy.directory import maildir_dirs

    assert maildir_dirs(mailbox) == dirs


def test_maildir_path_uses_the_one_mapping(tmp_path):
    from mailguard.policy.directory import maildir_dirs
    from mailguard.store.maildir import maildir_path

    for mailbox in ("john@example.com", "x/y@example.com", "..@x", "a\0@b"):
        assert maildir_path(str(tmp_path), mailbox) == str(tmp_path.joinpath("mail", *maildir_dirs(mailbox), "Maildir"))


def test_two_accounts_with_one_maildir_are_an_error():
    """x/y and x_y mapped to the same Maildir: mail for one landed in the
    other's box.  The configuration refuses "/" in a name, but records may
    come from elsewhere (an embedding application, mailguard.testing)."""
    directory, problems = built([domain("example.com")],
                                [user("x_y@example.com", line=11), user("x/y@example.com", line=12),
                                 user("..@example.com", line=13), user("_..@example.com", line=14)])
    assert problems == [
        f"{CFG}:12: user x/y@example.com: its Maildir would be the directory of user x_y@example.com ({CFG}:11)",
        f"{CFG}:14: user _..@example.com: its Maildir would be the directory of user ..@example.com ({CFG}:13)",
    ]
