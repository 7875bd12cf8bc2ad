"""The typed configuration: Kerio XML in, an immutable ``Configuration`` out.

``load()`` reads ``mailserver.cfg`` (and ``users.cfg``) with
``mailguard.config.kerioxml``, picks out the names mailguard uses (the
``SCALARS`` table below, found at the top level or in any section; the
record collections, read by ``mailguard.config.records``), checks every
value, and reports every problem at once as ``FILE:LINE: message``.  It
builds nothing from the records: the IP groups, the user directory and the
password checker are built by ``mailguard.policy.build``, so this package
stays a leaf.  Names mailguard does not use are ignored: a real Kerio file
holds hundreds (``mailguard.policy.checks`` warns about the few that look
like a misspelt mailguard name).

To add a setting, add a field to ``Configuration`` and a row to ``SCALARS``
(with its range); ``docs/configuration.md`` lists them all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Callable

from mailguard.config import kerioxml
from mailguard.config.kerioxml import Document, Variable
from mailguard.config.problems import ConfigError, Problem, Where, errors
from mailguard.config.records import (
    AliasRecord,
    DomainRecord,
    IpGroupRow,
    UserRecord,
    read_aliases,
    read_domains,
    read_ip_rows,
    read_users,
)
from mailguard.config.values import (
    Number,
    Seconds,
    parse_bind_address,
    parse_bool,
    parse_connections,
    parse_domain_list,
    parse_hostname,
    parse_optional_host_port,
    parse_text,
    parse_timeout,
)

EMBEDDED_NAME = "<embedded default mailserver.cfg>"


@dataclass(frozen=True)
class Scalar:
    """One ``<variable>`` mailguard reads: its Kerio name, the Configuration
    field it fills, how its text is parsed."""

    name: str
    attr: str
    parse: Callable[[str], object]
    kerio: bool = True  # False: a mailguard extension (documented as such)


_DAY = 86400
_TTL = Seconds(0, 30 * _DAY)
_COUNT = Number(0, 10_000_000)
_LIMIT = Number(0, 1_000_000)

SCALARS: tuple[Scalar, ...] = (
    Scalar("InternetHostname", "hostname", parse_hostname),
    Scalar("VRFYEnabled", "vrfy_enabled", parse_bool),
    Scalar("MaxMessageSize", "max_message_size", Number(0, 2**32 - 1)),
    Scalar("SmtpGreetingDelay", "greeting_delay", Seconds(0, 3600)),
    Scalar("SmtpGreetingDelayExceptions", "greeting_delay_exceptions", parse_text),
    Scalar("SmtpGreetingDelayLog", "greeting_delay_log", parse_bool),
    Scalar("RelayControlIpGroupEnabled", "relay_ip_group_enabled", parse_bool),
    Scalar("RelayControlIpGroup", "relay_ip_group", parse_text),
    Scalar("RelayControlAuthEnabled", "relay_auth_enabled", parse_bool),
    # mailguard extensions (not Kerio names); see docs/configuration.md
    Scalar("RelayControlOpenRelayIntended", "open_relay_intended", parse_bool, False),
    Scalar("SmtpAuthCramMd5Enabled", "cram_md5_enabled", parse_bool, False),
    Scalar("SmtpGreetingPassCacheTtl", "greeting_pass_ttl", _TTL, False),
    Scalar("SmtpGreetingPassCacheSize", "greeting_pass_cache_size", _COUNT, False),
    Scalar("SmtpGreetingTeaser", "greeting_teaser", parse_bool, False),
    Scalar("SmtpMaxConnections", "max_connections", _LIMIT, False),
    Scalar("SmtpMaxConnectionsPerIp", "max_connections_per_ip", _LIMIT, False),
    Scalar("SmtpIdleTimeout", "idle_timeout", Seconds(0, _DAY), False),
    Scalar("SmtpMaxSessionTime", "max_session_time", Seconds(0, _DAY), False),
    Scalar("SmtpMaxRecipients", "max_recipients", Number(1, 100_000), False),
    Scalar("SmtpHopCountLimit", "hop_count_limit", Number(0, 1000), False),
    Scalar("SmtpMaxErrors", "max_errors", Number(0, 10_000), False),
    Scalar("SmtpVrfyLimit", "vrfy_limit", Number(0, 10_000), False),
    Scalar("SmtpMaxAuthFailures", "max_auth_failures", Number(0, 10_000), False),
    Scalar("SecurityLogMaxBytes", "security_log_max_bytes", Number(0, 2**40), False),
    Scalar("SecurityLogGenerations", "security_log_generations", Number(0, 1000), False),
    Scalar("SmtpShutdownGrace", "shutdown_grace", Seconds(0, 3600), False),
    # abuse budgets (mailguard.policy.budgets; docs/abuse.md)
    Scalar("SmtpSoftErrorLimit", "soft_error_limit", Number(0, 10_000), False),
    Scalar("SmtpErrorSleepTime", "error_sleep_time", Seconds(0, 60), False),
    Scalar("SmtpRecipientOvershootLimit", "recipient_overshoot_limit", _LIMIT, False),
    Scalar("SmtpMaxErrorsPerIp", "max_errors_per_ip", _LIMIT, False),
    Scalar("SmtpMaxAuthFailuresPerIp", "max_auth_failures_per_ip", _LIMIT, False),
    Scalar("SmtpPerIpWindow", "per_ip_window", Seconds(0, _DAY), False),
    Scalar("SmtpConnectionRateLimit", "connection_rate_limit", _LIMIT, False),
    Scalar("SmtpMessageRateLimit", "message_rate_limit", _LIMIT, False),
    Scalar("SmtpMinDataRate", "min_data_rate", Number(0, 1_000_000_000), False),
    Scalar("SmtpSenderLoginMatch", "sender_login_match", parse_bool, False),
    # gateway mode (mailguard.gateway.gateway; docs/gateway.md)
    Scalar("GatewayEnabled", "gateway_enabled", parse_bool, False),
    Scalar("GatewayDomains", "gateway_domains", parse_domain_list, False),
    Scalar("GatewayBackend", "gateway_backend", parse_optional_host_port, False),
    Scalar("GatewayBindAddress", "gateway_bind_address", parse_bind_address, False),
    Scalar("GatewayConnections", "gateway_connections", parse_connections, False),
    Scalar("GatewayTimeout", "gateway_timeout", parse_timeout, False),
    Scalar("GatewayIdleTimeout", "gateway_idle_timeout", Seconds(0, _DAY), False),
    Scalar("GatewayCachePositiveTtl", "gateway_positive_ttl", _TTL, False),
    Scalar("GatewayCacheNegativeTtl", "gateway_negative_ttl", _TTL, False),
    Scalar("GatewayCacheSize", "gateway_cache_size", _COUNT, False),
    # relay queue (mailguard.store.queue; docs/delivery.md)
    Scalar("QueueLifetime", "queue_lifetime", _TTL, False),
    Scalar("QueueRetryMin", "queue_retry_min", Seconds(0, _DAY), False),
    Scalar("QueueRetryMax", "queue_retry_max", Seconds(0, _DAY), False),
    Scalar("QueueConcurrency", "queue_concurrency", Number(0, 1000), False),
    Scalar("RelayHostTlsVerify", "relay_tls_verify", parse_bool, False),
    Scalar("RelayHostTlsCaFile", "relay_tls_ca_file", parse_text, False),
    Scalar("RelayHostBindAddress", "relay_bind_address", parse_bind_address, False),
)
SCALAR_NAMES: frozenset[str] = frozenset(s.name for s in SCALARS)


@dataclass(frozen=True)
class Configuration:
    """Everything mailguard uses from the configuration files.  Immutable:
    a reload builds a new one."""

    source: str = EMBEDDED_NAME
    hostname: str = ""
    vrfy_enabled: bool = False
    max_message_size: int = 20971520
    greeting_delay: float = 0.0
    greeting_delay_exceptions: str = ""
    greeting_delay_log: bool = True
    relay_ip_group_enabled: bool = False
    relay_ip_group: str = ""
    relay_auth_enabled: bool = True
    open_relay_intended: bool = False
    cram_md5_enabled: bool = False
    greeting_pass_ttl: float = 0.0
    greeting_pass_cache_size: int = 100000
    greeting_teaser: bool = False
    max_connections: int = 10000
    max_connections_per_ip: int = 50
    idle_timeout: float = 300.0
    max_session_time: float = 1800.0
    max_recipients: int = 1000
    hop_count_limit: int = 50  # Postfix's hopcount_limit
    max_errors: int = 20
    vrfy_limit: int = 20
    max_auth_failures: int = 5
    security_log_max_bytes: int = 10 * 1024 * 1024
    security_log_generations: int = 5
    shutdown_grace: float = 30.0  # a message in DATA may finish this long after a stop
    soft_error_limit: int = 10
    error_sleep_time: float = 1.0
    recipient_overshoot_limit: int = 1000
    max_errors_per_ip: int = 100
    max_auth_failures_per_ip: int = 20
    per_ip_window: float = 600.0
    connection_rate_limit: int = 0
    message_rate_limit: int = 0
    min_data_rate: int = 500
    sender_login_match: bool = True
    gateway_enabled: bool = False
    gateway_domains: tuple[str, ...] = ()  # empty: every Domain (and alias)
    gateway_backend: tuple[str, int] | None = None  # None: --relay-host
    gateway_bind_address: str = ""
    gateway_connections: int = 4
    gateway_timeout: float = 10.0
    gateway_idle_timeout: float = 60.0
    gateway_positive_ttl: float = 3600.0
    gateway_negative_ttl: float = 300.0
    gateway_cache_size: int = 100000
    queue_lifetime: float = 432000.0  # 5 days
    queue_retry_min: float = 300.0
    queue_retry_max: float = 14400.0
    queue_concurrency: int = 10
    relay_tls_verify: bool = False
    relay_tls_ca_file: str = ""
    relay_bind_address: str = ""  # empty: GatewayBindAddress in gateway mode, else the system's choice
    domains: tuple[DomainRecord, ...] = ()
    ip_group_rows: tuple[IpGroupRow, ...] = ()
    users: tuple[UserRecord, ...] = ()
    aliases: tuple[AliasRecord, ...] = ()
    warnings: tuple[Problem, ...] = ()
    # Where each scalar mailguard read was set: (Kerio name, place).
    set_at: tuple[tuple[str, Where], ...] = ()
    # The whole parsed main file: the names mailguard does not use are kept,
    # so nothing is lost if the file is ever rewritten.
    document: Document | None = field(default=None, compare=False, repr=False)

    @property
    def gateway_domain_names(self) -> tuple[str, ...]:
        """GatewayDomains, or else every name of the Domain table (aliases too)."""
        if self.gateway_domains:
            return self.gateway_domains
        out: list[str] = []
        for d in self.domains:
            out.append(d.name)
            out.extend(d.aliases)
        return tuple(dict.fromkeys(out))

    @property
    def relay_source_address(self) -> str:
        """The source address of the relay queue's connections:
        RelayHostBindAddress, or in gateway mode GatewayBindAddress (the
        back-end trusts one address, for its probes and for the mail
        alike), or empty (the system chooses)."""
        if self.relay_bind_address:
            return self.relay_bind_address
        return self.gateway_bind_address if self.gateway_enabled else ""

    def where(self, name: str) -> Where | None:
        """Where the scalar C{name} (a Kerio name) was set, or None when it
        has its default."""
        for set_name, where in self.set_at:
            if set_name == name:
                return where
        return None


# --- loading ------------------------------------------------------------------

def embedded_default() -> bytes:
    """The embedded default configuration (same content as
    ``mailserver.cfg.example``)."""
    return resources.files("mailguard.config").joinpath("default.cfg").read_bytes()


def _default_hostname() -> str:
    # Looked up when a configuration is loaded, never at import time.
    try:
        return parse_hostname(socket.getfqdn())
    except ValueError:
        return "localhost"


def find_scalars(doc: Document, problems: list[Problem]) -> dict[str, Variable]:
    """The variables of C{SCALARS} names in C{doc}, at the top level or in
    any section.  A name set in two places (the top level and a section,
    or two sections) is an error naming both lines: which one is meant
    cannot be guessed.  Names are matched exactly, as Kerio writes them (a
    near miss is a warning of ``mailguard.policy.checks``)."""
    found: dict[str, tuple[Variable, str | None]] = {}
    for var, section in doc.settings():
        if var.name not in SCALAR_NAMES:
            continue
        first = found.get(var.name)
        if first is None:
            found[var.name] = (var, section)
            continue
        prev, prev_section = first
        here = f'section "{section}"' if section else "the top level"
        there = f'section "{prev_section}"' if prev_section else "the top level"
        problems.append(Problem(
            var.where,
            f'variable "{var.name}" is set in {here} and also at line {prev.line} '
            f"(in {there}); set it in one place"))
    return {name: var for name, (var, _) in found.items()}


def load_documents(docs: list[Document], source: str) -> tuple[Configuration | None, list[Problem]]:
    """Build a Configuration from parsed documents (the first is
    ``mailserver.cfg``; later ones, such as ``users.cfg``, add records).
    Returns the configuration (None if there were errors) and every problem."""
    with kerioxml.paused_gc():
        return _load_documents(docs, source)


def _load_documents(docs: list[Document], source: str) -> tuple[Configuration | None, list[Problem]]:
    problems: list[Problem] = []
    values: dict[str, object] = {"source": source}
    main = docs[0]
    for d in docs:
        problems.extend(d.problems)
    scalars = find_scalars(main, problems)
    for scalar in SCALARS:
        var = scalars.get(scalar.name)
        if var is None:
            continue
        try:
            values[scalar.attr] = scalar.parse(var.value)
        except ValueError as e:
            problems.append(Problem(var.where, f'variable "{scalar.name}": {e}'))
    values.setdefault("hostname", _default_hostname())

    domains: list[DomainRecord] = []
    ip_rows: list[IpGroupRow] = []
    users: list[UserRecord] = []
    aliases: list[AliasRecord] = []
    for d in docs:
        domains += read_domains(d, problems)
    default_domain = domains[0].name if len(domains) == 1 else None
    for d in docs:
        ip_rows += read_ip_rows(d, problems)
        users += read_users(d, problems, default_domain)
        aliases += read_aliases(d, problems, default_domain)

    # References to IP groups are checked here, on the rows' names; the
    # groups themselves are built by mailguard.policy.build.
    group_names = {row.group for row in ip_rows}
    for scalar_name, attr, enabled_attr in (
        ("SmtpGreetingDelayExceptions", "greeting_delay_exceptions", None),
        ("RelayControlIpGroup", "relay_ip_group", "relay_ip_group_enabled"),
    ):
        name = values.get(attr, "")
        if name and name not in group_names:
            var = scalars[scalar_name]
            severity = "error" if enabled_attr is None or values.get(enabled_attr) else "warning"
            problems.append(Problem(var.where, f'variable "{scalar_name}": IP group "{name}" does not exist', severity))
    if values.get("relay_ip_group_enabled") and not values.get("relay_ip_group"):
        var = scalars["RelayControlIpGroupEnabled"]
        problems.append(Problem(var.where, 'variable "RelayControlIpGroupEnabled" is 1 but "RelayControlIpGroup" names no group'))

    if errors(problems):
        return None, problems
    config = Configuration(
        **values,
        domains=tuple(domains),
        ip_group_rows=tuple(ip_rows),
        users=tuple(users),
        aliases=tuple(aliases),
        warnings=tuple(p for p in problems if not p.is_error),
        set_at=tuple((name, var.where) for name, var in scalars.items()),
        document=main,
    )
    return config, problems


def users_file(path: str | None, users_path: str | None = None) -> str | None:
    """The ``users.cfg`` read with C{path}: C{users_path}, else one beside
    C{path} if present (SPEC.md), else None."""
    if users_path is None and path is not None:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "users.cfg")
        if os.path.exists(beside) and os.path.abspath(beside) != os.path.abspath(path):
            users_path = beside
    return users_path


def read(path: str | None = None, users_path: str | None = None) -> tuple[Configuration | None, list[Problem]]:
    """Read and check the configuration; never raises L{ConfigError}.

    With no C{path}, the embedded default.  With no C{users_path}, a
    ``users.cfg`` beside C{path} is read if present (SPEC.md).
    """
    docs: list[Document] = []
    try:
        if path is None:
            docs.append(kerioxml.parse_bytes(embedded_default(), EMBEDDED_NAME))
        else:
            docs.append(kerioxml.parse_file(path))
        users_path = users_file(path, users_path)
        if users_path is not None:
            docs.append(kerioxml.parse_file(users_path))
    except ConfigError as e:
        return None, e.problems
    return load_documents(docs, path or EMBEDDED_NAME)


def load(path: str | None = None, users_path: str | None = None) -> Configuration:
    """Like L{read}, but raise L{ConfigError} listing every error."""
    config, problems = read(path, users_path)
    if config is None:
        raise ConfigError(errors(problems))
    return config


def setting_names() -> list[str]:
    return [s.name for s in SCALARS]


def defaults() -> dict[str, object]:
    """Each Configuration field's default value, by field name."""
    return {f.name: f.default for f in fields(Configuration)}


def field_names() -> set[str]:
    return {f.name for f in fields(Configuration)}
