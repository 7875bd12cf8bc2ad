"""The spool belongs to the user mailguard runs as.

twistd reads the configuration and calls ``makeService`` as root, then
forks, binds, and only then drops to ``--uid``/``--gid``.  What
``makeService`` creates -- the spool, ``incoming``, ``mail``, the queue's
directories, a security log's directory -- is root's, mode 0700, and the
run-time user could write none of it: every message would get ``452
4.3.1``.  L{give} hands the spool to that user (as Postfix's
``set-permissions`` does for its queue) and L{check} then verifies, as that
user, that every path mailguard writes is writable: a problem is a
L{SpoolError} naming the path and the user.

Root changing owners in a tree the run-time user could write is the
classic hard-link trap (a link to ``/etc/shadow`` planted in the spool):
nothing is followed, every change is made through a descriptor whose
inode was checked, and a file with links elsewhere is left alone.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from mailguard.store.durable import missing_dirs

__all__ = ["RunAs", "SpoolError", "check", "give", "give_log", "run_as"]


class SpoolError(Exception):
    """A path mailguard must write that the run-time user cannot: the
    message is the one line to print."""


@dataclass(frozen=True)
class RunAs:
    """The user and group mailguard's process runs as once started."""

    uid: int
    gid: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"

    @property
    def switches(self) -> bool:
        """True when this process (root) will drop to another user."""
        return os.geteuid() == 0 and (self.uid, self.gid) != (0, 0)


def run_as(uid: int | None = None, gid: int | None = None) -> RunAs:
    """The run-time user: twistd's C{--uid}/C{--gid} when given (the group
    defaulting to the user's, as twistd does), else this process's."""
    if uid is None and gid is None:
        uid, gid = os.geteuid(), os.getegid()
    elif uid is None:
        uid = os.geteuid()
    entry = _passwd(uid)
    if gid is None:
        gid = entry.pw_gid if entry else os.getegid()
    return RunAs(uid, gid, entry.pw_name if entry else f"uid {uid}")


def _passwd(uid: int):
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


# -- giving the spool to the user ----------------------------------------------------------

def give(spool: str, user: RunAs, file_dirs: tuple[str, ...] = ()) -> list[str]:
    """Make C{user} the owner of C{spool}, of every directory in it, and of
    the files mailguard reads or rewrites there: those at its top (the
    security log) and those under each of C{file_dirs} (the queue) -- only
    when this process is root and will drop to C{user}.  Message files in
    the Maildirs are left as they are: mailguard only ever adds new ones,
    and not looking at them keeps a start on a spool of 100,000 messages
    fast.  Returns the files left alone because they have links elsewhere.
    """
    if not user.switches:
        return []
    top = os.path.abspath(spool)
    entries = list(_walk(top, tuple(os.path.abspath(d) for d in file_dirs)))
    links: dict[tuple[int, int], int] = {}
    for _, st in entries:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            links[key] = links.get(key, 0) + 1
    left = []
    for path, st in entries:
        if (st.st_uid, st.st_gid) == (user.uid, user.gid):
            continue
        seen = links.get((st.st_dev, st.st_ino), 1)
        if not _chown(path, st, user, links=seen):
            if stat.S_ISREG(st.st_mode):
                left.append(path)
    return left


def give_log(path: str, user: RunAs, spool: str) -> list[str]:
    """The security log outside the spool: create its directory if
    missing (the user's, then), and give the user the log and its rotated
    generations (C{path.1}, ...).  An existing directory is not changed:
    L{check} says if the user cannot write there.  Returns the paths left
    alone (links elsewhere)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        created = _makedirs(directory)
    except OSError as e:
        raise SpoolError(f"--security-log {path}: cannot create {e.filename or directory}: "
                         f"{(e.strerror or str(e)).lower()} (running as {run_as()})") from None
    if not user.switches or _under(path, os.path.abspath(spool)):
        return []
    for d in created:
        _chown(d, os.lstat(d), user, links=1)
    left = []
    pattern = re.compile(re.escape(os.path.basename(path)) + r"(\.\d+)?")
    for name in sorted(os.listdir(directory)):
        if not pattern.fullmatch(name):
            continue
        full = os.path.join(directory, name)
        st = os.lstat(full)
        if (st.st_uid, st.st_gid) != (user.uid, user.gid) and not _chown(full, st, user, links=1):
            left.append(full)
    return left


def _walk(top: str, file_dirs: tuple[str, ...]) -> Iterator[tuple[str, os.stat_result]]:
    """C{top} and every directory under it, and the files directly in
    C{top} or anywhere under C{file_dirs}, with their lstat.  Symbolic
    links are never followed; other files are not even looked at (the
    directory entry's type says what it is, without a stat)."""
    yield top, os.lstat(top)
    stack = [(top, True)]
    while stack:
        directory, with_files = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    yield entry.path, st
                    stack.append((entry.path, any(_under(entry.path, d) for d in file_dirs)))
                elif with_files:
                    yield entry.path, entry.stat(follow_symlinks=False)


def _chown(path: str, st: os.stat_result, user: RunAs, *, links: int) -> bool:
    """Change the owner of the directory or regular file C{path}, if it is
    still the inode C{st} describes and has exactly C{links} links."""
    is_dir = stat.S_ISDIR(st.st_mode)
    if not (is_dir or stat.S_ISREG(st.st_mode)):
        return False
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return False  # gone, or replaced meanwhile
        raise
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        if not is_dir and now.st_nlink != links:
            return False
        os.fchown(fd, user.uid, user.gid)
        return True
    finally:
        os.close(fd)


def _makedirs(directory: str) -> list[str]:
    """Create C{directory} and missing parents (mode 0750); the ones
    created, top first."""
    created = []
    for d in missing_dirs(directory):
        try:
            os.mkdir(d, 0o750)
            created.append(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d) from None
    return created


def _under(path: str, top: str) -> bool:
    return os.path.commonpath([path, top]) == top


# -- checking, as the user ------------------------------------------------------------------

def check(user: RunAs, dirs: list[tuple[str, str]], files: list[tuple[str, str, bool]] = ()) -> None:
    """Raise L{SpoolError} unless C{user} can write each directory and
    file (and reach it).  C{dirs}: (option, path); C{files}: (option,
    path, whether its directory must be writable too -- to rotate it).
    Checked with C{user}'s effective ids, so ACLs, read-only mounts and
    every parent directory count."""
    with _acting_as(user):
        for option, path in dirs:
            _reachable(option, path, user)
            if not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
                raise SpoolError(_cannot(path, "write", user, option))
        for option, path, rotates in files:
            directory = os.path.dirname(os.path.abspath(path))
            _reachable(option, directory, user)
            if os.path.exists(path) and not os.access(path, os.W_OK, effective_ids=True):
                raise SpoolError(_cannot(path, "write", user, option))
            if (rotates or not os.path.exists(path)) and not os.access(
                    directory, os.W_OK | os.X_OK, effective_ids=True):
                why = "to rotate " + os.path.basename(path) if rotates else "to create " + os.path.basename(path)
                raise SpoolError(_cannot(directory, f"write ({why})", user, option))


def _reachable(option: str, path: str, user: RunAs) -> None:
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        above = os.sep.join(parts[:i]) or os.sep
        if not os.access(above, os.X_OK, effective_ids=True):
            raise SpoolError(_cannot(above, f"enter (it is above {path})", user, option))


def _cannot(path: str, what: str, user: RunAs, option: str) -> str:
    return (f"{option} {path}: {user} cannot {what}: give it to that user "
            f"(chown/chmod) or choose another {option}")


@contextmanager
def _acting_as(user: RunAs):
    """Take C{user}'s effective ids (and groups) for a moment, when this
    process is root and will switch to them."""
    if not user.switches:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    try:
        extra = os.getgrouplist(user.name, user.gid) if _passwd(user.uid) else [user.gid]
    except (KeyError, OSError):
        extra = [user.gid]
    os.setgroups(extra)
    os.setegid(user.gid)
    os.seteuid(user.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)

