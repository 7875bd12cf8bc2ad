"""``kill -9`` during a load run loses no acknowledged message and leaves no
half-written one visible.

A real ``twistd -n mailguard`` takes mail from parallel sessions (local
mailboxes, an alias that fans out to two, and relayed mail whose relay host
is down so that it stays in the queue).  Every message carries a unique id;
the clients record each id whose final dot got its ``250``.  Mid-run the
server is killed with SIGKILL.  Then:

- every acknowledged message is in every destination, byte for byte (the
  Return-Path and Received headers mailguard adds, then exactly what the client sent);
- every file in any ``new/`` or ``cur/``, and every queued ``.eml``, is a
  complete message (acknowledged or not: a message whose ``250`` was lost in
  the kill may be there, but whole);
- after a restart ``incoming/`` and ``queue/tmp/`` are empty and the queue
  still holds every acknowledged relayed message.

(SIGKILL keeps the page cache, so this proves atomic visibility and the
order of operations, not the fsyncs.)

"A ``250`` means fsynced" has two independent proofs:

- ``tests/unit/store/test_maildir.py::test_the_250_comes_after_the_file_and_directory_fsyncs``:
  the protocol over a StringTransport with the real store, its disk work
  stepped by the test, the reply checked at each fsync;
- ``test_the_250_follows_the_fsyncs_in_the_system_calls`` here: a real
  ``twistd`` under ``strace``, the order of the write, fsync, link, rename
  and directory-fsync system calls and of the ``send`` of the ``250``, and
  the files on the real spool.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, write_config

SESSIONS = 10
ACKED_BEFORE_THE_KILL = 150
RECEIVED = re.compile(rb"\AReturn-Path: <[^>\r\n]*>\r\nReceived: from client\.test \(\[127\.0\.0\.2\]\)\r\n\tby mx\.example\.com with ESMTP id [^\r\n]+"
                      rb"(?:\r\n\tfor <[^>\r\n]+>)?;\r\n\t[^\r\n]+\r\n")
ID = re.compile(rb"X-Load-Id: (\S+)\r\n")

# destinations per kind of message: (recipients, mailboxes it lands in, relayed?)
KINDS = [
    (["john@example.com"], ["john@example.com"], False),
    (["sales@example.com"], ["john@example.com", "jane@example.com"], False),
    (["far@remote.test"], [], True),
    (["jane@example.com", "far@remote.test"], ["jane@example.com"], True),
]


def _body(uid: str, size: int) -> bytes:
    head = f"Subject: load {uid}\r\nX-Load-Id: {uid}\r\nMessage-ID: <{uid}@client.test>\r\n\r\n".encode()
    line = (uid.encode() + b" ") * (70 // (len(uid) + 1)) + b"\r\n"
    lines = [line] * max(size // len(line), 1)
    return head + b"".join(lines) + b".leading dot line\r\n"


class Load:
    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent: dict[str, tuple[bytes, int]] = {}  # every message tried: id -> (body, kind)
        self.acked: set[str] = set()

    def session(self, n: int) -> None:
        rnd = random.Random(n)
        i = 0
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, source_address=("127.0.0.2", 0), timeout=10) as c:
                    c.ehlo("client.test")
                    while not self.stop.is_set():
                        i += 1
                        uid = f"s{n}m{i}"
                        kind = rnd.randrange(len(KINDS))
                        # 700 KB is past the in-memory limit: written as it arrives
                        body = _body(uid, rnd.choice((200, 3000, 60000, 700000)))
                        with self.lock:
                            self.sent[uid] = (body, kind)
                        c.sendmail("john@example.com", KINDS[kind][0], body)
                        with self.lock:  # the 250 after the final dot arrived
                            self.acked.add(uid)
            except (OSError, smtplib.SMTPException):
                return  # the server was killed


def _check_file(path: Path, load: Load) -> str:
    """A complete message: the Return-Path and Received headers, then exactly what a client
    sent.  Returns its id."""
    data = path.read_bytes()
    m = RECEIVED.match(data)
    assert m, f"{path}: no Received header at the start"
    rest = data[m.end():]
    found = ID.search(rest)
    assert found, f"{path}: no id"
    uid = found.group(1).decode()
    assert rest == load.sent[uid][0], f"{path}: not byte-identical to message {uid}"
    return uid


def test_kill9_during_load_loses_no_acknowledged_message(twistd, tmp_path):
    cfg = write_config(tmp_path / "mailserver.cfg")
    dead_port = free_port()  # the relay host is down: relayed mail stays queued
    server = twistd("--relay-host", f"127.0.0.1:{dead_port}", config=cfg)
    load = Load(server.port)
    threads = [threading.Thread(target=load.session, args=(n,), daemon=True) for n in range(SESSIONS)]
    for t in threads:
        t.start()
    # Run until 150 messages were acknowledged, however long a loaded
    # machine takes (the bound only stops a server that takes nothing).
    deadline = time.monotonic() + 300
    while len(load.acked) < ACKED_BEFORE_THE_KILL:
        assert time.monotonic() < deadline, f"only {len(load.acked)} message(s) acknowledged"
        time.sleep(0.02)
    server.kill9()
    load.stop.set()
    for t in threads:
        t.join(15)
    with load.lock:
        acked = set(load.acked)
    assert len(acked) >= ACKED_BEFORE_THE_KILL
    assert len(load.sent) > len(acked), "no message was in flight at the kill"

    spool = server.spool
    print(f"sent {len(load.sent)}, acknowledged {len(acked)}, "
          f"incoming at the kill: {len(list((spool / 'incoming').iterdir()))}")
    # 1. nothing visible is partial
    in_mailbox: dict[str, set[str]] = {}
    for sub in ("new", "cur"):
        for path in spool.glob(f"mail/*/*/Maildir/{sub}/*"):
            uid = _check_file(path, load)
            in_mailbox.setdefault(uid, set()).add(path.parts[-4] + "@" + path.parts[-5])
    queued = {}
    for path in (spool / "queue" / "active").glob("*.eml"):
        queued[_check_file(path, load)] = path
    # 2. every acknowledged message is everywhere it goes
    for uid in acked:
        _, kind = load.sent[uid]
        _, mailboxes, relayed = KINDS[kind]
        assert in_mailbox.get(uid, set()) == set(mailboxes), uid
        if relayed:
            assert uid in queued, uid
            assert (queued[uid].with_suffix(".env")).exists(), uid

    # 3. a restart cleans up and keeps the queue
    server.stop()
    server2 = twistd("--relay-host", f"127.0.0.1:{dead_port}", config=cfg)
    assert list((spool / "incoming").iterdir()) == []
    assert list((spool / "queue" / "tmp").iterdir()) == []
    requeued = {_check_file(p, load) for p in (spool / "queue" / "active").glob("*.eml")}
    assert {u for u in acked if KINDS[load.sent[u][1]][2]} <= requeued
    for p in (spool / "queue" / "active").glob("*.eml"):
        assert p.with_suffix(".env").exists()
    server2.stop()


# --- the order of the system calls -------------------------------------------------------

@dataclass
class Call:
    """One system call in an ``strace -f`` output: the lines where it
    started and returned (the same line unless another thread's call was
    printed in between), and its text."""

    start: int
    end: int
    text: str


def system_calls(trace: str) -> list[Call]:
    calls, pending = [], {}
    for i, line in enumerate(trace.splitlines()):
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (i, rest[: -len("<unfinished ...>")].rstrip())
        elif rest.startswith("<... ") and pid in pending:
            start, text = pending.pop(pid)
            calls.append(Call(start, i, text + rest[rest.index("resumed>") + len("resumed>"):]))
        else:
            calls.append(Call(i, i, rest))
    return sorted(calls, key=lambda c: c.start)


def first(calls: list[Call], prefix: str, *parts: str, after: int = -1) -> Call:
    """The first call starting with C{prefix} holding every one of C{parts},
    started after line C{after}; it must have succeeded."""
    for c in calls:
        if c.start > after and c.text.startswith(prefix) and all(p in c.text for p in parts):
            assert " = -1 " not in c.text, c  # it failed
            return c
    raise AssertionError(f"no {prefix} {parts} after line {after}")


def stop_traced(server) -> None:
    """Stop a twistd run by strace: strace blocks fatal signals when it runs
    the command itself (and killing it would leave twistd running, no
    longer traced), so the signal goes to twistd, and strace ends with it."""
    strace = server.proc
    if strace.poll() is None:
        children = Path(f"/proc/{strace.pid}/task/{strace.pid}/children").read_text().split()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in children:
                try:
                    os.kill(int(pid), sig)
                except ProcessLookupError:
                    pass
            try:
                strace.wait(30)
                break
            except subprocess.TimeoutExpired:
                continue
    server.stop()


TRACED = "openat,write,fsync,fdatasync,link,linkat,rename,renameat,renameat2,sendto,sendmsg"


def test_the_250_follows_the_fsyncs_in_the_system_calls(tmp_path):
    """A real twistd under ``strace -f``: for a message to a local mailbox
    and a relayed recipient, and for one large enough to be written as it
    arrives, the message file is written and fsynced, linked into the
    Maildir's new/ and the queue (its envelope renamed into place), those
    directories are fsynced -- each fsync starting after the links it
    covers -- and only then is the 250 sent.  Then the spool holds the
    messages, whole, and nothing is left in incoming/."""
    from tests.conftest import Twistd

    cfg = write_config(tmp_path / "mailserver.cfg")
    port = free_port()
    trace = tmp_path / "trace"
    # --seccomp-bpf: only the traced calls stop the process (else every one would)
    prefix = ("strace", "-f", "--seccomp-bpf", "-qq", "-y", "-s", "48", "-o", str(trace), "-e", f"trace={TRACED}")
    server = Twistd(tmp_path, ["--config", str(cfg), "--smtp", f"tcp:{port}:interface=127.0.0.1"], port,
                    prefix=prefix)
    small = b"Subject: small\r\n\r\nin memory until the final dot\r\n"
    large = b"Subject: large\r\n\r\n" + (b"x" * 78 + b"\r\n") * 8000  # past the 512 KiB kept in memory
    try:
        with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=30) as c:
            c.ehlo("client.test")
            assert c.sendmail("a@sender.test", ["john@example.com", "far@remote.test"], small) == {}
            assert c.sendmail("a@sender.test", ["jane@example.com"], large) == {}
    finally:
        stop_traced(server)
    calls = system_calls(trace.read_text())
    spool = server.spool
    new = {m: spool / "mail" / "example.com" / m / "Maildir" / "new" for m in ("john", "jane")}
    [small_file], [large_file] = list(new["john"].iterdir()), list(new["jane"].iterdir())
    for stored, body, relayed in ((small_file, small, True), (large_file, large, False)):
        assert RECEIVED.match(stored.read_bytes()) and stored.read_bytes().endswith(body)
        id = stored.name
        incoming = str(spool / "incoming" / id)
        written = first(calls, "write(", f"<{incoming}>")
        synced = first(calls, "fsync(", f"<{incoming}>)", after=written.end)
        linked = first(calls, "link(", f'"{incoming}"', f'"{new[stored.parent.parent.parent.name] / id}"',
                       after=synced.end)
        covered = [linked]
        if relayed:
            active = spool / "queue" / "active"
            covered.append(first(calls, "link(", f'"{incoming}"', f'"{active / id}.eml"', after=synced.end))
            envelope = first(calls, "fsync(", f"<{spool / 'queue' / 'tmp' / id}.")  # written in tmp/, fsynced,
            covered.append(first(calls, "rename(", f'"{active / id}.env"', after=envelope.end))  # then renamed
        last_name = max(c.end for c in covered)
        dir_syncs = [first(calls, "fsync(", f"<{new[stored.parent.parent.parent.name]}>)", after=linked.end)]
        if relayed:
            dir_syncs.append(first(calls, "fsync(", f"<{spool / 'queue' / 'active'}>)", after=last_name))
        replied = first(calls, "sendto(", f'"250 2.0.0 Ok: queued as {id.split(".")[1]}\\r\\n"')
        assert max(d.end for d in dir_syncs) < replied.start, (dir_syncs, replied)
    assert list((spool / "incoming").iterdir()) == []
    [queued] = (spool / "queue" / "active").glob("*.eml")
    assert queued.read_bytes().endswith(small) and queued.name == small_file.name + ".eml"
