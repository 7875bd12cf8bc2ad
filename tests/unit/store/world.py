"""A relay queue wired to a Maildir store the way ``mailguard.service``
wires them, on a ``task.Clock``, delivering to the in-memory SMTP back-end
of ``mailguard.testing`` (the queue's real ``RelayClient`` talks to it over
``twisted.test.iosim``: bytes in, bytes out, no sockets)."""

from __future__ import annotations

import email
import email.policy
import os
from pathlib import Path

from twisted.internet.task import Clock

from mailguard.policy import build
from mailguard.store.durable import DirSyncer, run_inline
from mailguard.store.maildir import Envelope, MaildirStore
from mailguard.store.notices import Notifier, directory_router
from mailguard.store.queue import RelayQueue
from mailguard.testing import FakeSMTPBackend
from tests.conftest import write_config

T0 = 1_700_000_000.0
BODY = (b"Subject: test\r\nFrom: john@example.com\r\nMessage-ID: <m1@example.com>\r\n\r\n"
        b"Hello.\r\n.leading dot\r\n..two dots\r\n")


class World:
    """The queue (C{queue}), the store (C{store}) and the next hop (C{net})."""

    def __init__(self, tmp_path: Path, **kw) -> None:
        self.path = tmp_path
        self.spool = str(tmp_path / "spool")
        self.config, self.tables = build.load(str(write_config(tmp_path / "mailserver.cfg")))
        self.clock = Clock()
        self.clock.advance(T0)
        self.net = FakeSMTPBackend(hostname="relay.test")
        self.kw = kw
        self.start()

    def start(self) -> None:
        """Build and open the queue and the store, as at start-up."""
        syncer = DirSyncer()
        notices = Notifier("mx.example.com", self.clock, directory_router(self.tables.directory))
        kw = dict(relay_host=("relay.test", 25), hostname="mx.example.com", notices=notices,
                  syncer=syncer, connect=self.net.connect)
        kw.update(self.kw)
        self.queue = RelayQueue(self.spool, self.clock, **kw)
        self.store = MaildirStore(self.spool, run_inline, relay=self.queue, notices=notices, syncer=syncer)
        self.queue.deliver = self.store.inject
        self.store.open()
        self.queue.open()

    def restart(self) -> None:
        self.queue.stopService()
        self.start()
        self.queue.startService()

    def accept(self, sender="john@example.com", relay=("x@remote.test",), local=(), body=BODY,
               mail_params=None, rcpt_params=None) -> str:
        env = Envelope(sender, tuple(local), tuple(relay), mail_params or {}, rcpt_params or {},
                       client_ip="127.0.0.2")
        msg = self.store.begin(env)
        msg.write(body)
        results = []
        msg.commit().addBoth(results.append)
        assert results == [env.message_id], results
        return env.message_id

    def run(self, seconds: float = 0.0) -> None:
        self.net.flush()
        if seconds:
            self.clock.advance(seconds)
        self.net.flush()

    def maildir(self, mailbox: str) -> list[Path]:
        local, domain = mailbox.split("@")
        new = Path(self.spool) / "mail" / domain / local / "Maildir" / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def active(self) -> list[str]:
        return sorted(os.listdir(self.queue.disk.active))


def parse_report(data: bytes):
    """A DSN's message, its parts, its per-message block and its
    per-recipient blocks (asserting it is an RFC 3464 report)."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    blocks = parts[1].get_payload()
    return msg, parts, blocks[0], blocks[1:]
