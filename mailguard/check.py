"""``python -m mailguard check FILE [--users FILE]``: validate and summarise
(the command line itself is L{mailguard.cli})."""

from __future__ import annotations

import argparse
import sys

from mailguard.config.problems import errors
from mailguard.config.settings import Configuration
from mailguard.policy import build
from mailguard.policy.build import Tables


def summary(config: Configuration, tables: Tables) -> str:
    lines = [f"configuration: {config.source}", f"hostname: {config.hostname}"]
    doms = []
    for d in config.domains:
        doms.append(d.name + (f" (aliases: {', '.join(d.aliases)})" if d.aliases else ""))
    lines.append(f"domains: {', '.join(doms) if doms else '(none)'}")
    enabled = sum(1 for u in config.users if u.enabled)
    lines.append(f"users: {len(config.users)} ({enabled} enabled, {len(config.users) - enabled} disabled)")
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
    if config.relay_ip_group_enabled:
        rules.append(f"clients in IP group \"{config.relay_ip_group}\"")
    if config.relay_auth_enabled:
        rules.append("SMTP-authenticated users")
    lines.append("relay: " + (" and ".join(rules) if rules else "nobody") + "; all else to non-local domains refused")
    if config.gateway_enabled:
        backend = config.gateway_backend
        where = f"{backend[0]}:{backend[1]}" if backend else "the --relay-host"
        lines.append(f"gateway: recipients of {', '.join(config.gateway_domain_names)} verified with VRFY at {where}")
    else:
        lines.append("gateway: off (recipients checked against the local users)")
    lines.append(f"max message size: {config.max_message_size} bytes")
    return "\n".join(lines)


def add_command(sub: argparse._SubParsersAction) -> None:
    """``check`` on the command line of L{mailguard.cli}."""
    check = sub.add_parser("check", help="validate a mailserver.cfg and print a summary")
    check.add_argument("file")
    check.add_argument("--users", default=None, help="users.cfg (default: beside FILE, if present)")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config, tables, problems = build.read(args.file, args.users)
    for p in problems:
        if not p.is_error:
            print(p, file=sys.stderr)
    if config is None or tables is None:
        for p in errors(problems):
            print(p, file=sys.stderr)
        return 1
    print(summary(config, tables))
    return 0
