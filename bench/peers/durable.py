"""The durable write every benchmark peer does before its ``250``.

Shared by ``aiosmtpd_durable.py`` and ``twisted_durable.py`` so that both
peers pay exactly the same disk cost as each other, and the same kind of
cost as mailguard (``mailguard/delivery.py``):

- the message is written to ``MAILDIR/tmp/<unique>``;
- the file is fsynced and closed;
- it is renamed into ``MAILDIR/new/`` (mailguard hard-links from its
  ``incoming/`` spool instead: the same one directory-entry operation);
- ``MAILDIR/new`` is fsynced, so the name survives a crash;
- only then does the caller send ``250``.

One fsync of the file and one of ``new/`` per message, as mailguard does
for a message to one local mailbox.  Postfix does one fsync of the queue
file and no directory fsync.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

_counter = itertools.count()
_HOST = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"


def ensure_maildir(maildir: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)


def unique_name() -> str:
    t = time.time()
    return f"{int(t)}.M{int((t % 1) * 1e6):06d}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_tmp(maildir: str) -> tuple[int, str]:
    """Create a new file in ``tmp/``: (fd, name)."""
    name = unique_name()
    fd = os.open(os.path.join(maildir, "tmp", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return fd, name


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def commit(maildir: str, fd: int, name: str) -> str:
    """Blocking: fsync, close, rename into ``new/``, fsync ``new/``."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    new = os.path.join(maildir, "new")
    os.rename(os.path.join(maildir, "tmp", name), os.path.join(new, name))
    fsync_dir(new)
    return name


def abort(maildir: str, fd: int | None, name: str) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(os.path.join(maildir, "tmp", name))
    except OSError:
        pass


def deliver(maildir: str, data: bytes) -> str:
    """Blocking: the whole durable write of one message held in memory."""
    fd, name = open_tmp(maildir)
    try:
        write_all(fd, data)
    except BaseException:
        abort(maildir, fd, name)
        raise
    return commit(maildir, fd, name)
