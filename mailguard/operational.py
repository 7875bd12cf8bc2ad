"""Expected operational errors in one log line; tracebacks for bugs only.

A full disk, a quota, a read-only or failing file system, a descriptor
limit: these happen to a healthy mail server, and mailguard handles them
(a ``452 4.3.1``, a retry, nothing half-written).  The administrator needs
one line saying *what* failed, *where* (the path) and *what happens next*
-- a line to grep and alert on.  A traceback says "bug", so it is kept for
errors nobody expected.  (A back-end or relay host that is down is not an
exception at all: the gateway pool and the relay queue log it in one line
themselves.)
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mailguard.logs import Line, emit

__all__ = ["EXPECTED_ERRNOS", "describe", "is_operational", "named", "report"]

# Errors of the machine, not of the code: the disk, quotas, permissions and
# paths an administrator set, limits.  Anything else (EBADF, EINVAL...) is
# a bug.
EXPECTED_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.EMFILE, errno.ENFILE, errno.EMLINK, errno.ENOENT, errno.EISDIR, errno.ENOTDIR,
})


def is_operational(error: BaseException) -> bool:
    """An OSError the machine caused (L{EXPECTED_ERRNOS})."""
    return isinstance(error, OSError) and error.errno in EXPECTED_ERRNOS


def describe(error: OSError) -> tuple[str, str | None]:
    """(``No space left on device (ENOSPC)``, ``/spool/incoming/1234``):
    the errno text and its name, and the path (two joined by ``->``), or
    None."""
    name = errno.errorcode.get(error.errno or 0, "")
    text = " ".join((error.strerror or str(error)).split())
    paths = [str(p) for p in (error.filename, getattr(error, "filename2", None)) if p]
    return (f"{text} ({name})" if name else text), (" -> ".join(paths) or None)


def named(error: OSError, path: str) -> OSError:
    """C{error} with C{path} as its file name if it has none: a write or an
    fsync on a descriptor does not say which file failed, and the one log
    line about it must."""
    if error.filename is None:
        error.filename = path
    return error


def report(logger, failure: Failure | None, event: str, fields: dict[str, Any], then: str) -> None:
    """Log C{failure} (by default the exception being handled) as the
    mailguard event C{event} (L{mailguard.logs.emit}) with C{fields}: for an
    expected operational error, one error line that adds ``error`` (the
    errno text), ``path`` and ``then`` (what happens next); for anything
    else, the same fields and the traceback::

        store-failed session=5f3a9c000001 ip=192.0.2.7 queue=M1P2Q0 error="No space left on device (ENOSPC)" path=/spool/incoming/1.M1P2Q0.mx then="452 4.3.1 sent; the client will retry"
    """
    if failure is None:
        failure = Failure()
    if is_operational(failure.value):
        error, path = describe(failure.value)
        emit(logger, event, {**fields, "error": error, "path": path, "then": then}, LogLevel.error)
    else:
        logger.failure("{mg_line}", failure, mg_line=Line(event, fields), **fields)
