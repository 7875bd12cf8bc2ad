"""The spool is given to the run-time user, and checked as that user.

These change owners and effective ids, so they run as root (as the
start-up they test does); elsewhere they are skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mailguard.store.ownership import RunAs, SpoolError, check, give, give_log, run_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changes owners and ids: needs root")

NOBODY = RunAs(65534, 65534, "nobody")


@pytest.fixture
def public():
    """A directory nobody can enter (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mailguard-own-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def fresh_spool(root: Path) -> Path:
    """What makeService leaves as root: directories 0700 and a few files."""
    spool = root / "spool"
    for d in ("incoming", "mail/example.com/john/Maildir/new", "queue/active", "queue/tmp"):
        (spool / d).mkdir(parents=True, mode=0o700)
    (spool / "queue/active/Q1.env").write_text("{}")
    (spool / "security.log").write_text("old\n")
    return spool


def test_run_as():
    assert run_as() == RunAs(os.geteuid(), os.getegid(), "root")
    assert run_as(65534) == NOBODY  # the group: the user's, as twistd does
    assert run_as(65534, 0) == RunAs(65534, 0, "nobody")
    assert run_as(None, 65534) == RunAs(0, 65534, "root")
    assert run_as(54321) == RunAs(54321, os.getegid(), "uid 54321")
    assert str(NOBODY) == "nobody (uid 65534, gid 65534)"
    assert NOBODY.switches and not RunAs(0, 0, "root").switches


def given(spool: Path, user: RunAs = NOBODY) -> list[str]:
    return give(str(spool), user, (str(spool / "queue"),))


def test_a_fresh_spool_becomes_the_users(public):
    spool = fresh_spool(public)
    assert given(spool) == []
    everything = [spool, *spool.rglob("*")]
    assert len(everything) == 12
    assert {owner(p) for p in everything} == {(65534, 65534)}
    assert owner(public) == (0, 0)  # only the spool and what is in it


def test_nothing_changes_when_no_user_switch_follows(public, monkeypatch):
    spool = fresh_spool(public)
    assert given(spool, RunAs(0, 0, "root")) == []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: twistd will not switch
    assert given(spool) == []
    assert {owner(p) for p in [spool, *spool.rglob("*")]} == {(0, 0)}


def test_symbolic_links_are_never_followed(public):
    spool = fresh_spool(public)
    outside = public / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    (spool / "mail" / "link-to-dir").symlink_to(outside)
    (spool / "queue" / "active" / "link-to-file").symlink_to(outside / "secret")
    given(spool)
    assert owner(outside) == owner(outside / "secret") == (0, 0)
    assert owner(spool / "mail" / "link-to-dir") == (0, 0)  # the link itself is left alone too


def test_a_file_with_links_elsewhere_is_left_alone(public):
    """The hard-link trap: a link to a root file planted in the queue."""
    spool = fresh_spool(public)
    outside = public / "shadow"
    outside.write_text("root:x:0:0\n")
    os.link(outside, spool / "queue" / "active" / "planted")
    # Links that stay inside the queue are fine.
    os.link(spool / "queue/active/Q1.env", spool / "queue" / "tmp" / "also-Q1")
    left = given(spool)
    assert left == [str(spool / "queue" / "active" / "planted")]
    assert owner(outside) == (0, 0)
    assert owner(spool / "queue" / "tmp" / "also-Q1") == owner(spool / "queue/active/Q1.env") == (65534, 65534)


def test_messages_in_maildirs_are_not_looked_at(public):
    """mailguard only adds files to a Maildir: its directories matter, its
    messages (all of a large spool) are left as they are."""
    spool = fresh_spool(public)
    message = spool / "mail/example.com/john/Maildir/new/1.mx"
    message.write_text("Subject: old\n")
    (spool / "incoming" / "left-by-a-crash").write_text("")
    given(spool)
    assert owner(message.parent) == (65534, 65534)
    assert owner(message) == owner(spool / "incoming" / "left-by-a-crash") == (0, 0)


def test_a_security_log_elsewhere(public):
    spool = fresh_spool(public)
    logs = public / "log"
    logs.mkdir()
    # Its directory is created for the user when missing ...
    assert give_log(str(logs / "mailguard" / "security.log"), NOBODY, str(spool)) == []
    assert owner(logs / "mailguard") == (65534, 65534)
    assert owner(logs) == (0, 0)
    # ... and the log and its generations are the user's; nothing else is.
    for name in ("security.log", "security.log.1", "security.log.2", "security.log.bak", "other.log"):
        (logs / name).write_text("x\n")
    assert give_log(str(logs / "security.log"), NOBODY, str(spool)) == []
    assert {name: owner(logs / name) for name in sorted(os.listdir(logs)) if name != "mailguard"} == {
        "other.log": (0, 0), "security.log": (65534, 65534), "security.log.1": (65534, 65534),
        "security.log.2": (65534, 65534), "security.log.bak": (0, 0)}
    assert owner(logs) == (0, 0)
    # Inside the spool, give() has done it.
    assert give_log(str(spool / "security.log"), NOBODY, str(spool)) == []
    assert owner(spool / "security.log") == (0, 0)


def test_check_passes_once_given(public):
    spool = fresh_spool(public)
    dirs = [("--spool", str(spool)), ("--spool", str(spool / "incoming")), ("--spool", str(spool / "queue/tmp"))]
    log = [("--security-log", str(spool / "security.log"), True)]
    with pytest.raises(SpoolError) as e:
        check(NOBODY, dirs, log)
    assert str(e.value) == (f"--spool {spool}: nobody (uid 65534, gid 65534) cannot write: "
                            "give it to that user (chown/chmod) or choose another --spool")
    given(spool)
    check(NOBODY, dirs, log)


def test_check_names_a_directory_above_that_the_user_cannot_enter(public):
    closed = public / "closed"
    closed.mkdir(mode=0o700)
    spool = fresh_spool(closed)
    given(spool)
    with pytest.raises(SpoolError) as e:
        check(NOBODY, [("--spool", str(spool))])
    assert str(e.value) == (f"--spool {closed}: nobody (uid 65534, gid 65534) cannot enter (it is above "
                            f"{spool}): give it to that user (chown/chmod) or choose another --spool")


@pytest.mark.parametrize("exists, writable, rotates, problem", [
    (True, True, False, None),
    (True, True, True, "write (to rotate security.log)"),
    (False, None, False, "write (to create security.log)"),
    (True, False, False, "write"),
])
def test_check_a_security_log_in_a_directory_of_root(public, exists, writable, rotates, problem):
    path = public / "security.log"
    if exists:
        path.write_text("")
        if writable:
            os.chown(path, 65534, 65534)
    try:
        check(NOBODY, [], [("--security-log", str(path), rotates)])
    except SpoolError as e:
        where = path if problem == "write" else public
        assert str(e) == (f"--security-log {where}: nobody (uid 65534, gid 65534) cannot {problem}: "
                          "give it to that user (chown/chmod) or choose another --security-log")
    else:
        assert problem is None


def test_check_gives_root_its_ids_back(public):
    before = (os.geteuid(), os.getegid(), sorted(os.getgroups()))
    with pytest.raises(SpoolError):
        check(NOBODY, [("--spool", str(public))])
    check(NOBODY, [("--spool", "/tmp")])
    assert (os.geteuid(), os.getegid(), sorted(os.getgroups())) == before


def test_a_security_log_directory_is_made_whoever_runs(public):
    spool = fresh_spool(public)
    root = RunAs(0, 0, "root")
    assert give_log(str(public / "logs" / "mg" / "security.log"), root, str(spool)) == []
    assert (public / "logs" / "mg").is_dir() and owner(public / "logs" / "mg") == (0, 0)
    (public / "file").write_text("")
    with pytest.raises(SpoolError) as e:
        give_log(str(public / "file" / "security.log"), root, str(spool))
    assert str(e.value) == (f"--security-log {public / 'file' / 'security.log'}: cannot create "
                            f"{public / 'file'}: not a directory (running as root (uid 0, gid 0))")


def test_a_path_swapped_for_a_link_after_the_walk_is_left_alone(public):
    """Between the walk's lstat and the change, the entry is replaced by a
    symbolic link to the very inode that was seen: still not followed."""
    from mailguard.store import ownership

    target = public / "target"
    target.write_text("x")
    seen = os.lstat(target)
    link = public / "entry"
    link.symlink_to(target)
    assert ownership._chown(str(link), seen, NOBODY, links=1) is False
    assert owner(target) == (0, 0)
    assert ownership._chown(str(target), seen, NOBODY, links=1) is True
    assert owner(target) == (65534, 65534)
