"""Build the policy objects from a configuration: the one composition of
mailguard's decisions.

``mailguard.config`` turns files into frozen records and stops there.  Here
the records become lookups (the IP groups, the user directory, the password
checker: L{Tables}) and the lookups become the policies the SMTP session
asks (L{Policies}).  ``mailguard.service`` (production), ``mailguard.testing``
(tests) and ``mailguard check`` all call these functions, so tests exercise
exactly what production wires.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailguard.config import settings
from mailguard.config.kerioxml import paused_gc
from mailguard.config.problems import ConfigError, Problem, errors
from mailguard.config.settings import Configuration
from mailguard.interfaces import (
    IGreetingPolicy,
    IIPGroups,
    IPasswordChecker,
    IRecipientGateway,
    IRecipientPolicy,
    ITrustPolicy,
    IUserDirectory,
    IVrfyPolicy,
)
from mailguard.policy import directorybuild as directory_mod
from mailguard.policy import ipgroups as ipgroups_mod
from mailguard.policy import passwords as passwords_mod
from mailguard.policy.greeting import PassCache


@dataclass(frozen=True)
class Tables:
    """What the configuration's records become: built once per load."""

    ip_groups: IIPGroups
    directory: IUserDirectory
    passwords: IPasswordChecker


def build_tables(config: Configuration) -> tuple[Tables | None, list[Problem]]:
    """The IP groups, the directory and the password checker, with every
    problem found while building them (None when any is an error)."""
    with paused_gc():
        return _build_tables(config)


def _build_tables(config: Configuration) -> tuple[Tables | None, list[Problem]]:
    problems: list[Problem] = []
    groups, group_problems = ipgroups_mod.build(config.ip_group_rows)
    problems += group_problems
    directory, dir_problems = directory_mod.build(config.domains, config.users, config.aliases)
    problems += dir_problems
    problems += passwords_mod.password_warnings(config.users)
    if errors(problems):
        return None, problems
    return Tables(groups, directory, passwords_mod.PasswordChecker(config.users, directory)), problems


def read(path: str | None = None, users_path: str | None = None
         ) -> tuple[Configuration | None, Tables | None, list[Problem]]:
    """Read the files and build the tables; never raises L{ConfigError}.
    Every problem of both steps comes back, errors and warnings."""
    config, problems = settings.read(path, users_path)
    if config is None:
        return None, None, problems
    tables, more = build_tables(config)
    problems = problems + more
    if tables is None:
        return None, None, problems
    return config, tables, problems


def read_checked(path: str | None = None, users_path: str | None = None, *,
                 relay_host: str | None = None) -> tuple[Configuration | None, Tables | None, list[Problem]]:
    """What twistd reads at start-up and on every reload: L{read}, then
    the rules of L{mailguard.policy.checks.findings} as start-up applies
    them (it knows C{relay_host}, the ``--relay-host``).  An error in
    either step is an error of the whole."""
    from mailguard.policy.checks import findings

    config, tables, problems = read(path, users_path)
    if config is not None and tables is not None:
        problems = problems + findings(config, tables, relay_host=relay_host, startup=True)
    return config, tables, problems


def load(path: str | None = None, users_path: str | None = None) -> tuple[Configuration, Tables]:
    """Like L{read}, but raise L{ConfigError} listing every error."""
    config, tables, problems = read(path, users_path)
    if config is None or tables is None:
        raise ConfigError(errors(problems))
    return config, tables


@dataclass(frozen=True)
class Policies:
    """Every decision-maker a session consults, built from one configuration.

    Immutable: a configuration reload builds a new one, and sessions in
    progress keep the one they started with."""

    ip_groups: IIPGroups
    directory: IUserDirectory
    passwords: IPasswordChecker | None  # None: no AUTH at all
    trust: ITrustPolicy
    greeting: IGreetingPolicy
    recipients: IRecipientPolicy
    vrfy: IVrfyPolicy


def build_policies(config: Configuration, clock, *, tables: Tables | None = None,
                   gateway: IRecipientGateway | None = None,
                   pass_cache: PassCache | None = None) -> Policies:
    """The policies for C{config}.

    @param clock: an C{IReactorTime} (the greeting pass cache's clock).
    @param tables: already built tables (else built here; errors raise
        L{ConfigError}).
    @param gateway: gateway mode's back-end checker: recipients (and VRFY)
        of its domains are decided by asking the back-end.
    @param pass_cache: the greeting pass cache to use, so that it survives a
        reload; by default a new one when the configuration enables it.
    """
    # Imported here: reading and checking a configuration (``mailguard
    # check``) needs the tables, not the session's decisions, which pull in
    # twisted.internet (half of the check's memory before any file is read).
    from mailguard.policy.decide import RecipientPolicy, TrustPolicy, VrfyPolicy
    from mailguard.policy.gatewayvrfy import GatewayVrfyPolicy
    from mailguard.policy.greeting import GreetingPolicy

    if tables is None:
        tables, problems = build_tables(config)
        if tables is None:
            raise ConfigError(errors(problems))
    trust = TrustPolicy(tables.ip_groups, config.relay_ip_group_enabled,
                        config.relay_ip_group, config.relay_auth_enabled)
    if pass_cache is None and config.greeting_pass_ttl > 0:
        pass_cache = PassCache(clock, config.greeting_pass_ttl, config.greeting_pass_cache_size)
    greeting = GreetingPolicy(config.greeting_delay, tables.ip_groups,
                              config.greeting_delay_exceptions, config.greeting_teaser,
                              pass_cache)
    vrfy: IVrfyPolicy = VrfyPolicy(config.vrfy_enabled, tables.directory, trust)
    if gateway is not None:
        vrfy = GatewayVrfyPolicy(vrfy, gateway)
    return Policies(
        ip_groups=tables.ip_groups,
        directory=tables.directory,
        passwords=tables.passwords,
        trust=trust,
        greeting=greeting,
        recipients=RecipientPolicy(tables.directory, trust, gateway=gateway),
        vrfy=vrfy,
    )
