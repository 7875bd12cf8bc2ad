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
