"""The typed configuration: Kerio XML in, an immutable ``Configuration`` out.

``load()`` reads ``mailserver.cfg`` (and ``users.cfg``) with
``mailguard.config.kerioxml``, picks out the names mailguard uses (the ``SCALARS``
table below and the record collections), checks every value, and reports
every problem at once as ``FILE:LINE: message``.  It builds nothing from the
records: the IP groups, the user directory and the password checker are
built by ``mailguard.policy.build``, so this package stays a leaf.  Names mailguard does not use are ignored: a real
Kerio file holds hundreds.

To add a setting, add a field to ``Configuration`` and a row to ``SCALARS``;
``docs/configuration.md`` lists them all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Callable

from mailguard.config import kerioxml
from mailguard.config.values import (
    parse_bind_address,
    parse_bool,
    parse_connections,
    parse_domain_list,
    parse_hostname,
    parse_list,
    parse_optional_host_port,
    parse_seconds,
    parse_text,
    parse_timeout,
    parse_uint,
)
from mailguard.config.kerioxml import Collection, Document, Row
from mailguard.config.problems import ConfigError, Problem, Where, errors
from mailguard.config.records import AliasRecord, DomainRecord, IpGroupRow, UserRecord

EMBEDDED_NAME = "<embedded default mailserver.cfg>"


@dataclass(frozen=True)
class Scalar:
    """One ``<variable>`` mailguard reads: its Kerio name, the Configuration
    field it fills, how its text is parsed."""

    name: str
    attr: str
    parse: Callable[[str], object]
    kerio: bool = True  # False: a mailguard extension (documented as such)


SCALARS: tuple[Scalar, ...] = (
    Scalar("InternetHostname", "hostname", parse_hostname),
    Scalar("VRFYEnabled", "vrfy_enabled", parse_bool),
    Scalar("MaxMessageSize", "max_message_size", parse_uint),
    Scalar("SmtpGreetingDelay", "greeting_delay", parse_seconds),
    Scalar("SmtpGreetingDelayExceptions", "greeting_delay_exceptions", parse_text),
    Scalar("SmtpGreetingDelayLog", "greeting_delay_log", parse_bool),
    Scalar("RelayControlIpGroupEnabled", "relay_ip_group_enabled", parse_bool),
    Scalar("RelayControlIpGroup", "relay_ip_group", parse_text),
    Scalar("RelayControlAuthEnabled", "relay_auth_enabled", parse_bool),
    # mailguard extensions (not Kerio names); see docs/configuration.md
    Scalar("SmtpGreetingPassCacheTtl", "greeting_pass_ttl", parse_seconds, False),
    Scalar("SmtpGreetingPassCacheSize", "greeting_pass_cache_size", parse_uint, False),
    Scalar("SmtpGreetingTeaser", "greeting_teaser", parse_bool, False),
    Scalar("SmtpMaxConnections", "max_connections", parse_uint, False),
    Scalar("SmtpMaxConnectionsPerIp", "max_connections_per_ip", parse_uint, False),
    Scalar("SmtpIdleTimeout", "idle_timeout", parse_seconds, False),
    Scalar("SmtpMaxSessionTime", "max_session_time", parse_seconds, False),
    Scalar("SmtpMaxRecipients", "max_recipients", parse_uint, False),
    Scalar("SmtpMaxErrors", "max_errors", parse_uint, False),
    Scalar("SmtpVrfyLimit", "vrfy_limit", parse_uint, False),
    Scalar("SmtpMaxAuthFailures", "max_auth_failures", parse_uint, False),
    Scalar("SecurityLogMaxBytes", "security_log_max_bytes", parse_uint, False),
    # abuse budgets (mailguard.policy.budgets; docs/abuse.md)
    Scalar("SmtpSoftErrorLimit", "soft_error_limit", parse_uint, False),
    Scalar("SmtpErrorSleepTime", "error_sleep_time", parse_seconds, False),
    Scalar("SmtpRecipientOvershootLimit", "recipient_overshoot_limit", parse_uint, False),
    Scalar("SmtpMaxErrorsPerIp", "max_errors_per_ip", parse_uint, False),
    Scalar("SmtpMaxAuthFailuresPerIp", "max_auth_failures_per_ip", parse_uint, False),
    Scalar("SmtpPerIpWindow", "per_ip_window", parse_seconds, False),
    Scalar("SmtpConnectionRateLimit", "connection_rate_limit", parse_uint, False),
    Scalar("SmtpMessageRateLimit", "message_rate_limit", parse_uint, False),
    Scalar("SmtpMinDataRate", "min_data_rate", parse_uint, False),
    Scalar("SmtpSenderLoginMatch", "sender_login_match", parse_bool, False),
    # gateway mode (mailguard.gateway.gateway; docs/gateway.md)
    Scalar("GatewayEnabled", "gateway_enabled", parse_bool, False),
    Scalar("GatewayDomains", "gateway_domains", parse_domain_list, False),
    Scalar("GatewayBackend", "gateway_backend", parse_optional_host_port, False),
    Scalar("GatewayBindAddress", "gateway_bind_address", parse_bind_address, False),
    Scalar("GatewayConnections", "gateway_connections", parse_connections, False),
    Scalar("GatewayTimeout", "gateway_timeout", parse_timeout, False),
    Scalar("GatewayIdleTimeout", "gateway_idle_timeout", parse_seconds, False),
    Scalar("GatewayCachePositiveTtl", "gateway_positive_ttl", parse_seconds, False),
    Scalar("GatewayCacheNegativeTtl", "gateway_negative_ttl", parse_seconds, False),
    Scalar("GatewayCacheSize", "gateway_cache_size", parse_uint, False),
    # relay queue (mailguard.store.queue; docs/delivery.md)
    Scalar("QueueLifetime", "queue_lifetime", parse_seconds, False),
    Scalar("QueueRetryMin", "queue_retry_min", parse_seconds, False),
    Scalar("QueueRetryMax", "queue_retry_max", parse_seconds, False),
    Scalar("QueueConcurrency", "queue_concurrency", parse_uint, False),
    Scalar("RelayHostTlsVerify", "relay_tls_verify", parse_bool, False),
    Scalar("RelayHostTlsCaFile", "relay_tls_ca_file", parse_text, False),
)


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
    greeting_pass_ttl: float = 0.0
    greeting_pass_cache_size: int = 100000
    greeting_teaser: bool = False
    max_connections: int = 10000
    max_connections_per_ip: int = 50
    idle_timeout: float = 300.0
    max_session_time: float = 1800.0
    max_recipients: int = 1000
    max_errors: int = 20
    vrfy_limit: int = 20
    max_auth_failures: int = 5
    security_log_max_bytes: int = 10 * 1024 * 1024
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
    domains: tuple[DomainRecord, ...] = ()
    ip_group_rows: tuple[IpGroupRow, ...] = ()
    users: tuple[UserRecord, ...] = ()
    aliases: tuple[AliasRecord, ...] = ()
    warnings: tuple[Problem, ...] = ()
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


# --- collections ------------------------------------------------------------

def _rows(doc: Document, name: str) -> list[Row]:
    """Rows of collection C{name} (table or list, either form)."""
    coll: Collection | None = doc.collections.get(name)
    if coll is None:
        for k, v in doc.collections.items():
            if k.lower() == name.lower():
                coll = v
                break
    return coll.rows if coll else []


def _value(row: Row, *names: str, default: str = "") -> str:
    v = row.get(*names)
    return v.value.strip() if v is not None else default


def _where(row: Row, *names: str) -> Where:
    v = row.get(*names)
    return v.where if v is not None else row.where


def _row_bool(row: Row, name: str, problems: list[Problem], what: str, default: bool = True) -> bool:
    v = row.get(name)
    if v is None or v.value.strip() == "":
        return default
    try:
        return parse_bool(v.value)
    except ValueError as e:
        problems.append(Problem(v.where, f'{what}: variable "{name}": {e}'))
        return default


def _domains(doc: Document, problems: list[Problem]) -> list[DomainRecord]:
    out = []
    for row in _rows(doc, "Domain"):
        if row.text and not row.variables:
            name = row.text  # a list of plain domain names
        else:
            name = _value(row, "Name", "Domain")
        if not name:
            problems.append(Problem(row.where, 'Domain: row without "Name" (or "Domain")'))
            continue
        try:
            name = parse_hostname(name)
        except ValueError as e:
            problems.append(Problem(_where(row, "Name", "Domain"), f"Domain: {e}"))
            continue
        aliases = []
        for a in parse_list(_value(row, "Aliases")):
            try:
                aliases.append(parse_hostname(a))
            except ValueError as e:
                problems.append(Problem(_where(row, "Aliases"), f"Domain {name}: alias: {e}"))
        out.append(DomainRecord(name, tuple(aliases), row.where))
    return out


def _ip_rows(doc: Document, problems: list[Problem]) -> list[IpGroupRow]:
    out = []
    for row in _rows(doc, "IpAddressGroup"):
        group = _value(row, "Group", "Name")
        address = _value(row, "Address")
        if not group:
            problems.append(Problem(row.where, 'IpAddressGroup: row without "Group"'))
            continue
        if not address:
            problems.append(Problem(row.where, f'IpAddressGroup "{group}": row without "Address"'))
            continue
        enabled = _row_bool(row, "Enabled", problems, f'IpAddressGroup "{group}"')
        out.append(IpGroupRow(group, address, enabled, _value(row, "Description"),
                              _where(row, "Address")))
    return out


def _name_and_domain(row: Row, kind: str, problems: list[Problem],
                     default_domain: str | None) -> tuple[str, str] | None:
    """A User or Alias row's local part and domain ("Name" may hold a whole
    address); a row without "Domain" belongs to the only local domain."""
    name = _value(row, "Name")
    domain = _value(row, "Domain")
    if "@" in name and not domain:
        name, domain = name.rsplit("@", 1)
    if not name:
        problems.append(Problem(row.where, f'{kind}: row without "Name"'))
        return None
    if not domain:
        if default_domain is None:
            problems.append(Problem(row.where, f'{kind} "{name}": no "Domain" and no single local domain to assume'))
            return None
        domain = default_domain
    return name, domain.lower().rstrip(".")


def _users(doc: Document, problems: list[Problem], default_domain: str | None) -> list[UserRecord]:
    out = []
    for row in _rows(doc, "User"):
        found = _name_and_domain(row, "User", problems, default_domain)
        if found is None:
            continue
        name, domain = found
        pw = row.get("Password")
        out.append(UserRecord(
            name=name,
            domain=domain,
            password=pw.value if pw is not None and pw.value != "" else None,
            enabled=_row_bool(row, "Enabled", problems, f'User "{name}@{domain}"'),
            aliases=parse_list(_value(row, "Aliases")),
            where=row.where,
        ))
    return out


def _aliases(doc: Document, problems: list[Problem], default_domain: str | None) -> list[AliasRecord]:
    out = []
    for row in _rows(doc, "Alias"):
        found = _name_and_domain(row, "Alias", problems, default_domain)
        if found is None:
            continue
        name, domain = found
        target = parse_list(_value(row, "DeliverTo"))
        if not target:
            problems.append(Problem(row.where, f'Alias "{name}": no "DeliverTo"'))
            continue
        out.append(AliasRecord(name, domain, target, row.where))
    return out


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


def load_documents(docs: list[Document], source: str) -> tuple[Configuration | None, list[Problem]]:
    """Build a Configuration from parsed documents (the first is
    ``mailserver.cfg``; later ones, such as ``users.cfg``, add records).
    Returns the configuration (None if there were errors) and every problem."""
    problems: list[Problem] = []
    values: dict[str, object] = {"source": source}
    main = docs[0]
    for d in docs:
        problems.extend(d.problems)
    for scalar in SCALARS:
        var = main.variables.get(scalar.name)
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
        domains += _domains(d, problems)
    default_domain = domains[0].name if len(domains) == 1 else None
    for d in docs:
        ip_rows += _ip_rows(d, problems)
        users += _users(d, problems, default_domain)
        aliases += _aliases(d, problems, default_domain)

    # References to IP groups are checked here, on the rows' names; the
    # groups themselves are built by mailguard.policy.build.
    group_names = {row.group for row in ip_rows}
    for scalar_name, attr, enabled_attr in (
        ("SmtpGreetingDelayExceptions", "greeting_delay_exceptions", None),
        ("RelayControlIpGroup", "relay_ip_group", "relay_ip_group_enabled"),
    ):
        name = values.get(attr, "")
        if name and name not in group_names:
            var = main.variables[scalar_name]
            severity = "error" if enabled_attr is None or values.get(enabled_attr) else "warning"
            problems.append(Problem(var.where, f'variable "{scalar_name}": IP group "{name}" does not exist', severity))
    if values.get("relay_ip_group_enabled") and not values.get("relay_ip_group"):
        var = main.variables["RelayControlIpGroupEnabled"]
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
        document=main,
    )
    return config, problems


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
        if users_path is None and path is not None:
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), "users.cfg")
            if os.path.exists(beside) and os.path.abspath(beside) != os.path.abspath(path):
                users_path = beside
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


def field_names() -> set[str]:
    return {f.name for f in fields(Configuration)}
