"""The twistd plugin: discovered, documented, and fails early on bad options."""

from __future__ import annotations

import os
import subprocess

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from mailguard import tap
from tests.conftest import ROOT, TWISTD, write_config


def _twistd(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([TWISTD, *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))


def test_plugin_is_discovered():
    names = [p.tapname for p in getPlugins(IServiceMaker)]
    assert "mailguard" in names


@pytest.mark.e2e
def test_twistd_help_lists_mailguard():
    out = _twistd("--help")
    assert out.returncode == 0
    assert "mailguard" in out.stdout


@pytest.mark.e2e
def test_mailguard_help_documents_every_option():
    out = _twistd("-n", "mailguard", "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--config", "--users", "--smtp", "--smtps", "--submission", "--tls-cert",
                   "--tls-key", "--spool", "--security-log", "--relay-host"):
        assert option in out.stdout, option


def test_no_init_in_twisted_plugins():
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "__init__.py").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "x.pem"], "go together"),
    (["--smtps", "tcp:4650"], "--smtps needs"),
    (["--relay-host", "nohost"], "HOST:PORT"),
    (["--smtp", "2525"], "endpoint description"),
])
def test_bad_options_fail_early(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        tap.Options().parseOptions(argv)


def test_bad_config_is_a_usage_error_with_file_line(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"MaxMessageSize": "lots"})
    with pytest.raises(usage.UsageError) as e:
        tap.Options().parseOptions(["--config", str(cfg)])
    assert f"{cfg}:" in str(e.value)
    assert "MaxMessageSize" in str(e.value)


@pytest.mark.e2e
def test_bad_config_twistd_exits_nonzero_without_traceback(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"VRFYEnabled": "yes"})
    out = _twistd("-n", "mailguard", "--config", str(cfg))
    assert out.returncode != 0
    assert "VRFYEnabled" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout


def test_default_config_is_the_example():
    assert (ROOT / "mailguard" / "config" / "default.cfg").read_bytes() == (ROOT / "mailserver.cfg.example").read_bytes()


def test_options_default_config_loads():
    opts = tap.Options()
    opts.parseOptions([])
    assert opts.config.hostname == "mail.example.com"
    assert opts["smtp"] == "tcp:2525:interface=127.0.0.1"


def test_gateway_mode_needs_relay_host(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"GatewayEnabled": "1"})
    with pytest.raises(usage.UsageError, match="relay-host"):
        tap.Options().parseOptions(["--config", str(cfg)])


def test_submission_without_tls_warns(tmp_path):
    """Without TLS, PLAIN/LOGIN are never offered: say so at start-up."""
    from twisted.internet import reactor  # built, never started: nothing listens
    from twisted.logger import globalLogPublisher

    from mailguard.config import settings as config_mod
    from mailguard.service import build_service

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        build_service(config_mod.load(None), {"spool": str(tmp_path), "submission": "tcp:0:interface=127.0.0.1"},
                      reactor)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("--submission without --tls-cert" in e.get("log_format", "") for e in events)
    # CRAM-MD5 is off by default: nothing at all can authenticate there.
    assert any("no one can authenticate there" in e.get("log_format", "") for e in events)


def test_open_relay_group_refuses_to_start(tmp_path):
    """The rules of `mailguard check` run at start-up: an error is one
    FILE:LINE line."""
    cfg = write_config(tmp_path / "mailserver.cfg", groups=[("Trusted", "0.0.0.0/0")])
    with pytest.raises(usage.UsageError) as e:
        tap.Options().parseOptions(["--config", str(cfg)])
    assert str(e.value).splitlines() == [
        f'{cfg}:7: the relay IP group "Trusted" covers all of IPv4: this is an open relay (anyone may send '
        "mail anywhere through this server); narrow the group, or set RelayControlOpenRelayIntended to 1 "
        "if that is really meant"]


def test_intended_open_relay_starts(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg", {"RelayControlOpenRelayIntended": "1"},
                       groups=[("Trusted", "0.0.0.0/0")])
    opts = tap.Options()
    opts.parseOptions(["--config", str(cfg)])
    assert opts.config.open_relay_intended and opts.warnings == []


def test_warnings_are_logged_at_start_up(tmp_path):
    from twisted.logger import globalLogPublisher

    cfg = write_config(tmp_path / "mailserver.cfg", {"SmtpGreetingDelai": "25", "SmtpGreetingDelay": "400"})
    opts = tap.Options()
    opts.parseOptions(["--config", str(cfg), "--spool", str(tmp_path / "spool"),
                       "--smtp", "tcp:0:interface=127.0.0.1"])
    assert [p.severity for p in opts.warnings] == ["warning", "warning"]
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        tap.makeService(opts)
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e["problem"] for e in events if e.get("log_format") == "configuration: {problem}"]
    assert logged == [str(p) for p in opts.warnings]
    assert any('did you mean "SmtpGreetingDelay"?' in line for line in logged)
    assert any("SmtpGreetingDelay is 400 s" in line for line in logged)


def test_metrics_must_be_an_endpoint(tmp_path):
    with pytest.raises(usage.UsageError, match="--metrics must be an endpoint description"):
        tap.Options().parseOptions(["--spool", str(tmp_path), "--metrics", "9125"])


def test_a_spool_too_long_for_the_control_socket_is_refused_at_start(tmp_path):
    with pytest.raises(usage.UsageError, match="too long for the queue's control socket"):
        tap.Options().parseOptions(["--spool", str(tmp_path / ("x" * 120))])


def test_twistd_syslog_is_reopened_as_mail_with_the_pid(tmp_path):
    """twistd --syslog: the service tree gains the SyslogFacility service
    (with twistd's --prefix); without --syslog, it does not."""
    from twisted.scripts.twistd import ServerOptions

    from mailguard.logs import SyslogFacility

    def facility(*twistd_args):
        options = ServerOptions()
        options.parseOptions([*twistd_args, "mailguard", "--spool", str(tmp_path), "--smtp", "tcp:0"])
        top = tap.makeService(options.subOptions)
        return [s for s in top if isinstance(s, SyslogFacility)]

    [svc] = facility("--syslog", "--prefix", "mx-in")
    assert svc.prefix == "mx-in"
    assert facility() == []


def test_make_service_reloads_with_the_start_up_rules_and_installs_the_signals(tmp_path):
    from mailguard.lifecycle import MailguardService
    from mailguard.signals import ProcessSignals
    from mailguard.store.durable import run_inline

    cfg = write_config(tmp_path / "mailserver.cfg")
    opts = tap.Options()
    opts.parseOptions(["--config", str(cfg), "--spool", str(tmp_path / "spool"),
                       "--smtp", "tcp:0:interface=127.0.0.1"])
    top = tap.makeService(opts)
    assert isinstance(top, MailguardService)
    assert isinstance(list(top)[-1], ProcessSignals)  # last: it starts once the listeners have
    top.run = run_inline
    write_config(cfg, groups=[("Trusted", "0.0.0.0/0")])  # an open relay, refused as at start-up
    result = top.reload().result
    assert not result.ok
    assert any("RelayControlOpenRelayIntended" in p.message for p in result.problems if p.is_error)
