"""``twistd mailguard``: options, start-up, and the one place the global
reactor is imported.

twistd parses the options and calls L{makeService} as root, in the process
the administrator started; then it forks (as a daemon), binds the ports in
``privilegedStartService``, drops to ``--uid``/``--gid`` and starts the
services.  A mistake met after the fork is a traceback in the log and, for
a daemon, a truncated ``repr`` on the terminal.  So everything that can
fail is done before the fork: the options and the configuration are
checked, the spool is made and given to the run-time user, and every
listener binds (L{mailguard.smtpd.listener}).  A mistake is one line on
standard error -- ``FILE:LINE: message`` for the configuration -- and exit
status 1.
"""

from __future__ import annotations

import os
import re
import stat
import sys

from twisted.logger import Logger
from twisted.python import lockfile, usage

from mailguard import version_line
from mailguard.config.problems import errors
from mailguard.config.settings import users_file
from mailguard.config.values import parse_host_port
from mailguard.policy import build
from mailguard.logs import SyslogFacility
from mailguard.service import DEFAULTS, build_service
from mailguard.signals import ProcessSignals
from mailguard.smtpd.listener import KINDS, Listener, ListenError, is_local, parse, split_proxy
from mailguard.store.ownership import SpoolError, check, give, give_log, run_as
from mailguard.store.control import MAX_PATH, control_path

log = Logger()


class ConfigRefused(usage.UsageError):
    """Configuration errors: one ``FILE:LINE: message`` line each, printed
    as they are (the lines ``mailguard check`` prints)."""


class StartupError(Exception):
    """A start-up mistake found in L{makeService}; the message is one line."""


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "mailguard: an SMTP server that keeps spam out at the door. It reads a "
        "Kerio-style mailserver.cfg (with no --config, an embedded example, on "
        "loopback only), delays its greeting to shake off spambots, answers VRFY "
        "only for trusted gateways and relays only for trusted IP groups and "
        "authenticated users. ENDPOINT is a Twisted endpoint description, "
        "e.g. tcp:25, tcp:2525:interface=127.0.0.1, tcp6:25:interface=\\:\\:1, "
        "haproxy:tcp:25, ssl:465:privateKey=key.pem:certKey=cert.pem; "
        "--smtp, --smtps and --submission may each be given several times."
    )
    optParameters = [
        ["config", "c", None, "Kerio-style mailserver.cfg (default: the embedded example configuration, loopback only)."],
        ["users", "u", None, "Kerio-style users.cfg (default: users.cfg beside --config, if present)."],
        ["tls-cert", None, None, "PEM certificate (and chain) for STARTTLS and --smtps."],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["spool", None, DEFAULTS["spool"], "Directory for Maildirs, the relay queue and the security log."],
        ["security-log", None, None, "Security log file (default: SPOOL/security.log)."],
        ["relay-host", None, None, "HOST:PORT of the smart host / back-end that relayed and gateway mail goes to."],
        ["metrics", None, None, "ENDPOINT serving Prometheus metrics at /metrics, e.g. tcp:9125:interface=127.0.0.1. "
                                "Default: off."],
    ]

    def __init__(self) -> None:
        super().__init__()
        for kind in KINDS:
            self[kind] = []

    def opt_smtp(self, endpoint: str) -> None:
        """ENDPOINT of a plain MX listener (greeting delay here); repeatable. [default: tcp:2525:interface=127.0.0.1]"""
        self["smtp"].append(endpoint)

    def opt_smtps(self, endpoint: str) -> None:
        """ENDPOINT of an implicit-TLS listener (never delayed); repeatable. Default: off."""
        self["smtps"].append(endpoint)

    def opt_submission(self, endpoint: str) -> None:
        """ENDPOINT of a submission listener: AUTH before MAIL, never delayed; repeatable. Default: off."""
        self["submission"].append(endpoint)

    def opt_version(self) -> None:
        """Print mailguard's version and exit."""
        print(version_line())
        sys.exit(0)

    def parseOptions(self, options=None) -> None:
        """Under twistd, a mistake is one line on standard error and exit
        status 1 -- not twistd's sixty-line usage text with the mistake
        last.  Used directly (tests, embedding), it raises UsageError."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            lines = str(e).splitlines() or ["bad options"]
            if not isinstance(e, ConfigRefused):
                lines = [f"mailguard: {line}" for line in lines]
            raise SystemExit("\n".join(lines))

    def postOptions(self) -> None:
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["relay-host"]:
            try:
                parse_host_port(self["relay-host"])
            except ValueError as e:
                raise usage.UsageError(f"--relay-host: {e}")
        if len(control_path(self["spool"]).encode()) > MAX_PATH:
            raise usage.UsageError(f"--spool: the path is too long for the queue's control socket "
                                   f"{control_path(self['spool'])!r} (at most {MAX_PATH} bytes)")
        self._listeners()
        self._run_as()
        # Errors refuse to start, one FILE:LINE line each; warnings (the
        # reading's and the rules') are logged once logging has begun.
        config, tables, problems = build.read_checked(self["config"], self["users"],
                                                      relay_host=self["relay-host"])
        if errors(problems) or config is None or tables is None:
            raise ConfigRefused("\n".join(str(p) for p in errors(problems)))
        self.config, self.tables = config, tables
        self.warnings = [p for p in problems if not p.is_error]
        if self["tls-cert"]:
            from mailguard.smtpd.tls import TLSConfigError, load_context

            try:
                load_context(self["tls-cert"], self["tls-key"])
            except TLSConfigError as e:
                raise usage.UsageError(f"--tls-cert/--tls-key: {e}")

    def _listeners(self) -> None:
        """Each listener option: a list of endpoint descriptions, each a
        valid one, no endpoint twice."""
        from twisted.internet import reactor

        if not self["smtp"]:
            self["smtp"] = [DEFAULTS["smtp"]]
        seen: dict[str, str] = {}
        for kind in KINDS:
            self[kind] = [d for d in self[kind] if d]  # --smtp= (empty): none of this kind
            for desc in self[kind]:
                if ":" not in desc:
                    raise usage.UsageError(
                        f"--{kind} must be an endpoint description such as tcp:2525, got {desc!r}")
                inner, _ = split_proxy(desc)
                if inner in seen and not _any_port(inner):
                    raise usage.UsageError(f"--{kind} {desc}: the endpoint is given twice "
                                           f"(also as --{seen[inner]}); each listener needs its own")
                seen[inner] = kind
                if kind == "smtps" and not self["tls-cert"] and not inner.startswith("ssl:"):
                    raise usage.UsageError(f"--smtps needs --tls-cert/--tls-key (or an ssl: endpoint): {desc}")
                try:
                    parse(reactor, kind, desc)
                except ListenError as e:
                    raise usage.UsageError(str(e))
        if self["metrics"]:
            if ":" not in self["metrics"]:
                raise usage.UsageError(f"--metrics must be an endpoint description such as tcp:2525, "
                                       f"got {self['metrics']!r}")
            try:
                parse(reactor, "metrics", self["metrics"])
            except ListenError as e:
                raise usage.UsageError(str(e))

    def _run_as(self) -> None:
        """twistd's --uid/--gid need root; say so now rather than after the
        fork."""
        parent = self.parent or {}
        if (parent.get("uid") is not None or parent.get("gid") is not None) and os.geteuid() != 0:
            raise usage.UsageError("--uid/--gid need twistd to start as root: it binds the ports, "
                                   "then becomes that user; start as root, or leave them out")


def _any_port(description: str) -> bool:
    """True for a TCP endpoint on port 0: each listens on a port of its
    own, so two are not the same endpoint."""
    fields = re.split(r"(?<!\\):", description)
    return fields[0] in ("tcp", "tcp6", "ssl") and len(fields) > 1 and (
        fields[1] == "0" or "port=0" in fields[1:])


def makeService(options: Options):
    """The service twistd runs, already listening; a start-up mistake is
    one line on standard error and exit status 1 (SystemExit)."""
    from twisted.internet import reactor

    try:
        return start(options, reactor)
    except (StartupError, ListenError, SpoolError) as e:
        raise SystemExit(f"mailguard: {e}")


def start(options: Options, reactor):
    """Build the service, give the spool to the run-time user, bind every
    listener and say so in the log.  Raises L{StartupError},
    L{ListenError} or L{SpoolError}."""
    log.info("{version} starting", version=version_line())
    _log_configuration(options)
    for problem in getattr(options, "warnings", ()):
        log.warn("configuration: {problem}", problem=str(problem))
    parent = getattr(options, "parent", None) or {}
    user = run_as(parent.get("uid"), parent.get("gid"))
    spool = os.path.abspath(options["spool"])
    _spool_not_in_use(spool)
    try:
        top = build_service(options.config, dict(options), reactor, options.tables)
    except OSError as e:  # the spool could not be made or opened
        path = e.filename or spool
        verb = "use" if os.path.exists(path) else "create"
        raise StartupError(f"--spool {spool}: cannot {verb} {path}: "
                           f"{(e.strerror or str(e)).lower()} (running as {run_as()})") from None
    _give_spool(top, user)
    listeners = [s for s in top if isinstance(s, Listener)]  # --metrics too
    for listener in listeners:
        listener.listen()
    if options["config"] is None:
        _loopback_only(top)
    for listener in listeners:
        log.info("listening: {kind} on {address}{proxy} ({endpoint})", kind=listener.kind,
                 address=listener.address(), endpoint=listener.description,
                 proxy=" behind a PROXY-protocol load balancer" if listener.proxied else "")
    twistd = getattr(options, "parent", None)
    if twistd is not None and twistd.get("syslog"):
        # twistd --syslog opens syslog as facility user, without the pid.
        SyslogFacility(twistd.get("prefix") or "mailguard").setServiceParent(top)
    ProcessSignals(top, reactor).setServiceParent(top)  # last: it says READY once all listen
    return top


def _spool_not_in_use(spool: str) -> None:
    """Opening the store clears what a crash left in SPOOL/incoming: on the
    spool of a running mailguard, that would be the messages it is
    receiving.  Its control socket's lock says whether one runs.

    A mailguard killed with -9 leaves its lock and its socket behind.
    Taking the lock here breaks the stale lock, so the control socket's
    own port would then find a clean lock and not remove the stale socket
    (and fail with "address already in use"): the stale socket is removed
    here, while the lock is held."""
    path = control_path(spool)
    lock = lockfile.FilesystemLock(path + ".lock")
    try:
        acquired = lock.lock()
    except OSError:
        return  # cannot tell; binding the control socket will
    if not acquired:
        raise StartupError(f"--spool {spool}: another mailguard is running on this spool "
                           f"(it holds {path}.lock); stop it, or choose another --spool")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.remove(path)
    except OSError:
        pass  # no socket left behind
    finally:
        lock.unlock()


def _log_configuration(options: Options) -> None:
    if options["config"] is None:
        log.warn("no --config: running the embedded example configuration, whose demo accounts "
                 "and passwords are published in the README; it listens on loopback only. "
                 "Pass --config FILE to run your own.")
        return
    files = [os.path.abspath(options["config"])]
    users = users_file(options["config"], options["users"])
    if users is not None:
        files.append(os.path.abspath(users))
    log.info("configuration: {files}", files=", ".join(files))


def _give_spool(top, user) -> None:
    """The spool and the security log become the run-time user's, and
    that user must be able to write them."""
    context = top.context
    store, disk, seclog = context.store, context.queue.disk, context.security_log
    left = give(store.spool, user, (disk.dir,)) + give_log(seclog.path, user, store.spool)
    for path in left:
        log.warn("{path} has other links: its owner was not changed, so {user} may not read it",
                 path=path, user=str(user))
    check(user,
          [("--spool", p) for p in (store.spool, store.incoming, store.mail, disk.active, disk.tmp)],
          [("--security-log", seclog.path, bool(seclog.max_bytes))])
    log.info("spool: {spool}, security log: {seclog}, run as {user}",
             spool=store.spool, seclog=seclog.path, user=str(user))


def _loopback_only(top) -> None:
    """Without --config the embedded example runs, and its accounts are in
    the README: never where anyone but this host can reach it."""
    for listener in top.listeners:
        if listener.port is None or not is_local(listener.port.getHost()):
            raise StartupError(
                f"--{listener.kind} {listener.description} listens on {listener.address()}, "
                "which is not loopback: without --config mailguard runs the embedded example, "
                "whose accounts and passwords are published; pass --config FILE")
