"""Build a real ``ServerContext`` for protocol unit tests, and drive sessions
over a ``StringTransport`` with a ``task.Clock``.

Everything here is real (configuration loaded with ``mailguard.config.settings.load``,
the real policies, a ``MaildirStore`` in a temporary directory running its
disk work inline) except the clock and the transport.
"""

from __future__ import annotations

import base64
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from mailguard.config import settings as config_mod
from mailguard import testing
from mailguard.store.maildir import run_inline
from mailguard.smtpd.factory import MailguardFactory, ServerContext
from mailguard.smtpd.seclog import SecurityLog
from tests.conftest import USERS, write_config  # noqa: F401  (re-exported for tests)


def make_context(tmp_path: Path, variables: dict[str, str] | None = None, *, users=USERS,
                 clock=None, tls=None, recipients=None, passwords=True, store=None) -> ServerContext:
    """A ServerContext built the way ``mailguard.service`` builds it, on a
    Clock and a Maildir store under C{tmp_path}, from L{write_config}."""
    cfg = config_mod.load(str(write_config(tmp_path / "mailserver.cfg", variables, users=users)))
    overrides = {"tls": tls, "run_blocking": run_inline}
    if recipients is not None:
        overrides["recipients"] = recipients
    if store is not None:
        overrides["store"] = store
    if not passwords:
        overrides["passwords"] = None
    ctx = testing.make_context(cfg, clock=clock, spool=str(tmp_path / "spool"), **overrides)
    ctx.security_log = SecurityLog(str(tmp_path / "security.log"), ctx.clock, threaded=False)
    return ctx


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the call and the
    bytes written before it, so a test can tell plaintext from TLS."""

    tls_context = None
    before_tls = b""

    def startTLS(self, contextFactory, normal=True):
        self.before_tls = self.value()
        self.clear()
        self.tls_context = contextFactory


class Session:
    """One client session over a StringTransport."""

    def __init__(self, ctx: ServerContext, listener: str = "smtp", ip: str = "127.0.0.3",
                 port: int = 40000, transport_class=TLSStringTransport):
        self.ctx = ctx
        self.factory = MailguardFactory(ctx, listener)
        addr = IPv4Address("TCP", ip, port)
        self.transport = transport_class(peerAddress=addr)
        self.proto = self.factory.buildProtocol(addr)
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes | str) -> bytes:
        """Feed bytes; return (and clear) what the server wrote."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def cmd(self, line: str) -> bytes:
        return self.send(line + "\r\n")

    def codes(self, out: bytes) -> list[str]:
        """The code (with enhanced code) of every final reply line in C{out}."""
        return [" ".join(line.split(" ")[:2]) for line in out.decode().split("\r\n")
                if line[:3].isdigit() and line[3:4] == " "]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.proto.connectionLost(None)


def connect(ctx: ServerContext, listener: str = "smtp", ip: str = "127.0.0.3", **kw) -> tuple[Session, bytes]:
    """A session and its greeting."""
    s = Session(ctx, listener, ip, **kw)
    return s, s.take()


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def maildir_messages(ctx: ServerContext, mailbox: str) -> list[bytes]:
    local, domain = mailbox.split("@")
    new = Path(ctx.store.spool) / "mail" / domain / local / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def body_of(message: bytes) -> bytes:
    """The stored message without the Return-Path and Received headers
    mailguard prepends."""
    assert message.startswith(b"Return-Path: <")
    message = message[message.index(b"\r\n") + 2:]
    assert message.startswith(b"Received: ")
    # The header ends with ";" CRLF TAB date CRLF (the body may itself
    # start with whitespace, so folding cannot tell where it ends).
    date = message.index(b";\r\n\t") + 4
    return message[message.index(b"\r\n", date) + 2:]


class LogCapture:
    """Every twisted.logger event while active, raw and formatted."""

    def __init__(self):
        self.events: list[dict] = []

    def __call__(self, event):
        self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

    def text(self) -> str:
        """Everything an observer could write: formatted messages, every
        field's repr, and any failure's traceback."""
        out = []
        for e in self.events:
            out.append(formatEvent(e) or "")
            out.append(repr(e))
            f = e.get("log_failure")
            if f is not None:
                out.append(f.getTraceback())
        return "\n".join(out)
