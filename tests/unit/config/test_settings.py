"""The Kerio XML reader and the typed configuration."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mailguard.config import settings as C
from mailguard.config import kerioxml
from mailguard.policy import build
from mailguard.config.problems import ConfigError
from tests.conftest import EXAMPLE, write_config


def _realistic_kerio(path, n_noise: int = 400, seed: int = 7) -> None:
    """A mailserver.cfg the size and shape of a real one: hundreds of
    variables, tables and lists mailguard does not use, around the ones it
    does, in both the table/tablerow and list/listitem forms."""
    rnd = random.Random(seed)
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<config>"]
    def noise():
        kind = rnd.choice(["var", "table", "list", "textlist"])
        i = rnd.randrange(10**6)
        if kind == "var":
            value = rnd.choice(["0", "1", "x&amp;y", "", "C:/Kerio"])
            out.append(f'  <variable name="Unused{i}">{value}</variable>')
        elif kind == "table":
            out.append(f'  <table name="UnusedTable{i}">')
            for r in range(rnd.randrange(1, 4)):
                out.append(f'    <tablerow><variable name="Col">v{r}</variable><variable name="Other">1</variable></tablerow>')
            out.append("  </table>")
        elif kind == "list":
            out.append(f'  <list name="UnusedList{i}"><listitem><variable name="A">1</variable>'
                       f'<list name="Nested"><listitem>deep</listitem></list></listitem></list>')
        else:
            out.append(f'  <list name="UnusedText{i}"><listitem>one</listitem><listitem>two</listitem></list>')
    for _ in range(n_noise // 2):
        noise()
    out.append('  <variable name="InternetHostname">mx.big.example</variable>')
    out.append('  <variable name="VRFYEnabled">1</variable>')
    out.append('  <variable name="SmtpGreetingDelay">25</variable>')
    out.append('  <variable name="SmtpGreetingDelayExceptions">Local</variable>')
    out.append('  <variable name="RelayControlIpGroupEnabled">1</variable>')
    out.append('  <variable name="RelayControlIpGroup">Relays</variable>')
    out.append('  <table name="Domain">')
    for d in ("big.example", "other.example"):
        out.append(f'    <tablerow><variable name="Name">{d}</variable><variable name="Aliases"></variable>'
                   f'<variable name="Description">x</variable><variable name="Unknown">9</variable></tablerow>')
    out.append("  </table>")
    for _ in range(n_noise // 2):
        noise()
    out.append('  <list name="IpAddressGroup">')
    out.append('    <listitem><variable name="Group">Local</variable><variable name="Address">10.0.0.0/8</variable>'
               '<variable name="Enabled">1</variable><variable name="Description">lan</variable></listitem>')
    out.append('    <listitem><variable name="Group">Relays</variable><variable name="Address">192.0.2.1-192.0.2.9</variable>'
               '<variable name="Enabled">1</variable></listitem>')
    out.append("  </list>")
    out.append('  <list name="User">')
    for i in range(200):
        out.append(f'    <listitem><variable name="Name">user{i}</variable><variable name="Domain">big.example</variable>'
                   f'<variable name="Password">pw{i}</variable><variable name="Enabled">1</variable>'
                   f'<variable name="Quota">100</variable></listitem>')
    out.append("  </list>")
    out.append("</config>")
    path.write_text("\n".join(out))


def test_realistic_large_file(tmp_path):
    path = tmp_path / "mailserver.cfg"
    _realistic_kerio(path)
    config, tables = build.load(str(path))
    assert config.hostname == "mx.big.example"
    assert config.vrfy_enabled is True
    assert config.greeting_delay == 25
    assert [d.name for d in config.domains] == ["big.example", "other.example"]
    assert len(config.users) == 200
    assert tables.ip_groups.contains("Local", "10.1.2.3")
    assert tables.ip_groups.contains("Relays", "192.0.2.5")
    assert not tables.ip_groups.contains("Relays", "192.0.2.10")
    assert len(tables.directory) == 200
    # Unused names are kept, not lost.
    doc = config.document
    assert sum(1 for n in doc.variables if n.startswith("Unused")) > 50


def test_defaults_match_spec(tmp_path):
    path = tmp_path / "m.cfg"
    path.write_text("<config></config>")
    c = C.load(str(path))
    assert (c.vrfy_enabled, c.max_message_size, c.greeting_delay, c.greeting_delay_exceptions,
            c.greeting_delay_log, c.relay_ip_group_enabled, c.relay_ip_group, c.relay_auth_enabled) == \
        (False, 20971520, 0.0, "", True, False, "", True)
    assert c.hostname  # the machine's FQDN


def test_example_loads_with_every_kerio_name():
    c, tables = build.load(str(EXAMPLE))
    assert c.hostname == "mail.example.com"
    assert tables.directory.lookup("sales@example.net").status.name == "KNOWN"
    assert tables.ip_groups.contains("No greeting delay", "127.0.0.2")  # via group:


def test_embedded_default_equals_example():
    assert C.load(None).hostname == C.load(str(EXAMPLE)).hostname


def test_configuration_is_immutable():
    c = C.load(str(EXAMPLE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hostname = "x"  # type: ignore[misc]


def test_table_and_list_forms_read_the_same(tmp_path):
    a = tmp_path / "a.cfg"
    a.write_text('<config><table name="Domain"><tablerow><variable name="Name">x.test</variable></tablerow></table></config>')
    b = tmp_path / "b.cfg"
    b.write_text('<config><list name="Domain"><listitem><variable name="Domain">x.test</variable></listitem></list></config>')
    assert [d.name for d in C.load(str(a)).domains] == [d.name for d in C.load(str(b)).domains] == ["x.test"]


def test_users_cfg_beside_config_is_read(tmp_path):
    cfg = tmp_path / "mailserver.cfg"
    cfg.write_text('<config><list name="Domain"><listitem><variable name="Domain">x.test</variable></listitem></list></config>')
    (tmp_path / "users.cfg").write_text(
        '<config><list name="User"><listitem><variable name="Name">bob</variable>'
        '<variable name="Domain">x.test</variable></listitem></list></config>')
    c = C.load(str(cfg))
    assert [u.address for u in c.users] == ["bob@x.test"]


def _problems(tmp_path, text: str, name="mailserver.cfg"):
    path = tmp_path / name
    path.write_text(text)
    config, _tables, problems = build.read(str(path))
    return config, [str(p) for p in problems], str(path)


@pytest.mark.parametrize("var, value, fragment", [
    ("VRFYEnabled", "yes", 'variable "VRFYEnabled": expected 0 or 1'),
    ("MaxMessageSize", "20MB", 'variable "MaxMessageSize": expected a non-negative decimal number'),
    ("SmtpGreetingDelay", "-5", 'variable "SmtpGreetingDelay": expected a number of seconds'),
    ("InternetHostname", "bad host", 'variable "InternetHostname": not a valid host name'),
    ("RelayControlAuthEnabled", "2", 'variable "RelayControlAuthEnabled": expected 0 or 1'),
])
def test_bad_values_name_file_line_and_variable(tmp_path, var, value, fragment):
    text = f'<config>\n<variable name="Unused">x</variable>\n<variable name="{var}">{value}</variable>\n</config>'
    config, problems, path = _problems(tmp_path, text)
    assert config is None
    assert problems == [f"{path}:3: {fragment}" + problems[0].split(fragment, 1)[1]]


def test_malformed_xml(tmp_path):
    config, problems, path = _problems(tmp_path, "<config>\n<variable name='a'>1</variable>\n<oops>\n</config>")
    assert config is None
    assert problems[0].startswith(f"{path}:4: malformed XML: mismatched tag")


def test_billion_laughs_refused(tmp_path):
    text = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [\n<!ENTITY lol "lol">\n'
            '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">\n]>\n<config>&lol2;</config>')
    config, problems, path = _problems(tmp_path, text)
    assert config is None
    assert problems == [f"{path}:2: DOCTYPE declarations are not allowed in a configuration file"]


def test_external_entity_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET")
    text = (f'<?xml version="1.0"?>\n<!DOCTYPE config [<!ENTITY x SYSTEM "file://{secret}">]>\n'
            '<config><variable name="InternetHostname">&x;</variable></config>')
    config, problems, _ = _problems(tmp_path, text)
    assert config is None
    assert "not allowed" in problems[0]


def test_undeclared_entity_is_malformed(tmp_path):
    config, problems, path = _problems(tmp_path, '<config>\n<variable name="InternetHostname">&x;</variable></config>')
    assert config is None
    assert problems[0].startswith(f"{path}:2: malformed XML: undefined entity")


def test_unknown_ip_group(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpGreetingDelayExceptions": "Nope", "SmtpGreetingDelay": "5"})
    config, problems = C.read(str(cfg))
    assert config is None
    assert any('variable "SmtpGreetingDelayExceptions": IP group "Nope" does not exist' in str(p) for p in problems)
    assert all(str(p).startswith(f"{cfg}:") for p in problems)


def test_relay_group_missing(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"RelayControlIpGroup": "Missing"})
    config, problems = C.read(str(cfg))
    assert config is None
    assert any('IP group "Missing" does not exist' in str(p) for p in problems)


def test_group_including_itself(tmp_path):
    body = ('<list name="IpAddressGroup"><listitem><variable name="Group">Loop</variable>'
            '<variable name="Address">group:Loop</variable></listitem></list>')
    cfg = write_config(tmp_path / "mailserver.cfg", body=body)
    config, _tables, problems = build.read(str(cfg))
    assert config is None
    assert any("Loop" in str(p) and str(p).startswith(f"{cfg}:") for p in problems)


def test_duplicate_user(tmp_path):
    body = ('<list name="User"><listitem><variable name="Name">JOHN</variable>'
            '<variable name="Domain">example.com</variable></listitem></list>')
    cfg = write_config(tmp_path / "mailserver.cfg", body=body)
    config, _tables, problems = build.read(str(cfg))
    assert config is None
    msgs = [str(p) for p in problems if p.is_error]
    assert any("john" in m.lower() and m.startswith(f"{cfg}:") for m in msgs), msgs


def test_every_problem_is_reported_at_once(tmp_path):
    text = ('<config>\n<variable name="VRFYEnabled">x</variable>\n'
            '<variable name="MaxMessageSize">y</variable>\n</config>')
    config, problems, path = _problems(tmp_path, text)
    assert [p.split(":")[1] for p in problems] == ["2", "3"]


def test_load_raises_config_error(tmp_path):
    path = tmp_path / "m.cfg"
    path.write_text('<config><variable name="VRFYEnabled">x</variable></config>')
    with pytest.raises(ConfigError) as e:
        C.load(str(path))
    assert "VRFYEnabled" in str(e.value)


def test_missing_file(tmp_path):
    config, problems = C.read(str(tmp_path / "absent.cfg"))
    assert config is None
    assert str(problems[0]).startswith(f"{tmp_path / 'absent.cfg'}:0: cannot read")


def test_wrong_root(tmp_path):
    config, problems, path = _problems(tmp_path, "<settings></settings>")
    assert config is None
    assert problems == [f"{path}:1: root element is <settings>, expected <config>"]


def test_duplicate_variable_is_a_warning(tmp_path):
    text = '<config>\n<variable name="VRFYEnabled">0</variable>\n<variable name="VRFYEnabled">1</variable>\n</config>'
    config, problems, path = _problems(tmp_path, text)
    assert config is not None and config.vrfy_enabled is True
    assert problems == [f'{path}:3: warning: variable "VRFYEnabled" is set twice (first at line 2); the last value is used']


def test_every_scalar_has_a_field():
    assert {s.attr for s in C.SCALARS} <= C.field_names()


def test_reader_keeps_line_numbers(tmp_path):
    doc = kerioxml.parse_bytes(b'<config>\n\n<table name="T">\n<tablerow>\n<variable name="A">1</variable>'
                               b'</tablerow></table></config>', "f.cfg")
    row = doc.collections["T"].rows[0]
    assert (row.where.line, row.variables["A"].where.line) == (4, 5)


def _users_file(tmp_path, domains: list[str], rows: str):
    doms = "".join(f'<listitem><variable name="Domain">{d}</variable></listitem>' for d in domains)
    return _problems(tmp_path, f'<config>\n<list name="Domain">{doms}</list>\n{rows}\n</config>')


def test_user_without_domain_belongs_to_the_only_domain(tmp_path):
    config, problems, _ = _users_file(tmp_path, ["x.test"], '<list name="User"><listitem>'
                                      '<variable name="Name">Bob</variable></listitem></list>')
    assert [u.address for u in config.users] == ["Bob@x.test"]


def test_user_without_domain_among_several_is_an_error(tmp_path):
    config, problems, path = _users_file(tmp_path, ["x.test", "y.test"], '<list name="User">\n<listitem>'
                                         '<variable name="Name">bob</variable></listitem></list>')
    assert config is None
    assert problems == [f'{path}:4: User "bob": no "Domain" and no single local domain to assume']


def test_user_and_alias_rows_without_name_or_target(tmp_path):
    config, problems, path = _users_file(
        tmp_path, ["x.test"],
        '<list name="User">\n<listitem><variable name="Domain">x.test</variable></listitem></list>\n'
        '<list name="Alias">\n<listitem><variable name="Name">sales</variable></listitem></list>')
    assert config is None
    assert problems == [f'{path}:4: User: row without "Name"', f'{path}:6: Alias "sales": no "DeliverTo"']


def test_name_may_hold_the_whole_address(tmp_path):
    config, _, _ = _users_file(tmp_path, ["x.test", "y.test"], '<list name="User"><listitem>'
                               '<variable name="Name">amy@Y.test</variable></listitem></list>')
    assert [u.address for u in config.users] == ["amy@y.test"]


def test_every_setting_and_range_is_documented():
    """Each name of SCALARS is in the documentation, on a line that gives
    its range when it is a number."""
    from tests.conftest import ROOT

    docs = "\n".join(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))
    for scalar in C.SCALARS:
        lines = [line for line in docs.splitlines() if f"`{scalar.name}`" in line]
        assert lines, scalar.name
        rng = getattr(scalar.parse, "range", None)
        if rng is not None:
            assert any(rng in line for line in lines), (scalar.name, rng)
