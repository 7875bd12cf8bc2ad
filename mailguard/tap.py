"""``twistd mailguard``: options, and the one place the global reactor is
imported."""

from __future__ import annotations

from twisted.python import usage

from twisted.logger import Logger

from mailguard.config.problems import errors
from mailguard.config.values import parse_host_port
from mailguard.policy import build
from mailguard.logs import SyslogFacility
from mailguard.service import DEFAULTS, build_service
from mailguard.signals import ProcessSignals
from mailguard.store.control import MAX_PATH, control_path

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "mailguard: an SMTP server that keeps spam out at the door. It reads a "
        "Kerio-style mailserver.cfg (with no --config, an embedded example), "
        "delays its greeting to shake off spambots, answers VRFY only for "
        "trusted gateways and relays only for trusted IP groups and "
        "authenticated users. ENDPOINT is a Twisted endpoint description, "
        "e.g. tcp:25, tcp:2525:interface=127.0.0.1, haproxy:tcp:25, "
        "ssl:465:privateKey=key.pem:certKey=cert.pem."
    )
    optParameters = [
        ["config", "c", None, "Kerio-style mailserver.cfg (default: the embedded example configuration)."],
        ["users", "u", None, "Kerio-style users.cfg (default: users.cfg beside --config, if present)."],
        ["smtp", None, DEFAULTS["smtp"], "ENDPOINT of the plain MX listener; the greeting delay applies here."],
        ["smtps", None, None, "ENDPOINT of the implicit-TLS listener (never delayed). Default: off."],
        ["submission", None, None, "ENDPOINT of the submission listener: AUTH before MAIL, never delayed. Default: off."],
        ["tls-cert", None, None, "PEM certificate (and chain) for STARTTLS and --smtps."],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["spool", None, DEFAULTS["spool"], "Directory for Maildirs, the relay queue and the security log."],
        ["security-log", None, None, "Security log file (default: SPOOL/security.log)."],
        ["relay-host", None, None, "HOST:PORT of the smart host / back-end that relayed and gateway mail goes to."],
        ["metrics", None, None, "ENDPOINT serving Prometheus metrics at /metrics, e.g. tcp:9125:interface=127.0.0.1. "
                                "Default: off."],
    ]

    def postOptions(self) -> None:
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["smtps"] and not self["tls-cert"] and not self["smtps"].startswith("ssl:"):
            raise usage.UsageError("--smtps needs --tls-cert/--tls-key (or an ssl: endpoint)")
        if self["relay-host"]:
            try:
                parse_host_port(self["relay-host"])
            except ValueError as e:
                raise usage.UsageError(f"--relay-host: {e}")
        if len(control_path(self["spool"]).encode()) > MAX_PATH:
            raise usage.UsageError(f"--spool: the path is too long for the queue's control socket "
                                   f"{control_path(self['spool'])!r} (at most {MAX_PATH} bytes)")
        for name in ("smtp", "smtps", "submission", "metrics"):
            if self[name] and ":" not in self[name]:
                raise usage.UsageError(f"--{name} must be an endpoint description such as tcp:2525, got {self[name]!r}")
        # Errors refuse to start, one FILE:LINE line each; warnings (the
        # reading's and the rules') are logged once logging has begun.
        config, tables, problems = build.read_checked(self["config"], self["users"],
                                                      relay_host=self["relay-host"])
        if errors(problems) or config is None or tables is None:
            raise usage.UsageError("\n".join(str(p) for p in errors(problems)))
        self.config, self.tables = config, tables
        self.warnings = [p for p in problems if not p.is_error]
        if self["tls-cert"]:
            from mailguard.smtpd.tls import TLSConfigError, load_context

            try:
                load_context(self["tls-cert"], self["tls-key"])
            except TLSConfigError as e:
                raise usage.UsageError(str(e))


def makeService(options: Options):
    from twisted.internet import reactor

    for problem in getattr(options, "warnings", ()):
        log.warn("configuration: {problem}", problem=str(problem))
    top = build_service(options.config, dict(options), reactor, options.tables)
    twistd = getattr(options, "parent", None)
    if twistd is not None and twistd.get("syslog"):
        # twistd --syslog opens syslog as facility user, without the pid.
        SyslogFacility(twistd.get("prefix") or "mailguard").setServiceParent(top)
    ProcessSignals(top, reactor).setServiceParent(top)  # last: it says READY once all listen
    return top
