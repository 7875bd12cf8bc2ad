"""``python -m mailguard COMMAND``: the command line.

- ``check FILE [--users FILE]``: validate a configuration and summarise it
  (L{mailguard.check});
- ``queue [--spool DIR] list|show|flush|delete|hold|release``: the relay
  queue, like Postfix's ``postqueue``/``postsuper`` (L{mailguard.queuetool}).
"""

from __future__ import annotations

import argparse

from mailguard import check, queuetool, version_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailguard")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print mailguard's version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    check.add_command(sub)
    queuetool.add_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)
