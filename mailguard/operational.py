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

from twisted.python.failure import Failure

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


def describe(error: OSError) -> str:
    """``No space left on device (ENOSPC): /spool/incoming/1234`` -- the
    errno text, its name and the path, on one line."""
    name = errno.errorcode.get(error.errno or 0, "")
    text = error.strerror or str(error)
    out = f"{text} ({name})" if name else text
    paths = [p for p in (error.filename, getattr(error, "filename2", None)) if p]
    if paths:
        out += ": " + " -> ".join(str(p) for p in paths)
    return " ".join(out.split())


def named(error: OSError, path: str) -> OSError:
    """C{error} with C{path} as its file name if it has none: a write or an
    fsync on a descriptor does not say which file failed, and the one log
    line about it must."""
    if error.filename is None:
        error.filename = path
    return error


def report(logger, failure: Failure | None, what: str, then: str, /, **fields) -> None:
    """Log C{failure} (by default the exception being handled) under
    C{what}: one error line ending with C{then} -- what happens next -- for
    an expected operational error; with its traceback for anything else.

    C{what} and C{then} are C{twisted.logger} formats (C{fields} fill
    them); the error's own text goes in a field, so a path with braces in
    it cannot break the line.
    """
    if failure is None:
        failure = Failure()
    if is_operational(failure.value):
        logger.error(what + ": {error}; " + then, error=describe(failure.value), **fields)
    else:
        logger.failure(what, failure, **fields)
