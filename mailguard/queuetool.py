"""``python -m mailguard queue``: see and steer the relay queue, as
Postfix's ``postqueue -p``, ``postcat -q``, ``postqueue -f/-s`` and
``postsuper -d/-h/-H`` do::

    queue [--spool DIR] list [--json]          every entry and recipient
    queue [--spool DIR] show ID [--json]       one entry, then its message
    queue [--spool DIR] flush [ID | DOMAIN]    try now (all, one, a domain)
    queue [--spool DIR] delete ID | ALL        remove, without a DSN
    queue [--spool DIR] hold ID | ALL          never try until released
    queue [--spool DIR] release ID | ALL

``list`` and ``show`` read the spool, safe at any time.  The others go
through the running server's control socket (L{mailguard.store.control}),
so the server notices at once; with no server running they change the
spool itself (L{mailguard.store.queueadmin.offline}).  ID is the short id
(``queued as ...``, ``queue=...`` in the log) or the file name.
Exit status: 0 done, 1 nothing matched ID (or the server refused), 2 a
usage mistake.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mailguard.store.control import request
from mailguard.store.entries import QueueEntry
from mailguard.store.envelope import queue_id
from mailguard.store.queueadmin import matches, offline, read_entries
from mailguard.store.queuedir import QueueDir

__all__ = ["add_command", "run"]

DEFAULT_SPOOL = "./mailguard-data"  # as twistd mailguard --spool


def add_command(sub: argparse._SubParsersAction) -> None:
    queue = sub.add_parser("queue", help="list, show, flush, delete, hold or release queued mail")
    queue.add_argument("--spool", default=DEFAULT_SPOOL, help=f"the server's --spool (default {DEFAULT_SPOOL})")
    ops = queue.add_subparsers(dest="op", required=True)
    lst = ops.add_parser("list", help="every queued message and its recipients")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    show = ops.add_parser("show", help="one queued message: its envelope and state, then the message")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="the envelope and state as JSON, no message")
    flush = ops.add_parser("flush", help="try now: every message, one, or those for a domain")
    flush.add_argument("id", nargs="?", default=None, metavar="ID|DOMAIN")
    for op, what in (("delete", "remove from the queue; no DSN is sent"),
                     ("hold", "never try until released"), ("release", "try again (now)")):
        p = ops.add_parser(op, help=what)
        p.add_argument("id", metavar="ID|ALL")
    queue.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.op == "list":
        return _list(args.spool, args.json)
    if args.op == "show":
        return _show(args.spool, args.id, args.json)
    return _change(args.spool, args.op, args.id)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if t else "-"


def _record(entry: QueueEntry) -> dict:
    data = json.loads(entry.to_json())
    data.pop("version", None)
    data["queue_id"] = queue_id(entry.id)
    return data


def _list(spool: str, as_json: bool) -> int:
    entries = read_entries(spool)
    out = sys.stdout
    if as_json:
        for entry in entries:
            out.write(json.dumps(_record(entry)) + "\n")
        return 0
    for entry in entries:
        held = "  [held]" if entry.held else ""
        out.write(f"{queue_id(entry.id):<20} {entry.size:>9}  {_when(entry.arrival)}  "
                  f"<{entry.sender}>{held}\n")
        out.write(f"{'':20} attempts: {entry.attempts}, next: {_when(entry.next_attempt)}\n")
        for r in entry.recipients:
            last = f"  {r.status} {r.diagnostic}".rstrip() if r.status or r.diagnostic else ""
            out.write(f"    <{r.address}>  {r.state}{last}\n")
    size = sum(e.size for e in entries)
    held = sum(1 for e in entries if e.held)
    out.write(f"-- {len(entries)} message(s), {size} bytes, {held} held\n")
    return 0


def _find(spool: str, key: str) -> QueueEntry | None:
    found = [e for e in read_entries(spool) if key != "ALL" and matches(e.id, key)]
    return found[0] if len(found) == 1 else None


def _show(spool: str, key: str, as_json: bool) -> int:
    entry = _find(spool, key)
    if entry is None:
        print(f"no queued message {key}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(_record(entry), indent=1))
        return 0
    lines = [("id", entry.id), ("queue id", queue_id(entry.id)), ("sender", f"<{entry.sender}>"),
             ("arrival", _when(entry.arrival)), ("size", entry.size), ("client", entry.client_ip or "-"),
             ("held", "yes" if entry.held else "no"), ("attempts", entry.attempts),
             ("last attempt", _when(entry.last_attempt)), ("next attempt", _when(entry.next_attempt)),
             ("envid", entry.envid or "-"), ("ret", entry.ret or "-"), ("body", entry.body or "-")]
    for r in entry.recipients:
        lines.append(("recipient", f"<{r.address}> {r.state} {r.status} {r.diagnostic}".rstrip()))
    for name, value in lines:
        print(f"{name}: {value}")
    print()
    sys.stdout.flush()
    try:
        with open(QueueDir(spool).eml_path(entry.id), "rb") as f:
            sys.stdout.buffer.write(f.read())
    except FileNotFoundError:
        print("(the message file is gone: the entry was just removed)", file=sys.stderr)
        return 1
    return 0


def _change(spool: str, op: str, key: str | None) -> int:
    try:
        answer = request(spool, op, key)
    except OSError as e:
        print(f"cannot reach the server on {spool}: {e}", file=sys.stderr)
        return 1
    if answer is None:
        ids, where = offline(spool, op, key), "in the spool (no server running)"
    elif not answer.get("ok"):
        print(f"the server refused: {answer.get('error')}", file=sys.stderr)
        return 1
    else:
        ids, where = answer["ids"], "by the running server"
    past = {"delete": "deleted", "hold": "held", "release": "released", "flush": "flushed"}[op]
    for id in ids:
        print(f"{past}: {queue_id(id)}")
    if op == "flush" and answer is None:
        print("no server is running: every queued message is tried when it starts")
    print(f"{len(ids)} message(s) {past} {where}")
    if not ids and key not in (None, "ALL") and op != "flush":
        print(f"no queued message {key}" + (" to change" if op in ("hold", "release") else ""),
              file=sys.stderr)
        return 1
    return 0
