"""mailguard.policy.checks: the rules that catch a dangerous configuration."""

from __future__ import annotations

import pytest

from mailguard.config.settings import SCALAR_NAMES
from mailguard.policy import build
from mailguard.policy.checks import findings, near_miss, open_relay
from tests.conftest import USERS, write_config
from tests.realshape import kerio_names


def _load(tmp_path, variables=None, body="", **kwargs):
    cfg = write_config(tmp_path / "mailserver.cfg", variables, body, **kwargs)
    config, tables, problems = build.read(str(cfg))
    assert config is not None, problems
    return config, tables, cfg


def _found(tmp_path, variables=None, body="", *, relay_host=None, startup=False, **kwargs):
    config, tables, cfg = _load(tmp_path, variables, body, **kwargs)
    lines = cfg.read_text().splitlines()
    out = []
    for p in findings(config, tables, relay_host=relay_host, startup=startup):
        assert p.where.file == str(cfg)
        out.append((lines[p.where.line - 1].strip() if p.where.line else "", p.severity, p.message))
    return out


# --- misspelt names ---------------------------------------------------------------

@pytest.mark.parametrize("name, meant", [
    ("SmtpGreetingDelai", "SmtpGreetingDelay"),
    ("SmtpMaxConectionsPerIp", "SmtpMaxConnectionsPerIp"),
    ("QueueLifeTime", "QueueLifetime"),
    ("vrfyenabled", "VRFYEnabled"),
    ("SmtpGreetingDleay", "SmtpGreetingDelay"),  # two letters swapped
    ("SmtpGreetingDelays", "SmtpGreetingDelay"),
    ("MaxMesageSize", "MaxMessageSize"),
    ("RelayControlIPGroup", "RelayControlIpGroup"),
])
def test_near_misses(name, meant):
    assert near_miss(name) == meant


def test_real_kerio_names_are_not_near_misses():
    """Hundreds of names a real file holds: not one warning."""
    names = kerio_names() + [
        "BuiltInAdminEnabled", "StoreDir", "RelativePathsRoot", "SmtpServerPort", "SmtpRelayEnabled",
        "Enabled", "Path", "StorePath", "ArchiveDir", "BackupDir", "Description", "Name", "Domain",
        "SmtpGreetingDelayEnabled", "RelayControlAuthPopEnabled", "MaxMessageSizeKb", "VRFYDisabled",
        "ETRNEnabled", "EXPNEnabled", "QueueRetryInterval", "QueueTimeout", "SecurityLogEnabled",
        "GatewayHost", "SmtpGreeting", "SmtpMaxConnectionsFromIp", "RelayControlIpGroupName",
    ]
    names += [f"{prefix}{suffix}" for prefix in ("Smtp", "Pop3", "Imap", "Http", "Ldap", "Nntp")
              for suffix in ("Port", "SecurePort", "Enabled", "BindAddress", "ConnectionLimit",
                             "Timeout", "Banner", "LogEnabled", "MessageLimit", "AuthRequired",
                             "TlsEnabled", "CertificateFile", "KeepAlive", "ProxyEnabled")]
    assert len(set(names)) > 200
    assert not set(names) & SCALAR_NAMES
    assert [n for n in names if near_miss(n)] == []


def test_every_mailguard_name_is_not_a_near_miss():
    assert [n for n in SCALAR_NAMES if near_miss(n)] == []


def test_near_misses_are_warned_where_they_are(tmp_path):
    body = ('<table name="SmtpServer">\n<variable name="SmtpGreetingDelai">25</variable>\n'
            '<variable name="SmtpServerPort">25</variable>\n</table>')
    assert _found(tmp_path, {"QueueLifeTime": "10"}, body) == [
        ('<variable name="QueueLifeTime">10</variable>', "warning",
         'variable "QueueLifeTime" is ignored (names are case-sensitive): did you mean "QueueLifetime"?'),
        ('<variable name="SmtpGreetingDelai">25</variable>', "warning",
         'variable "SmtpGreetingDelai" in section "SmtpServer" is ignored (mailguard does not know it): '
         'did you mean "SmtpGreetingDelay"?'),
    ]


def test_names_inside_records_are_not_checked(tmp_path):
    body = ('<list name="Rule"><listitem><variable name="SmtpGreetingDelai">1</variable>'
            '</listitem></list>')
    assert _found(tmp_path, body=body) == []


# --- open relay -------------------------------------------------------------------

@pytest.mark.parametrize("addresses, extent", [
    (["0.0.0.0/0"], "all of IPv4"),
    (["0.0.0.0-255.255.255.255"], "all of IPv4"),
    (["0.0.0.0/1", "128.0.0.0/1"], "all of IPv4"),
    (["::ffff:0.0.0.0/96"], "all of IPv4"),
    (["::/0"], "all of IPv6"),
    (["0.0.0.0/1"], "2,092,957,696 public IPv4 addresses, more than a /8 (16,777,216)"),
    (["1.0.0.0/8", "2.0.0.0/32"], "16,777,217 public IPv4 addresses, more than a /8 (16,777,216)"),
    (["2000::/3"], "about 2**125 public IPv6 addresses, more than a /16 (2**112)"),
    (["2001::/15"], "about 2**113 public IPv6 addresses, more than a /16 (2**112)"),
])
def test_open_relay_groups(tmp_path, addresses, extent):
    groups = [("Trusted", a) for a in addresses]
    config, tables, _ = _load(tmp_path, groups=groups)
    assert open_relay(config, tables) == extent


@pytest.mark.parametrize("addresses", [
    ["127.0.0.2"],
    ["1.0.0.0/8"],  # a /8 of public addresses: the limit, not over it
    ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "100.64.0.0/10",
     "169.254.0.0/16", "224.0.0.0/3"],  # every private and special range
    ["fc00::/7", "fe80::/10", "::1", "2001:db8::/32", "2001:db8::/33"],
    ["2001::/16"],
])
def test_groups_that_are_not_open_relays(tmp_path, addresses):
    groups = [("Trusted", a) for a in addresses] + [("Other", "0.0.0.0/0")]
    config, tables, _ = _load(tmp_path, groups=groups)
    assert open_relay(config, tables) is None


def test_the_relay_group_only_counts_when_enabled(tmp_path):
    config, tables, _ = _load(tmp_path, {"RelayControlIpGroupEnabled": "0"}, groups=[("Trusted", "0.0.0.0/0")])
    assert open_relay(config, tables) is None


def test_an_included_group_counts(tmp_path):
    groups = [("Trusted", "group:World"), ("World", "0.0.0.0/0")]
    config, tables, _ = _load(tmp_path, groups=groups)
    assert open_relay(config, tables) == "all of IPv4"


def test_open_relay_is_an_error(tmp_path):
    assert _found(tmp_path, groups=[("Trusted", "0.0.0.0/0")]) == [
        ('<variable name="RelayControlIpGroup">Trusted</variable>', "error",
         'the relay IP group "Trusted" covers all of IPv4: this is an open relay (anyone may send mail '
         "anywhere through this server); narrow the group, or set RelayControlOpenRelayIntended to 1 "
         "if that is really meant")]


def test_an_intended_open_relay_is_not(tmp_path):
    assert _found(tmp_path, {"RelayControlOpenRelayIntended": "1"}, groups=[("Trusted", "0.0.0.0/0")]) == []


# --- the smaller rules --------------------------------------------------------------

@pytest.mark.parametrize("delay, warned", [("300", False), ("300.5", True), ("400", True), ("25", False)])
def test_greeting_delay_over_five_minutes(tmp_path, delay, warned):
    found = _found(tmp_path, {"SmtpGreetingDelay": delay})
    expected = [(f'<variable name="SmtpGreetingDelay">{delay}</variable>', "warning",
                 f"SmtpGreetingDelay is {float(delay):g} s, longer than the 5 minutes RFC 5321 (4.5.3.2.1) "
                 "tells a client to wait for the greeting: legitimate servers will give up too")]
    assert found == (expected if warned else [])


NOBODY = '<variable name="VRFYEnabled">1</variable>'


@pytest.mark.parametrize("variables, kwargs, reasons", [
    ({"RelayControlIpGroupEnabled": "0", "RelayControlAuthEnabled": "0"}, {},
     "RelayControlIpGroupEnabled is 0; RelayControlAuthEnabled is 0"),
    ({"RelayControlAuthEnabled": "0"}, {"groups": [("Trusted", "::1"), ("Trusted", "::2")]}, None),
    ({"RelayControlAuthEnabled": "0"},
     {"body": '<list name="IpAddressGroup"><listitem><variable name="Group">Trusted</variable>'
              '<variable name="Address">127.0.0.2</variable><variable name="Enabled">0</variable>'
              "</listitem></list>", "groups": ()},
     'the relay IP group "Trusted" holds no address; RelayControlAuthEnabled is 0'),
    ({"RelayControlIpGroupEnabled": "0"}, {"users": [("nul", "example.com", "NUL:", True)], "aliases": ()},
     "RelayControlIpGroupEnabled is 0; no enabled user has a password mailguard can verify"),
    ({"RelayControlIpGroupEnabled": "0"}, {}, None),  # users can authenticate
    ({"RelayControlIpGroupEnabled": "0", "RelayControlAuthEnabled": "0", "VRFYEnabled": "0"}, {}, None),
])
def test_vrfy_with_nobody_trusted(tmp_path, variables, kwargs, reasons):
    found = _found(tmp_path, variables, **kwargs)
    if reasons is None:
        assert found == []
    else:
        assert found == [(NOBODY, "warning", f"VRFYEnabled is 1 but nobody is trusted ({reasons}): "
                                             "every VRFY is answered 252")]


def test_gateway_without_relay_host(tmp_path):
    gateway = '<variable name="GatewayEnabled">1</variable>'
    assert _found(tmp_path, {"GatewayEnabled": "1"}) == [
        (gateway, "warning", "GatewayEnabled is 1 and GatewayBackend is not set: twistd must be given "
                             "--relay-host, the back-end asked with VRFY and sent the accepted mail")]
    assert _found(tmp_path, {"GatewayEnabled": "1", "GatewayBackend": "127.0.0.1:2626"}) == []
    assert _found(tmp_path, {"GatewayEnabled": "1"}, relay_host="127.0.0.1:2626", startup=True) == []
    for variables in ({"GatewayEnabled": "1"}, {"GatewayEnabled": "1", "GatewayBackend": "127.0.0.1:2626"}):
        assert _found(tmp_path, variables, startup=True) == [
            (gateway, "error", "GatewayEnabled is 1 but there is no --relay-host: accepted mail could not "
                               "be forwarded to the back-end (see docs/gateway.md)")]


def test_gateway_without_domains(tmp_path):
    """Nothing to guard: an error for check and start-up alike (it was a
    traceback at start-up)."""
    def found(*variables):
        cfg = tmp_path / "gateway.cfg"
        cfg.write_text('<?xml version="1.0"?>\n<config>\n' + "".join(
            f'  <variable name="{name}">{value}</variable>\n' for name, value in variables) + "</config>\n")
        config, tables, problems = build.read(str(cfg))
        assert config is not None, problems
        return [(p.where.line, p.severity, p.message)
                for p in findings(config, tables, relay_host="127.0.0.1:2626", startup=True)]

    error = "GatewayEnabled is 1 but no domain is listed: set GatewayDomains (or list the domains in the Domain table)"
    assert found(("GatewayEnabled", "1")) == [(3, "error", error)]
    assert found(("GatewayDomains", "example.com"), ("GatewayEnabled", "1")) == []
    assert found(("GatewayEnabled", "0")) == []


def test_cram_md5_with_hashed_passwords(tmp_path):
    # conftest's USERS: sam has a SHA: password, john and jane plain text.
    cram = '<variable name="SmtpAuthCramMd5Enabled">1</variable>'
    found = _found(tmp_path, {"SmtpAuthCramMd5Enabled": "1"})
    assert len(found) == 1 and found[0][:2] == (cram, "warning")
    assert found[0][2].startswith("SmtpAuthCramMd5Enabled is 1 but 1 enabled user has only a SHA: "
                                  "password hash, which CRAM-MD5 cannot use (first: sam@example.com at ")
    assert _found(tmp_path, {"SmtpAuthCramMd5Enabled": "0"}) == []
    plain_only = [u for u in USERS if not u[2].startswith("SHA:")]
    assert _found(tmp_path, {"SmtpAuthCramMd5Enabled": "1"}, users=plain_only) == []


def test_findings_come_sorted_by_place(tmp_path):
    config, tables, _ = _load(tmp_path, {"SmtpGreetingDelay": "500", "SmtpGreetingDelai": "5"},
                              groups=[("Trusted", "0.0.0.0/0")])
    found = findings(config, tables)
    assert [p.severity for p in found] == ["warning", "error", "warning"]
    assert [p.where for p in found] == sorted(p.where for p in found)
