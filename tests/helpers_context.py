"""Build a real ``ServerContext`` for protocol unit tests from a test
``mailserver.cfg`` (``tests/conftest.write_config``).

Everything is real (configuration loaded with ``mailguard.config.settings.load``,
the real policies, a ``MaildirStore`` in a temporary directory running its
disk work inline) except the clock; sessions are driven over a
``StringTransport`` by ``mailguard.testing.connect``.  And what such a
session stored, read back from the spool's Maildirs.
"""

from __future__ import annotations

from pathlib import Path

from mailguard.config import settings as config_mod
from mailguard import testing
from mailguard.store.maildir import run_inline
from mailguard.smtpd.factory import ServerContext
from mailguard.smtpd.seclog import SecurityLog
from tests.conftest import USERS, write_config  # noqa: F401  (re-exported for tests)


# SASL CRAM-MD5 is off by default (SmtpAuthCramMd5Enabled=0); tests of it turn it on.
CRAM_MD5 = {"SmtpAuthCramMd5Enabled": "1"}


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


def maildir_messages(context, mailbox: str) -> list[bytes]:
    """The messages in C{mailbox}'s Maildir C{new/}, oldest name first."""
    local, domain = mailbox.split("@")
    new = Path(context.store.spool) / "mail" / domain / local / "Maildir" / "new"
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
