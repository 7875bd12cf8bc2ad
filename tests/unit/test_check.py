"""``python -m mailguard check``: the summary and FILE:LINE errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import EXAMPLE, ROOT, write_config

pytestmark = pytest.mark.e2e  # every test runs `python -m mailguard check` in a process


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailguard", "check", *args],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=60)


def test_check_example_prints_summary():
    out = _check(str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    for fragment in ("hostname: mail.example.com", "domains: example.com (aliases: example.net)",
                     "users: 4 (3 enabled, 1 disabled)", "IP groups: 2", "VRFY: enabled",
                     "greeting delay: 25 s", 'relay: clients in IP group "Trusted relays" and SMTP-authenticated users'):
        assert fragment in out.stdout, fragment


def test_check_broken_config_exit_1_with_file_line(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"VRFYEnabled": "maybe", "MaxMessageSize": "-1"})
    out = _check(str(cfg))
    assert out.returncode == 1
    lines = [l for l in out.stderr.splitlines() if l]
    assert len(lines) == 2
    assert all(l.startswith(f"{cfg}:") for l in lines)
    assert "Traceback" not in out.stderr


def test_check_missing_file(tmp_path):
    out = _check(str(tmp_path / "nope.cfg"))
    assert out.returncode == 1
    assert "cannot read" in out.stderr


def test_check_shows_gateway_mode(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"GatewayEnabled": "1", "GatewayBackend": "127.0.0.1:2626"})
    out = _check(str(cfg))
    assert out.returncode == 0, out.stderr
    assert "gateway: recipients of example.com, example.net verified with VRFY at 127.0.0.1:2626" in out.stdout


# --- in process: the rules, the summary, --strict ------------------------------------

from mailguard import check as check_mod  # noqa: E402
from mailguard.policy.passwords import make_d3s_password  # noqa: E402
from tests.realshape import mailserver_cfg, password_of, users_cfg  # noqa: E402


def _main(capsys, *args: str) -> tuple[int, str, str]:
    rc = check_mod.main(["check", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_open_relay_group_is_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "mailserver.cfg", groups=[("Trusted", "0.0.0.0/0")])
    rc, out, err = _main(capsys, cfg)
    assert rc == 1 and out == ""
    assert [line for line in err.splitlines() if "open relay" in line] == [
        f'{cfg}:7: the relay IP group "Trusted" covers all of IPv4: this is an open relay (anyone may '
        "send mail anywhere through this server); narrow the group, or set RelayControlOpenRelayIntended "
        "to 1 if that is really meant"]


def test_intended_open_relay_says_so(tmp_path, capsys):
    cfg = write_config(tmp_path / "mailserver.cfg", {"RelayControlOpenRelayIntended": "1"},
                       groups=[("Trusted", "0.0.0.0/0")])
    rc, out, err = _main(capsys, cfg)
    assert rc == 0, err
    assert ('relay: OPEN RELAY: clients in IP group "Trusted" (covers all of IPv4) and '
            "SMTP-authenticated users; RelayControlOpenRelayIntended is 1") in out.splitlines()
    assert "all else to non-local domains refused" not in out


def test_misspelt_names_warn_and_strict_fails(tmp_path, capsys):
    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpGreetingDelai": "25", "SmtpMaxConectionsPerIp": "5",
                                                     "QueueLifeTime": "60"})
    rc, out, err = _main(capsys, cfg)
    assert rc == 0
    assert [line.rsplit(": did you mean ", 1)[1] for line in err.splitlines()] == [
        '"SmtpGreetingDelay"?', '"SmtpMaxConnectionsPerIp"?', '"QueueLifetime"?']
    assert all(line.startswith(f"{cfg}:") and ": warning: " in line for line in err.splitlines())
    rc, out, err = _main(capsys, cfg, "--strict")
    assert rc == 1
    assert err.splitlines()[-1] == "3 warnings: failing (--strict)"


def test_strict_passes_a_clean_file(tmp_path, capsys):
    rc, out, err = _main(capsys, write_config(tmp_path / "mailserver.cfg"), "--strict")
    assert (rc, err) == (0, "")


def test_summary_lists_every_setting_that_differs_from_its_default(tmp_path, capsys):
    cfg = write_config(tmp_path / "mailserver.cfg", {
        "SmtpMaxConnectionsPerIp": "20", "GatewayBackend": "[::1]:2626", "GatewayDomains": "a.test, b.test",
        "SmtpGreetingDelay": "12.5", "MaxMessageSize": "20971520", "SmtpAuthCramMd5Enabled": "1",
        "RelayHostTlsCaFile": "/etc/ssl/ca.pem"})
    rc, out, err = _main(capsys, cfg)
    assert rc == 0, err
    lines = out.splitlines()
    changed = lines[lines.index("settings that differ from their defaults:") + 1:]
    assert changed == [
        "  InternetHostname = mx.example.com",
        "  VRFYEnabled = 1",
        "  SmtpGreetingDelay = 12.5",
        "  RelayControlIpGroupEnabled = 1",
        "  RelayControlIpGroup = Trusted",
        "  SmtpAuthCramMd5Enabled = 1 (mailguard)",
        "  SmtpMaxConnectionsPerIp = 20 (mailguard)",
        "  GatewayDomains = a.test, b.test (mailguard)",
        "  GatewayBackend = [::1]:2626 (mailguard)",
        "  RelayHostTlsCaFile = /etc/ssl/ca.pem (mailguard)",
    ]  # MaxMessageSize is set, to its default: not listed


def test_summary_counts_password_forms_and_never_prints_a_password(tmp_path, capsys):
    users = [(f"k{i}", "example.com", make_d3s_password(f"kerio-secret-{i}"), True) for i in range(30)]
    users += [("n", "example.com", "NUL:", True), ("m", "example.com", "MD5:abc", True),
              ("m2", "example.com", "MD5:def", True), ("p", "example.com", "plain-secret", True)]
    cfg = write_config(tmp_path / "mailserver.cfg", users=users, aliases=())
    rc, out, err = _main(capsys, cfg)
    assert rc == 0, err
    assert "passwords of enabled users:\n  D3S: (Kerio's reversible form): 30\n  plain text: 1\n" \
           "  NUL: (no password): 1\n  unverifiable: 2\n" in out
    assert err.splitlines() == [f"{cfg}:{_line(cfg, 'MD5:abc')}: warning: 2 enabled users have a password "
                                "in MD5: form, which mailguard cannot verify (first: m@example.com); "
                                "they cannot authenticate"]
    assert "kerio-secret" not in out + err and "plain-secret" not in out + err


def _line(path, needle):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_real_shape_files(tmp_path, capsys):
    """Sections around mailguard's names, D3S: users in users.cfg, a
    2,000-row IP group (the 20,000-user file is in tests/e2e)."""
    mailserver_cfg(tmp_path / "mailserver.cfg", domains=50, ip_rows=2000, settings={
        "InternetHostname": ("Global", "mx.d0.example"), "SmtpGreetingDelay": ("SmtpServer", "25"),
        "VRFYEnabled": ("SmtpServer", "1"), "RelayControlIpGroupEnabled": (None, "1"),
        "RelayControlIpGroup": (None, "Trusted")})
    users_cfg(tmp_path / "users.cfg", users=2000, domains=50, nul_every=100)
    rc, out, err = _main(capsys, tmp_path / "mailserver.cfg")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    for line in ["hostname: mx.d0.example", "users: 2000 (2000 enabled, 0 disabled)",
                 "  D3S: (Kerio's reversible form): 1980", "  NUL: (no password): 20",
                 "IP groups: 2", "  Big: 2000 entries", "  Trusted: 1 entry",
                 "greeting delay: 25 s on the plain SMTP listener; attacks logged",
                 'relay: clients in IP group "Trusted" and SMTP-authenticated users; '
                 "all else to non-local domains refused"]:
        assert line in lines, line
    assert lines[2].startswith("domains: d0.example (aliases: a0.example), d1.example,")
    assert lines[2].count(".example") == 51
    assert password_of("user1") not in out
