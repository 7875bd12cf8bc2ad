"""Real Kerio files: settings grouped in sections, records in lists."""

from __future__ import annotations

import pytest

from mailguard.config import kerioxml
from mailguard.config import settings as C
from mailguard.policy import build
from tests.realshape import KERIO_SECTIONS, mailserver_cfg, users_cfg


def _read(tmp_path, text: str):
    path = tmp_path / "mailserver.cfg"
    path.write_text(text)
    config, problems = C.read(str(path))
    return config, [str(p) for p in problems], str(path)


def test_a_table_of_variables_is_a_section():
    doc = kerioxml.parse_bytes(
        b'<config>\n<table name="Administration">\n'
        b'<variable name="BuiltInAdminEnabled">1</variable>\n</table>\n'
        b'<table name="Domain"><tablerow><variable name="Name">x.test</variable></tablerow></table>\n'
        b"</config>", "f.cfg")
    section = doc.collections["Administration"]
    assert section.is_section and section.rows == []
    assert section.variables["BuiltInAdminEnabled"].value == "1"
    assert section.variables["BuiltInAdminEnabled"].where == ("f.cfg", 3)
    assert not doc.collections["Domain"].is_section
    assert [(v.name, s) for v, s in doc.settings()] == [("BuiltInAdminEnabled", "Administration")]
    assert doc.problems == []


@pytest.mark.parametrize("section", [None, "SmtpServer", "Anything"])
def test_mailguard_names_are_found_at_the_top_level_or_in_any_section(tmp_path, section):
    settings = {"SmtpGreetingDelay": (section, "25"), "VRFYEnabled": (section, "1"),
                "InternetHostname": ("Global", "mx.d0.example")}
    path = mailserver_cfg(tmp_path / "mailserver.cfg", settings=settings, ip_rows=10)
    config, problems = C.read(str(path))
    assert [p for p in problems if p.is_error] == []
    assert (config.greeting_delay, config.vrfy_enabled, config.hostname) == (25.0, True, "mx.d0.example")
    assert config.where("SmtpGreetingDelay").line > 1
    assert config.where("MaxMessageSize") is None


def test_the_real_variables_the_issue_names_are_silent(tmp_path):
    """BuiltInAdminEnabled under Administration, Directories/StoreDir,
    LogGlobal/RelativePathsRoot, Backup/Enabled, FullTextSearch/Path,
    InstantMessaging/StorePath: refused by mailguard before; now ignored."""
    body = "".join(
        f'<table name="{section}"><variable name="{name}">x</variable></table>\n'
        for section, name in [("Administration", "BuiltInAdminEnabled"), ("Directories", "StoreDir"),
                              ("Directories", "ArchiveDir"), ("LogGlobal", "RelativePathsRoot"),
                              ("Backup", "Enabled"), ("FullTextSearch", "Path"),
                              ("InstantMessaging", "StorePath")])
    config, problems, _ = _read(tmp_path, f"<config>\n{body}</config>")
    assert config is not None
    assert problems == []


def test_hundreds_of_unknown_sections_and_names_are_silent(tmp_path):
    path = mailserver_cfg(tmp_path / "mailserver.cfg", ip_rows=10)
    config, tables, problems = build.read(str(path))
    assert config is not None and problems == []
    assert sum(len(v) for v in KERIO_SECTIONS.values()) > 100
    # Kept, not lost.
    assert config.document.collections["Directories"].variables["StoreDir"].name == "StoreDir"


def test_the_same_name_in_two_places_is_an_error_naming_both_lines(tmp_path):
    text = ('<config>\n<variable name="SmtpGreetingDelay">5</variable>\n'
            '<table name="SmtpServer">\n<variable name="SmtpGreetingDelay">25</variable>\n</table>\n'
            '<table name="Other">\n<variable name="SmtpGreetingDelay">30</variable>\n</table>\n</config>')
    config, problems, path = _read(tmp_path, text)
    assert config is None
    assert problems == [
        f'{path}:4: variable "SmtpGreetingDelay" is set in section "SmtpServer" and also at line 2 '
        "(in the top level); set it in one place",
        f'{path}:7: variable "SmtpGreetingDelay" is set in section "Other" and also at line 2 '
        "(in the top level); set it in one place",
    ]


def test_the_same_name_in_two_sections(tmp_path):
    text = ('<config>\n<table name="A">\n<variable name="VRFYEnabled">1</variable>\n</table>\n'
            '<table name="B">\n<variable name="VRFYEnabled">0</variable>\n</table>\n</config>')
    config, problems, path = _read(tmp_path, text)
    assert config is None
    assert problems == [f'{path}:6: variable "VRFYEnabled" is set in section "B" and also at line 3 '
                        '(in section "A"); set it in one place']


def test_the_same_kerio_name_in_many_sections_is_fine(tmp_path):
    """Kerio has an "Enabled" in many sections: only mailguard's names
    must be unique."""
    text = ('<config><table name="Backup"><variable name="Enabled">1</variable></table>'
            '<table name="Archive"><variable name="Enabled">0</variable></table></config>')
    config, problems, _ = _read(tmp_path, text)
    assert config is not None and problems == []


def test_a_name_twice_in_one_section_is_a_warning(tmp_path):
    text = ('<config>\n<table name="S">\n<variable name="VRFYEnabled">0</variable>\n'
            '<variable name="VRFYEnabled">1</variable>\n</table>\n</config>')
    config, problems, path = _read(tmp_path, text)
    assert config.vrfy_enabled is True
    assert problems == [f'{path}:4: warning: variable "VRFYEnabled" is set twice (first at line 3); '
                        "the last value is used"]


def test_a_bad_value_in_a_section_names_file_line_and_variable(tmp_path):
    text = '<config>\n<table name="SmtpServer">\n<variable name="SmtpGreetingDelay">soon</variable>\n</table>\n</config>'
    config, problems, path = _read(tmp_path, text)
    assert config is None
    assert problems == [f'{path}:3: variable "SmtpGreetingDelay": expected a number of seconds '
                        'from 0 to 3600, got "soon"']


def test_nested_tables_in_a_section_are_kept_and_ignored(tmp_path):
    text = ('<config><table name="S"><variable name="A">1</variable>'
            '<table name="Inner"><tablerow><variable name="B">2</variable></tablerow></table>'
            '</table></config>')
    config, problems, _ = _read(tmp_path, text)
    assert problems == []
    assert config.document.collections["S"].collections["Inner"].rows[0].get("B").value == "2"


def test_the_xml_safety_holds_inside_sections(tmp_path):
    text = ('<?xml version="1.0"?>\n<!DOCTYPE c [<!ENTITY x "y">]>\n'
            '<config><table name="S"><variable name="VRFYEnabled">&x;</variable></table></config>')
    config, problems, path = _read(tmp_path, text)
    assert config is None
    assert problems == [f"{path}:2: DOCTYPE declarations are not allowed in a configuration file"]


def test_record_rows_keep_their_lines_and_text():
    doc = kerioxml.parse_bytes(
        b'<config>\n<list name="L">\n<listitem>\n<variable name="A">1</variable>\n'
        b'<variable name="b">2</variable>\n</listitem>\n<listitem> plain </listitem>\n'
        b'<listitem><x/>after</listitem>\n</list></config>', "f.cfg")
    record, text, odd = doc.collections["L"].rows
    assert record.where == ("f.cfg", 3)
    assert record.get("A").where == ("f.cfg", 4)
    assert record.get("B").value == "2"  # case-insensitive
    assert record.get("missing") is None
    assert list(record.variables) == ["A", "b"]
    assert text.text == "plain" and not text.items
    assert odd.text == "after"


def test_real_users_cfg_shape(tmp_path):
    """users.cfg as Kerio writes it: D3S: passwords, PasswordHistory with
    SHA: values, Rights and other columns."""
    mailserver_cfg(tmp_path / "mailserver.cfg", ip_rows=10)
    users_cfg(tmp_path / "users.cfg", users=200, nul_every=50)
    config, tables, problems = build.read(str(tmp_path / "mailserver.cfg"))
    assert problems == []
    assert len(config.users) == 200
    assert tables.passwords.check_password("user7@d7.example", "pw-user7") == "user7@d7.example"
    assert tables.passwords.check_password("user7@d7.example", "an old password") is None
    assert tables.passwords.check_password("user50@d0.example", "") is None  # NUL:
    assert tables.directory.lookup("u10@d10.example").address == "user10@d10.example"
