"""The twistd plugin: discovered, documented, and fails early on bad options."""

from __future__ import annotations

import os
import subprocess

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from mailguard import tap
from tests.certs import make_certs
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
                   "--tls-key", "--spool", "--security-log", "--relay-host", "--version"):
        assert option in out.stdout, option
    assert out.stdout.count("repeatable") == 3  # --smtp, --smtps, --submission


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
    assert opts["smtp"] == ["tcp:2525:interface=127.0.0.1"]


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


# -- listeners, one-line mistakes, start-up facts (issue 12, issue 14 item 4) --------------

class Port:
    def __init__(self, address):
        self.address = address

    def getHost(self):
        return self.address

    def stopListening(self):
        return None


class BindingReactor(MemoryReactorClock):
    """A memory reactor whose TCP ports report the interface they were
    given (Twisted's IPv4 ones say 0.0.0.0) and a number for port 0."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        super().listenTCP(port, factory, backlog, interface)
        port = port or 40000 + len(self.tcpServers)
        family = IPv6Address if ":" in interface else IPv4Address
        return Port(family("TCP", interface or "0.0.0.0", port))

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        return self.listenTCP(port, factory, backlog, interface)


def started(argv: list[str], tmp_path) -> tuple[object, list[str], BindingReactor]:
    """tap.start on a memory reactor: the service and the log lines."""
    opts = tap.Options()
    opts.parseOptions(["--spool", str(tmp_path / "spool"), *argv])
    reactor = BindingReactor()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        top = tap.start(opts, reactor)
    finally:
        globalLogPublisher.removeObserver(events.append)
    return top, [formatEvent(e) for e in events], reactor


def test_listener_options_repeat():
    opts = tap.Options()
    opts.parseOptions(["--smtp", "tcp:2525:interface=127.0.0.1", "--smtp", "tcp6:2525:interface=\\:\\:1",
                       "--submission", "tcp:587:interface=127.0.0.1", "--submission", "unix:/run/mg.sock"])
    assert opts["smtp"] == ["tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\:\\:1"]
    assert opts["submission"] == ["tcp:587:interface=127.0.0.1", "unix:/run/mg.sock"]
    assert opts["smtps"] == []


def test_an_empty_listener_option_means_none():
    opts = tap.Options()
    opts.parseOptions(["--smtp=", "--submission", "tcp:587:interface=127.0.0.1"])
    assert opts["smtp"] == [] and opts["submission"] == ["tcp:587:interface=127.0.0.1"]


@pytest.mark.parametrize("argv, message", [
    (["--smtp", "tcp:25", "--smtp", "tcp:25"], "--smtp tcp:25: the endpoint is given twice (also as --smtp)"),
    (["--smtp", "tcp:25", "--submission", "tcp:25"],
     "--submission tcp:25: the endpoint is given twice (also as --smtp)"),
    (["--smtp", "tcp:25", "--smtp", "haproxy:tcp:25"],
     "--smtp haproxy:tcp:25: the endpoint is given twice (also as --smtp)"),
    (["--smtp", "tcp:2525:interfce=127.0.0.1"], '--smtp tcp:2525:interfce=127.0.0.1: unknown parameter "interfce"'),
    (["--submission", "tcp:587", "--submission", "587"], "--submission must be an endpoint description"),
])
def test_listener_mistakes(argv, message):
    with pytest.raises(usage.UsageError) as e:
        tap.Options().parseOptions(argv)
    assert str(e.value).startswith(message)


def twistd_options(argv: list[str]):
    """twistd's own option parser, as the twistd script runs it."""
    from twisted.scripts._twistd_unix import ServerOptions

    options = ServerOptions()
    options.parseOptions(argv)
    return options


def test_under_twistd_a_mistake_is_one_line_not_the_usage_text(tmp_path):
    with pytest.raises(SystemExit) as e:
        twistd_options(["-n", "mailguard", "--smtp", "25"])
    assert e.value.code == "mailguard: --smtp must be an endpoint description such as tcp:2525, got '25'"
    cfg = write_config(tmp_path / "mailserver.cfg", {"MaxMessageSize": "lots", "VRFYEnabled": "yes"})
    with pytest.raises(SystemExit) as e:
        twistd_options(["-n", "mailguard", "--config", str(cfg)])
    lines = e.value.code.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{cfg}:") for line in lines)  # as `check` prints them
    with pytest.raises(SystemExit) as e:
        twistd_options(["mailguard", "--version"])
    assert e.value.code == 0


def test_uid_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as e:
        twistd_options(["-n", "--uid", "65534", "mailguard"])
    assert e.value.code.startswith("mailguard: --uid/--gid need twistd to start as root")
    twistd_options(["-n", "mailguard"])  # without them, no need


def test_version(capsys):
    import mailguard

    with pytest.raises(SystemExit) as e:
        tap.Options().parseOptions(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mailguard {mailguard.__version__} (Twisted ")
    assert out == tap.version_line() + "\n"


def test_the_version_is_written_once():
    """pyproject.toml takes it from mailguard.__version__; the installed
    metadata agrees."""
    import tomllib
    from importlib.metadata import version

    import mailguard

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mailguard.__version__"}
    assert version("mailguard") == mailguard.__version__


def test_start_up_names_version_configuration_and_each_listener(tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg")
    (tmp_path / "users.cfg").write_text('<?xml version="1.0"?>\n<config/>\n')
    top, lines, reactor = started(["--config", str(cfg), "--smtp", "tcp:0:interface=127.0.0.1",
                                   "--smtp", "haproxy:tcp:2526:interface=127.0.0.1",
                                   "--submission", "tcp:0:interface=127.0.0.1"], tmp_path)
    assert lines[0] == tap.version_line() + " starting"
    assert f"configuration: {cfg}, {tmp_path / 'users.cfg'}" in lines
    listening = [line for line in lines if line.startswith("listening: ")]
    assert listening == [
        "listening: smtp on 127.0.0.1:40001 (tcp:0:interface=127.0.0.1)",
        "listening: smtp on 127.0.0.1:2526 behind a PROXY-protocol load balancer "
        "(haproxy:tcp:2526:interface=127.0.0.1)",
        "listening: submission on 127.0.0.1:40003 (tcp:0:interface=127.0.0.1)",
        f"listening: control on {tmp_path / 'spool' / 'control'} ({tmp_path / 'spool' / 'control'})"]
    assert [listener.kind for listener in top.listeners] == ["smtp", "smtp", "submission"]
    assert [factory.listener for _, factory, _, _ in [reactor.tcpServers[0], reactor.tcpServers[2]]] == [
        "smtp", "submission"]
    assert not any("demo accounts" in line for line in lines)


def test_without_config_it_warns_and_stays_on_loopback(tmp_path):
    certs = make_certs(tmp_path / "certs")
    _, lines, _ = started(["--smtp", "tcp:2525:interface=127.0.0.2", "--submission", "unix:" + str(tmp_path / "s"),
                           "--smtps", f"ssl:4650:interface=\\:\\:1:privateKey={certs.key}:certKey={certs.cert}"],
                          tmp_path)
    assert any("no --config: running the embedded example configuration, whose demo accounts and passwords "
               "are published in the README" in line for line in lines)
    for desc, where in [("tcp:25", "0.0.0.0:25"), ("tcp:25:interface=192.0.2.1", "192.0.2.1:25"),
                        ("tcp6:25:interface=\\:\\:", "[::]:25")]:
        with pytest.raises(tap.StartupError) as e:
            started(["--submission", desc], tmp_path)
        assert str(e.value) == (
            f"--submission {desc} listens on {where}, which is not loopback: without --config mailguard runs "
            "the embedded example, whose accounts and passwords are published; pass --config FILE")
    cfg = write_config(tmp_path / "mailserver.cfg")
    started(["--config", str(cfg), "--smtp", "tcp:25"], tmp_path)  # with one: anywhere


def test_make_service_turns_a_mistake_into_one_line(tmp_path, monkeypatch):
    def refuse(options, reactor):
        raise tap.StartupError("it went wrong")

    monkeypatch.setattr(tap, "start", refuse)
    opts = tap.Options()
    opts.parseOptions(["--spool", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        tap.makeService(opts)
    assert e.value.code == "mailguard: it went wrong"


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
        # A spool each: the first service holds its control socket's lock.
        spool = tmp_path / ("-".join(twistd_args) or "plain")
        options.parseOptions([*twistd_args, "mailguard", "--spool", str(spool),
                              "--smtp", "tcp:0:interface=127.0.0.1"])  # no --config: loopback only
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


def test_a_spool_left_by_kill_9_can_be_started_again(tmp_path):
    """kill -9 leaves the control socket and its lock (naming a dead pid)
    behind.  The check for a running mailguard must leave the way clear
    for the control socket's port, which removes a stale socket only when
    it breaks a stale lock itself."""
    import socket
    import subprocess

    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXServerEndpoint
    from twisted.internet.protocol import Factory, Protocol

    from mailguard.store.control import control_path
    from mailguard.tap import _spool_not_in_use

    path = control_path(str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.symlink(str(dead.pid), path + ".lock")  # the lock of a process that is gone
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # and its socket, never unlinked
    stale.close()
    _spool_not_in_use(str(tmp_path))
    assert not os.path.lexists(path)
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
    d = endpoint.listen(Factory.forProtocol(Protocol))
    port = []
    d.addBoth(port.append)
    assert not isinstance(port[0], Exception) and hasattr(port[0], "stopListening"), port[0]
    port[0].stopListening()


def test_a_running_mailguard_keeps_its_spool(tmp_path):
    from mailguard.store.control import control_path
    from mailguard.tap import StartupError, _spool_not_in_use

    path = control_path(str(tmp_path))
    os.symlink(str(os.getpid()), path + ".lock")  # held by a live process
    with pytest.raises(StartupError, match="another mailguard is running on this spool"):
        _spool_not_in_use(str(tmp_path))
    assert os.path.lexists(path + ".lock")
