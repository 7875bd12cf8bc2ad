"""``python -m mailguard check FILE [--users FILE] [--strict]``: validate and
summarise (the command line itself is L{mailguard.cli}).

Errors and warnings go to stderr as ``FILE:LINE: message`` -- those of
reading the files and those of the rules in ``mailguard.policy.checks``,
the same rules ``twistd mailguard`` applies at start-up.  On an error the
exit status is 1 and no summary is printed; ``--strict`` makes a warning
fail too (as ``postconf``'s warnings can be made to in a CI job).
"""

from __future__ import annotations

import argparse
import sys

from mailguard.config.problems import errors
from mailguard.config.settings import SCALARS, Configuration, defaults
from mailguard.config.values import shown
from mailguard.policy import build
from mailguard.policy.build import Tables
from mailguard.policy.checks import findings, open_relay
from mailguard.policy.passwords import FORM_NAMES, password_forms


def _format(value: object) -> str:
    """A setting's value as it would be written in the file."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value if value.isprintable() and value.strip() == value else shown(value, 80)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


def changed_settings(config: Configuration) -> list[str]:
    """One line per setting whose value differs from its default (the host
    name: when it is set in the file), Kerio names and mailguard's own."""
    default = defaults()
    lines = []
    for scalar in SCALARS:
        value = getattr(config, scalar.attr)
        if scalar.attr == "hostname":
            changed = config.where(scalar.name) is not None
        else:
            changed = value != default[scalar.attr]
        if changed:
            origin = "" if scalar.kerio else " (mailguard)"
            lines.append(f"  {scalar.name} = {_format(value)}{origin}")
    return lines


def summary(config: Configuration, tables: Tables) -> str:
    lines = [f"configuration: {config.source}", f"hostname: {config.hostname}"]
    doms = []
    for d in config.domains:
        doms.append(d.name + (f" (aliases: {', '.join(d.aliases)})" if d.aliases else ""))
    lines.append(f"domains: {', '.join(doms) if doms else '(none)'}")
    enabled = sum(1 for u in config.users if u.enabled)
    lines.append(f"users: {len(config.users)} ({enabled} enabled, {len(config.users) - enabled} disabled)")
    forms = password_forms(config.users)
    if forms:
        lines.append("passwords of enabled users:")
        lines += [f"  {FORM_NAMES[form]}: {forms[form]}" for form in FORM_NAMES if forms[form]]
    lines.append(f"aliases: {len(config.aliases)}")
    groups = sorted(tables.ip_groups.names())
    lines.append(f"IP groups: {len(groups)}")
    for g in groups:
        lines.append(f"  {tables.ip_groups.describe(g)}")
    lines.append(f"VRFY: {'enabled (trusted clients only)' if config.vrfy_enabled else 'disabled'}")
    if config.greeting_delay > 0:
        exc = f", except IP group \"{config.greeting_delay_exceptions}\"" if config.greeting_delay_exceptions else ""
        logged = "logged" if config.greeting_delay_log else "not logged"
        lines.append(f"greeting delay: {config.greeting_delay:g} s on the plain SMTP listener{exc}; attacks {logged}")
    else:
        lines.append("greeting delay: off")
    rules = []
    extent = open_relay(config, tables)
    if config.relay_ip_group_enabled:
        covers = f" (covers {extent})" if extent else ""
        rules.append(f"clients in IP group \"{config.relay_ip_group}\"{covers}")
    if config.relay_auth_enabled:
        rules.append("SMTP-authenticated users")
    if extent is not None:
        lines.append("relay: OPEN RELAY: " + " and ".join(rules)
                     + "; RelayControlOpenRelayIntended is 1")
    else:
        lines.append("relay: " + (" and ".join(rules) if rules else "nobody")
                     + "; all else to non-local domains refused")
    if config.gateway_enabled:
        backend = config.gateway_backend
        where = f"{backend[0]}:{backend[1]}" if backend else "the --relay-host"
        lines.append(f"gateway: recipients of {', '.join(config.gateway_domain_names)} verified with VRFY at {where}")
    else:
        lines.append("gateway: off (recipients checked against the local users)")
    lines.append(f"max message size: {config.max_message_size} bytes")
    changed = changed_settings(config)
    lines.append("settings that differ from their defaults:" + ("" if changed else " none"))
    lines += changed
    return "\n".join(lines)


def add_command(sub: argparse._SubParsersAction) -> None:
    """``check`` on the command line of L{mailguard.cli}."""
    check = sub.add_parser("check", help="validate a mailserver.cfg and print a summary")
    check.add_argument("file")
    check.add_argument("--users", default=None, help="users.cfg (default: beside FILE, if present)")
    check.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config, tables, problems = build.read(args.file, args.users)
    if config is not None and tables is not None:
        problems = problems + findings(config, tables)
    for p in problems:
        if not p.is_error:
            print(p, file=sys.stderr)
    if config is None or tables is None or errors(problems):
        for p in errors(problems):
            print(p, file=sys.stderr)
        return 1
    print(summary(config, tables))
    warned = len(problems)
    if args.strict and warned:
        print(f"{warned} warning{'s' if warned > 1 else ''}: failing (--strict)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``check`` alone, for callers of this module (the whole command
    line, ``python -m mailguard``, is L{mailguard.cli.main})."""
    parser = argparse.ArgumentParser(prog="python -m mailguard")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
