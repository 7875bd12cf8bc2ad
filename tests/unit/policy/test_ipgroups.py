"""Tests for mailguard.policy.ipgroups: Kerio IP address groups."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mailguard.interfaces import IIPGroups
from mailguard.policy.ipgroups import IPGroups, build, from_mapping
from mailguard.config.problems import ConfigError, Where
from mailguard.config.records import IpGroupRow

CFG = "mailserver.cfg"


def rows_of(*specs):
    """("Group", "Address"[, enabled]) tuples -> rows on lines 10, 11, ..."""
    out = []
    for i, spec in enumerate(specs):
        group, address, *rest = spec
        enabled = rest[0] if rest else True
        out.append(IpGroupRow(group, address, enabled, "", Where(CFG, 10 + i)))
    return out


def built(*specs):
    groups, problems = build(rows_of(*specs))
    return groups, [str(p) for p in problems]


def ok(*specs) -> IPGroups:
    groups, problems = built(*specs)
    assert problems == []
    return groups


# -- the interface -------------------------------------------------------------


def test_verify_object():
    groups = ok(("Trusted", "127.0.0.1"))
    assert verifyObject(IIPGroups, groups)
    assert verifyObject(IIPGroups, IPGroups())


def test_empty():
    groups, problems = build([])
    assert problems == []
    assert groups.names() == frozenset()
    assert not groups.contains("Trusted", "127.0.0.1")


def test_names_is_frozenset_of_all_groups():
    groups, _ = built(("A", "1.2.3.4"), ("B", "1.2.3.5", False), ("C", "bogus"))
    # B (only disabled rows) and C (only invalid rows) exist but are empty.
    assert groups.names() == frozenset({"A", "B", "C"})
    assert not groups.contains("B", "1.2.3.5")


# -- every address form --------------------------------------------------------


def test_single_ipv4():
    g = ok(("T", "192.0.2.7"))
    assert g.contains("T", "192.0.2.7")
    assert not g.contains("T", "192.0.2.6")
    assert not g.contains("T", "192.0.2.8")


def test_single_ipv6():
    g = ok(("T", "2001:db8::1"))
    assert g.contains("T", "2001:db8::1")
    assert g.contains("T", "2001:0db8:0:0::0001")  # any spelling
    assert not g.contains("T", "2001:db8::2")
    assert not g.contains("T", "::1")


@pytest.mark.parametrize("prefix, inside, outside", [
    ("10.0.0.0/8", ["10.0.0.0", "10.255.255.255", "10.1.2.3"], ["9.255.255.255", "11.0.0.0"]),
    ("192.0.2.0/24", ["192.0.2.0", "192.0.2.255"], ["192.0.1.255", "192.0.3.0"]),
    ("192.0.2.9/32", ["192.0.2.9"], ["192.0.2.8", "192.0.2.10"]),
    ("0.0.0.0/0", ["0.0.0.0", "255.255.255.255"], ["::1"]),
    ("10.0.0.0/255.0.0.0", ["10.9.9.9"], ["11.0.0.0"]),  # Kerio's netmask form
    ("2001:db8::/32", ["2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"],
     ["2001:db9::", "2001:db7:ffff::", "10.0.0.1"]),
    ("::/0", ["::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"], ["1.2.3.4"]),
    ("[2001:db8::]/48", ["2001:db8:0:1::"], ["2001:db8:1::"]),  # Postfix brackets
    ("10.0.0.0 / 8", ["10.0.0.1"], ["11.0.0.1"]),
])
def test_prefix(prefix, inside, outside):
    g = ok(("T", prefix))
    for a in inside:
        assert g.contains("T", a), a
    for a in outside:
        assert not g.contains("T", a), a


@pytest.mark.parametrize("spec", [
    "10.0.0.5-10.0.0.9", "10.0.0.5 - 10.0.0.9", " 10.0.0.5 -10.0.0.9 ", "10.0.0.5- 10.0.0.9",
])
def test_ipv4_range_inclusive_spaces_allowed(spec):
    g = ok(("T", spec))
    assert [g.contains("T", f"10.0.0.{i}") for i in range(4, 11)] == [
        False, True, True, True, True, True, False]


def test_range_of_one_address():
    g = ok(("T", "10.0.0.5-10.0.0.5"))
    assert g.contains("T", "10.0.0.5")
    assert not g.contains("T", "10.0.0.6")


def test_range_across_octets():
    g = ok(("T", "10.0.0.250-10.0.1.3"))
    assert g.contains("T", "10.0.0.255")
    assert g.contains("T", "10.0.1.0")
    assert not g.contains("T", "10.0.1.4")


def test_ipv6_range():
    g = ok(("T", "2001:db8::10 - 2001:db8::1:0"))
    assert g.contains("T", "2001:db8::10")
    assert g.contains("T", "2001:db8::ffff")
    assert g.contains("T", "2001:db8::1:0")
    assert not g.contains("T", "2001:db8::f")
    assert not g.contains("T", "2001:db8::1:1")


def test_mixed_forms_and_families_in_one_group():
    g = ok(("T", "127.0.0.1"), ("T", "::1"), ("T", "10.0.0.0/8"),
           ("T", "2001:db8::/32"), ("T", "192.0.2.1-192.0.2.5"))
    for a in ["127.0.0.1", "::1", "10.2.3.4", "2001:db8::5", "192.0.2.3"]:
        assert g.contains("T", a), a
    for a in ["127.0.0.2", "::2", "11.0.0.0", "2001:db9::", "192.0.2.6"]:
        assert not g.contains("T", a), a


def test_overlapping_and_adjacent_entries_merge():
    g = ok(("T", "10.0.0.0-10.0.0.9"), ("T", "10.0.0.10-10.0.0.19"),
           ("T", "10.0.0.5/32"), ("T", "10.0.0.0/28"), ("T", "10.0.0.30"))
    assert g.interval_count("T") == 2
    assert all(g.contains("T", f"10.0.0.{i}") for i in range(20))
    assert not g.contains("T", "10.0.0.20")
    assert g.contains("T", "10.0.0.30")


def test_address_objects_accepted():
    g = ok(("T", "10.0.0.0/8"), ("T", "2001:db8::/32"))
    assert g.contains("T", ipaddress.IPv4Address("10.1.1.1"))
    assert g.contains("T", ipaddress.IPv6Address("2001:db8::1"))
    assert not g.contains("T", ipaddress.IPv4Address("11.1.1.1"))


def test_lookup_address_whitespace_tolerated():
    g = ok(("T", "10.0.0.0/8"))
    assert g.contains("T", " 10.0.0.1 ")


@pytest.mark.parametrize("bad", ["", "banana", "10.0.0.300", "10.0.0", "010.0.0.1",
                                  "10.0.0.0/8", "::g", "1.2.3.4:25", "\u0661.2.3.4"])
def test_unparsable_lookup_is_false(bad):
    g = ok(("T", "0.0.0.0/0"), ("T", "::/0"))
    assert g.contains("T", bad) is False


def test_wrong_lookup_type_raises():
    g = ok(("T", "10.0.0.0/8"))
    with pytest.raises(TypeError):
        g.contains("T", 167772161)


def test_unknown_group_contains_nothing():
    g = ok(("T", "0.0.0.0/0"))
    assert g.contains("Other", "1.2.3.4") is False
    assert g.contains("t", "1.2.3.4") is False  # names are exact


# -- IPv4-mapped IPv6 ----------------------------------------------------------


def test_v4_mapped_lookup_matches_ipv4_entries():
    """Twisted reports ::ffff:a.b.c.d on dual-stack sockets."""
    g = ok(("T", "192.0.2.0/24"), ("T", "10.0.0.1"), ("T", "172.16.0.1-172.16.0.3"))
    for a in ["::ffff:192.0.2.77", "::FFFF:10.0.0.1", "::ffff:172.16.0.2", "::ffff:c000:0201"]:
        assert g.contains("T", a), a
        assert g.contains("T", ipaddress.IPv6Address(a)), a
    assert not g.contains("T", "::ffff:192.0.3.1")
    assert not g.contains("T", "::ffff:10.0.0.2")


def test_v4_mapped_entries_match_ipv4_lookups():
    g = ok(("T", "::ffff:10.0.0.0/104"), ("T", "::ffff:192.0.2.1"),
           ("T", "::ffff:172.16.0.1-::ffff:172.16.0.3"))
    for a in ["10.1.2.3", "::ffff:10.1.2.3", "192.0.2.1", "172.16.0.3"]:
        assert g.contains("T", a), a
    assert not g.contains("T", "11.0.0.0")
    assert not g.contains("T", "172.16.0.4")


def test_broad_ipv6_entry_does_not_cover_ipv4():
    """"All of IPv6" in a relay group must not silently open relaying to all
    of IPv4, even to clients that arrive as ::ffff:a.b.c.d."""
    g = ok(("T", "::/0"), ("T", "::/64"))
    assert g.contains("T", "2001:db8::1")
    assert not g.contains("T", "1.2.3.4")
    assert not g.contains("T", "::ffff:1.2.3.4")


# -- disabled rows ---------------------------------------------------------------


def test_disabled_rows_contribute_nothing():
    g = ok(("T", "10.0.0.1"), ("T", "10.0.0.2", False), ("T", "10.1.0.0/16", False),
           ("T", "10.2.0.0-10.2.0.9", False))
    assert g.contains("T", "10.0.0.1")
    for a in ["10.0.0.2", "10.1.0.1", "10.2.0.5"]:
        assert not g.contains("T", a)
    assert g.row_count("T") == 1


def test_disabled_include_is_ignored_even_if_unknown():
    g = ok(("A", "10.0.0.1"), ("A", "group:B", False), ("B", "10.0.0.2"),
           ("A", "group:Deleted", False))
    assert not g.contains("A", "10.0.0.2")
    assert "includes" not in g.describe("A")


def test_disabled_include_cannot_make_a_cycle():
    g = ok(("A", "group:B"), ("B", "group:A", False), ("B", "10.0.0.2"))
    assert g.contains("A", "10.0.0.2")


def test_disabled_malformed_row_is_a_warning():
    groups, problems = build(rows_of(("T", "10.0.0.1"), ("T", "10.0.0.300", False)))
    assert [str(p) for p in problems] == [
        f'{CFG}:11: warning: IpAddressGroup "T": "10.0.0.300" is not an IP address, '
        'CIDR prefix or range (row is disabled)']
    assert problems[0].severity == "warning"
    assert groups.contains("T", "10.0.0.1")


# -- nesting -------------------------------------------------------------------------


def test_include():
    g = ok(("Trusted", "127.0.0.1"), ("Trusted", "group:LAN"), ("LAN", "192.168.0.0/16"))
    assert g.contains("Trusted", "192.168.3.4")
    assert g.contains("Trusted", "127.0.0.1")
    assert not g.contains("LAN", "127.0.0.1")


def test_include_case_insensitive_keyword_and_spaces():
    g = ok(("A", "Group: B"), ("A", "GROUP:C"), ("B", "10.0.0.1"), ("C", "10.0.0.2"))
    assert g.contains("A", "10.0.0.1") and g.contains("A", "10.0.0.2")


def test_multi_level_nesting_in_any_order():
    g = ok(("A", "group:B"), ("B", "group:C"), ("C", "group:D"),
           ("D", "2001:db8::/32"), ("C", "10.3.0.0/16"), ("B", "10.2.0.0/16"),
           ("A", "10.1.0.0/16"))
    for a in ["10.1.0.1", "10.2.0.1", "10.3.0.1", "2001:db8::1"]:
        assert g.contains("A", a), a
    assert not g.contains("B", "10.1.0.1")
    assert g.contains("C", "2001:db8::9") and not g.contains("C", "10.2.0.1")
    assert g.describe("A") == "A: 2 entries, includes B"


def test_diamond_is_not_a_cycle():
    g = ok(("A", "group:B"), ("A", "group:C"), ("B", "group:D"), ("C", "group:D"),
           ("D", "10.0.0.1"))
    assert g.contains("A", "10.0.0.1")


def test_include_of_empty_group():
    g = ok(("A", "10.0.0.1"), ("A", "group:B"), ("B", "10.0.0.2", False))
    assert g.contains("A", "10.0.0.1")
    assert not g.contains("A", "10.0.0.2")


def test_deep_nesting_chain_does_not_recurse():
    n = 5000
    specs = [(f"G{i}", f"group:G{i + 1}") for i in range(n)] + [(f"G{n}", "10.0.0.1")]
    g = ok(*specs)
    assert g.contains("G0", "10.0.0.1")


# -- cycles --------------------------------------------------------------------


def test_self_include():
    groups, problems = built(("A", "10.0.0.1"), ("A", "group:A"))
    assert problems == [f'{CFG}:11: IpAddressGroup "A": "group:A" includes the group itself (A -> A)']
    assert groups.contains("A", "10.0.0.1")  # the rest of the group works


def test_two_group_cycle():
    groups, problems = built(("A", "group:B"), ("B", "group:A"), ("A", "10.0.0.1"),
                             ("B", "10.0.0.2"))
    assert problems == [f'{CFG}:11: IpAddressGroup "B": "group:A" makes a cycle: A -> B -> A']
    assert groups.contains("A", "10.0.0.1") and groups.contains("A", "10.0.0.2")
    assert groups.contains("B", "10.0.0.2")


def test_three_group_cycle_reported_once_with_path():
    groups, problems = built(("A", "group:B"), ("B", "group:C"), ("C", "group:A"),
                             ("C", "10.0.0.3"), ("X", "group:B"))
    assert problems == [
        f'{CFG}:12: IpAddressGroup "C": "group:A" makes a cycle: A -> B -> C -> A']
    assert groups.contains("A", "10.0.0.3")
    assert groups.contains("X", "10.0.0.3")


def test_cycle_problems_are_errors():
    _, problems = build(rows_of(("A", "group:A")))
    assert [p.severity for p in problems] == ["error"]
    assert problems[0].where == Where(CFG, 10)


# -- bad values ------------------------------------------------------------------


BAD = 'is not an IP address, CIDR prefix or range'


@pytest.mark.parametrize("value, message", [
    ("10.0.0.300", f'"10.0.0.300" {BAD}'),
    ("banana", f'"banana" {BAD}'),
    ("10.0.0", f'"10.0.0" {BAD}'),
    ("010.0.0.1", f'"010.0.0.1" {BAD}'),
    ("10.0.0.0/33", f'"10.0.0.0/33" {BAD}'),
    ("10.0.0.0/", f'"10.0.0.0/" {BAD}'),
    ("10.0.0.0/8/8", f'"10.0.0.0/8/8" {BAD}'),
    ("10.0.0.0/x", f'"10.0.0.0/x" {BAD}'),
    ("2001:db8::/129", f'"2001:db8::/129" {BAD}'),
    ("2001:db8:::1", f'"2001:db8:::1" {BAD}'),
    ("1.2.3.4-5.6.7.8-9.9.9.9", f'"1.2.3.4-5.6.7.8-9.9.9.9" {BAD}'),
    ("1.2.3.4-", 'range "1.2.3.4-": "" is not an IP address'),
    ("1.2.3.4-1.2.3.400", 'range "1.2.3.4-1.2.3.400": "1.2.3.400" is not an IP address'),
    ("10.0.0.0/8-10.0.0.9", 'range "10.0.0.0/8-10.0.0.9": "10.0.0.0/8" is not an IP address'),
    ("10.0.0.9-10.0.0.1", 'range "10.0.0.9-10.0.0.1" is reversed: 10.0.0.9 is after 10.0.0.1'),
    ("2001:db8::9 - 2001:db8::1",
     'range "2001:db8::9 - 2001:db8::1" is reversed: 2001:db8::9 is after 2001:db8::1'),
    ("10.0.0.1-2001:db8::1", 'range "10.0.0.1-2001:db8::1" mixes IPv4 and IPv6'),
    ("group:", '"group:" names no group'),
    ("   ", "empty Address"),
    ('evil"\n', f'"evil\\"" {BAD}'),  # escaped, one line
])
def test_bad_value_messages(value, message):
    groups, problems = build(rows_of(("Trusted", "127.0.0.1"), ("Trusted", value)))
    assert [str(p) for p in problems] == [f'{CFG}:11: IpAddressGroup "Trusted": {message}']
    assert problems[0].is_error
    assert groups.contains("Trusted", "127.0.0.1")  # bad row skipped, rest works
    assert groups.row_count("Trusted") == 1
    assert groups.describe("Trusted") == "Trusted: 1 entry; 1 invalid"


def test_host_bits_set_is_a_warning_and_uses_the_network():
    groups, problems = build(rows_of(("T", "10.0.0.1/8"), ("T", "2001:db8::1/32")))
    assert [str(p) for p in problems] == [
        f'{CFG}:10: warning: IpAddressGroup "T": "10.0.0.1/8" has host bits set; using 10.0.0.0/8',
        f'{CFG}:11: warning: IpAddressGroup "T": "2001:db8::1/32" has host bits set; '
        'using 2001:db8::/32',
    ]
    assert all(p.severity == "warning" and not p.is_error for p in problems)
    assert groups.contains("T", "10.200.0.0")
    assert groups.contains("T", "2001:db8:ffff::")
    assert groups.row_count("T") == 2


def test_host_bits_set_netmask_form():
    groups, problems = build(rows_of(("T", "10.0.0.1/255.0.0.0")))
    assert [p.message for p in problems] == [
        'IpAddressGroup "T": "10.0.0.1/255.0.0.0" has host bits set; using 10.0.0.0/8']


def test_unknown_group_include():
    groups, problems = built(("A", "10.0.0.1"), ("A", "group:Nope"))
    assert problems == [
        f'{CFG}:11: IpAddressGroup "A": "group:Nope": no IP address group is named "Nope"']
    assert groups.contains("A", "10.0.0.1")


def test_unknown_group_include_suggests_other_case():
    _, problems = built(("A", "group:lan"), ("LAN", "10.0.0.1"))
    assert problems == [
        f'{CFG}:10: IpAddressGroup "A": "group:lan": no IP address group is named "lan" '
        '(did you mean "group:LAN"?)']


def test_row_without_group_name():
    groups, problems = built(("", "10.0.0.1"), ("T", "10.0.0.2"))
    assert problems == [f'{CFG}:10: IpAddressGroup "": row for "10.0.0.1" has no group name']
    assert groups.names() == frozenset({"T"})


def test_all_problems_reported_sorted_by_line():
    _, problems = build(rows_of(
        ("A", "group:B"), ("A", "bad1"), ("B", "group:A"), ("B", "bad2"),
        ("C", "group:Missing"), ("C", "10.0.0.1/8")))
    assert [(p.where.line, p.severity) for p in problems] == [
        (11, "error"), (12, "error"), (13, "error"), (14, "error"), (15, "warning")]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C", ""]),
                          st.one_of(st.text(max_size=30),
                                    st.sampled_from(["group:A", "group:B", "group:C", "group:Z",
                                                     "10.0.0.1/8", "1.2.3.4 - 1.2.3.1"])),
                          st.booleans()),
                max_size=12))
def test_build_never_raises(specs):
    groups, problems = build(rows_of(*specs))
    for p in problems:
        assert str(p).startswith(f"{CFG}:")
        assert "\n" not in p.message
    for name in groups.names():
        groups.contains(name, "10.0.0.1")
        groups.describe(name)


# -- summaries -----------------------------------------------------------------


def test_row_count_and_describe():
    g, _ = built(("Trusted", "127.0.0.1"), ("Trusted", "::1"), ("Trusted", "group:LAN"),
                 ("Trusted", "10.9.9.9", False), ("Trusted", "oops"), ("LAN", "10.0.0.0/8"))
    assert g.row_count("Trusted") == 3
    assert g.row_count("LAN") == 1
    assert g.row_count("Nope") == 0
    assert g.describe("Trusted") == "Trusted: 3 entries, includes LAN; 1 disabled, 1 invalid"
    assert g.describe("LAN") == "LAN: 1 entry"
    assert g.describe("Nope") == "Nope: no such group"


def test_from_mapping():
    g = from_mapping({"Trusted": ["127.0.0.1", "group:LAN"], "LAN": ["10.0.0.0/8"]})
    assert g.contains("Trusted", "10.1.1.1")
    with pytest.raises(ConfigError) as e:
        from_mapping({"T": ["nope", "group:X"]})
    assert len(e.value.problems) == 2


def test_from_mapping_allows_warnings():
    g = from_mapping({"T": ["10.0.0.1/8"]})
    assert g.contains("T", "10.5.5.5")


# -- property test: ipaddress is the oracle ------------------------------------

V6_SMALL = int(ipaddress.IPv6Address("2001:db8::"))
MAPPED = int(ipaddress.IPv6Address("::ffff:0:0"))
MAPPED_NET = ipaddress.ip_network("::ffff:0:0/96")

# Integers drawn from small windows as well as the whole space, so entries
# overlap, touch and contain the probes often enough to matter.
v4_ints = st.one_of(st.integers(0, 2**32 - 1),
                    st.integers(0x0A000000, 0x0A000000 + 600),
                    st.sampled_from([0, 2**32 - 1]))
v6_ints = st.one_of(st.integers(0, 2**128 - 1),
                    st.integers(V6_SMALL, V6_SMALL + 600),
                    st.sampled_from([0, 2**128 - 1]))
mapped_ints = st.integers(0x0A000000, 0x0A000000 + 600).map(lambda n: MAPPED + n)


@st.composite
def entries(draw):
    """(address text, enabled) in every form the config allows."""
    family = draw(st.sampled_from(["v4", "v6", "mapped"]))
    ints = {"v4": v4_ints, "v6": v6_ints, "mapped": mapped_ints}[family]
    make = ipaddress.IPv4Address if family == "v4" else ipaddress.IPv6Address
    bits = 32 if family == "v4" else 128
    form = draw(st.sampled_from(["address", "prefix", "range"]))
    a = draw(ints)
    if form == "address":
        text = str(make(a))
    elif form == "prefix":
        low = 96 if family == "mapped" else 0
        plen = draw(st.one_of(st.integers(low, bits), st.integers(max(low, bits - 10), bits)))
        text = f"{make(a)}/{plen}"  # host bits may be set: a warning, not an error
    else:
        b = draw(ints)
        lo, hi = sorted((a, b))
        sep = draw(st.sampled_from(["-", " - ", "- ", " -"]))
        text = f"{make(lo)}{sep}{make(hi)}"
    return text, draw(st.booleans())


def oracle_contains(entry: str, probe) -> bool:
    """Independent of mailguard: ipaddress objects and the documented
    IPv4-mapped rule (probe folded; entries wholly inside ::ffff:0:0/96
    folded)."""
    if isinstance(probe, ipaddress.IPv6Address) and probe.ipv4_mapped:
        probe = probe.ipv4_mapped
    if "-" in entry:
        lo, hi = (ipaddress.ip_address(x.strip()) for x in entry.split("-"))
        if lo.version == 6 and lo.ipv4_mapped and hi.ipv4_mapped:
            lo, hi = lo.ipv4_mapped, hi.ipv4_mapped
        return lo.version == probe.version and lo <= probe <= hi
    net = ipaddress.ip_network(entry, strict=False)
    if net.version == 6 and net.subnet_of(MAPPED_NET):
        net = ipaddress.IPv4Network((int(net.network_address) - MAPPED, net.prefixlen - 96))
    return net.version == probe.version and probe in net


def boundary_probes(entry: str):
    """Addresses just inside and just outside an entry."""
    if "-" in entry:
        lo, hi = (ipaddress.ip_address(x.strip()) for x in entry.split("-"))
    else:
        net = ipaddress.ip_network(entry, strict=False)
        lo, hi = net.network_address, net.broadcast_address
    out = [lo, hi]
    top = 2**32 - 1 if lo.version == 4 else 2**128 - 1
    if int(lo) > 0:
        out.append(type(lo)(int(lo) - 1))
    if int(hi) < top:
        out.append(type(hi)(int(hi) + 1))
    return out


probes = st.one_of(v4_ints.map(ipaddress.IPv4Address), v6_ints.map(ipaddress.IPv6Address),
                   mapped_ints.map(ipaddress.IPv6Address))


@settings(max_examples=400, deadline=None)
@given(st.lists(entries(), max_size=25), st.lists(probes, max_size=25))
def test_membership_matches_ipaddress_oracle(group, random_probes):
    groups, problems = build(rows_of(*[("G", text, enabled) for text, enabled in group]))
    assert all(not p.is_error for p in problems), problems
    enabled = [text for text, on in group if on]
    candidates = list(random_probes)
    for text, _ in group:
        candidates += boundary_probes(text)
    for probe in candidates:
        expected = any(oracle_contains(e, probe) for e in enabled)
        assert groups.contains("G", probe) is expected, (probe, enabled)
        assert groups.contains("G", str(probe)) is expected, (probe, enabled)


@settings(max_examples=100, deadline=None)
@given(st.lists(entries(), max_size=10), st.lists(entries(), max_size=10),
       st.lists(probes, min_size=1, max_size=20))
def test_nested_group_is_the_union(outer, inner, random_probes):
    rows = [("Outer", t, on) for t, on in outer] + [("Outer", "group:Inner")]
    rows += [("Inner", t, on) for t, on in inner] + [("Inner", "::1", False)]  # exists
    groups, problems = build(rows_of(*rows))
    assert all(not p.is_error for p in problems)
    inner_groups, _ = build(rows_of(*[("I", t, on) for t, on in inner], ("I", "::1", False)))
    outer_groups, _ = build(rows_of(*[("O", t, on) for t, on in outer], ("O", "::1", False)))
    for probe in random_probes:
        assert groups.contains("Outer", probe) == (
            outer_groups.contains("O", probe) or inner_groups.contains("I", probe))
