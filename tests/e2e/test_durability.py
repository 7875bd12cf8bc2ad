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
order of operations; the fsyncs themselves are proved by
``tests/unit/store/test_queue.py::test_no_250_before_the_directory_fsync`` and the
group-commit tests.)
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time
from pathlib import Path

from tests.conftest import free_port, write_config

SESSIONS = 10
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
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(load.acked) < 150:
        time.sleep(0.02)
    server.kill9()
    load.stop.set()
    for t in threads:
        t.join(15)
    with load.lock:
        acked = set(load.acked)
    assert len(acked) >= 50, "the load run was too short to mean anything"
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
