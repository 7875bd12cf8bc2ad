"""Durable acceptance (mailguard.store.maildir): the store, its group commit,
and the promise that the 250 after the final dot comes only after the
message file *and* a directory fsync that started after its link.

The kill -9 test with a real twistd is ``tests/e2e/test_durability.py``.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from twisted.internet import defer
from twisted.internet.task import Clock

from mailguard.config import settings as config_mod
from mailguard.store import durable
from mailguard.store.durable import DirSyncer, makedirs_durable, run_inline
from mailguard.store.maildir import Envelope, MaildirStore, ensure_maildir, maildir_path
from tests.conftest import write_config

BODY = b"Subject: test\r\n\r\nHello.\r\n"


def open_store(spool, run=run_inline) -> MaildirStore:
    """A store after its start-up step, as mailguard.service opens it."""
    store = MaildirStore(str(spool), run)
    store.open()
    return store


class ManualRun:
    """A runner whose calls wait until the test lets them run."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def step(self):
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


def test_one_copy_for_many_local_recipients(tmp_path):
    store = open_store(tmp_path)
    env = Envelope("a@b.test", ("john@example.com", "jane@example.com", "john@example.com"))
    msg = store.begin(env)
    msg.write(BODY)
    msg.commit()
    files = [tmp_path / "mail" / "example.com" / u / "Maildir" / "new" / env.message_id for u in ("john", "jane")]
    assert all(f.read_bytes() == BODY for f in files)
    assert files[0].stat().st_ino == files[1].stat().st_ino
    assert files[0].stat().st_nlink == 2  # the incoming name is gone
    assert os.listdir(tmp_path / "incoming") == []


def test_recover_removes_unacknowledged_messages(tmp_path):
    store = open_store(tmp_path)
    msg = store.begin(Envelope("a@b.test", ("john@example.com",)))
    msg.write(b"x" * (msg.SPILL + 1))  # a big message is written as it arrives
    assert len(os.listdir(tmp_path / "incoming")) == 1
    assert MaildirStore(str(tmp_path)).open() == 1
    assert os.listdir(tmp_path / "incoming") == []


def test_the_constructor_touches_nothing_on_disk(tmp_path):
    """Directories are made, and crash leftovers removed, by open() at
    start-up (mailguard.service calls it), never by the constructor."""
    spool = tmp_path / "spool"
    store = MaildirStore(str(spool))
    assert not spool.exists()
    with pytest.raises(RuntimeError, match="open"):
        store.begin(Envelope("a@b.test", ("john@example.com",)))
    assert store.open() == 0
    assert sorted(os.listdir(spool)) == ["incoming", "mail"]
    assert store.open() == 0  # idempotent


def test_relay_recipients_without_a_queue_fail_the_commit(tmp_path):
    store = open_store(tmp_path)
    msg = store.begin(Envelope("a@b.test", ("john@example.com",), ("x@remote.test",)))
    msg.write(BODY)
    failures = []
    msg.commit().addErrback(failures.append)
    assert failures
    # the local link was taken back: no delivery the client was refused
    assert not list((tmp_path / "mail").rglob("new/*"))


def test_makedirs_durable_fsyncs_each_new_parent(tmp_path, monkeypatch):
    synced = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(p), real(p)))
    assert makedirs_durable(str(tmp_path / "a" / "b" / "c"))
    assert synced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    synced.clear()
    assert not makedirs_durable(str(tmp_path / "a" / "b" / "c"))
    assert synced == []


def test_maildir_layout(tmp_path):
    md = maildir_path(str(tmp_path), "john@example.com")
    assert md == str(tmp_path / "mail" / "example.com" / "john" / "Maildir")
    ensure_maildir(md)
    assert sorted(os.listdir(md)) == ["cur", "new", "tmp"]
    # no way out of the spool
    assert maildir_path(str(tmp_path), "../x@..").startswith(str(tmp_path / "mail"))
    assert "/../" not in maildir_path(str(tmp_path), "..@example.com")


def test_messages_are_private(tmp_path):
    store = open_store(tmp_path)
    env = Envelope("a@b.test", ("john@example.com",))
    msg = store.begin(env)
    msg.write(BODY)
    msg.commit()
    path = tmp_path / "mail" / "example.com" / "john" / "Maildir" / "new" / env.message_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("size", [10, 600 * 1024])
def test_abort_leaves_nothing(tmp_path, size):
    store = open_store(tmp_path)
    msg = store.begin(Envelope("a@b.test", ("john@example.com",)))
    msg.write(b"x" * size)
    msg.abort()
    assert os.listdir(tmp_path / "incoming") == []
    assert not list((tmp_path / "mail").rglob("new/*"))


@pytest.mark.parametrize("chunks", [[BODY], [b"a" * 400000, b"b" * 400000, b"c\r\n"]])
def test_small_and_large_messages_are_stored_whole(tmp_path, chunks):
    store = open_store(tmp_path)
    env = Envelope("a@b.test", ("john@example.com",))
    msg = store.begin(env)
    for c in chunks:
        msg.write(c)
    assert (os.listdir(tmp_path / "incoming") != []) == (sum(map(len, chunks)) > msg.SPILL)
    ids = []
    msg.commit().addCallback(ids.append)
    assert ids == [env.message_id]
    path = tmp_path / "mail" / "example.com" / "john" / "Maildir" / "new" / env.message_id
    assert path.read_bytes() == b"".join(chunks)
    assert os.listdir(tmp_path / "incoming") == []


# --- group commit -----------------------------------------------------------------

class GatedFsync:
    """An fsync that records each call and blocks until the test opens it."""

    def __init__(self):
        self.calls = []
        self.gates = []
        self.lock = threading.Lock()

    def __call__(self, path):
        gate = threading.Event()
        with self.lock:
            self.calls.append(path)
            self.gates.append(gate)
        assert gate.wait(10)

    def open(self, n):
        self.gates[n].set()


def _wait(predicate):
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_group_commit_shares_directory_fsyncs():
    fsync = GatedFsync()
    syncer = DirSyncer(fsync)
    done = []

    def client(n):
        syncer.sync("/d")
        done.append(n)

    a = threading.Thread(target=client, args=("a",))
    a.start()
    _wait(lambda: len(fsync.calls) == 1)  # a runs the first fsync
    # b and c link while it runs: they must not ride on it (it may have
    # missed their links) but share the next one.
    b = threading.Thread(target=client, args=("b",))
    c = threading.Thread(target=client, args=("c",))
    b.start()
    c.start()
    _wait(lambda: syncer.requests == 3)
    time.sleep(0.05)
    assert done == [] and len(fsync.calls) == 1
    fsync.open(0)
    _wait(lambda: done == ["a"] and len(fsync.calls) == 2)
    time.sleep(0.05)
    assert done == ["a"]
    fsync.open(1)
    for t in (a, b, c):
        t.join(10)
    assert sorted(done) == ["a", "b", "c"]
    assert (syncer.requests, syncer.fsyncs) == (3, 2)


def test_group_commit_errors_reach_every_waiter_of_that_fsync():
    calls = []

    def failing(path):
        calls.append(path)
        time.sleep(0.05)
        raise OSError(5, "EIO")

    syncer = DirSyncer(failing)
    errors = []

    def client():
        try:
            syncer.sync("/d")
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 5
    assert 1 <= len(calls) <= 5


def test_group_commit_keeps_directories_apart():
    seen = []
    syncer = DirSyncer(seen.append)
    syncer.sync_all(["/b", "/a", "/b"])
    assert seen == ["/a", "/b"]


def test_group_commit_under_real_threads(tmp_path):
    """Many threads, a real directory: every sync returns, far fewer fsyncs
    than requests when they overlap."""
    syncer = DirSyncer()
    (tmp_path / "d").mkdir()
    threads = [threading.Thread(target=lambda: [syncer.sync(str(tmp_path / "d")) for _ in range(20)])
               for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert syncer.requests == 200 and syncer.fsyncs <= 200


# --- the promise on the wire ------------------------------------------------------------

def _session(tmp_path, run):
    from mailguard.testing import connect, make_context

    config = config_mod.load(str(write_config(tmp_path / "mailserver.cfg")))
    store = open_store(tmp_path / "spool", run)
    ctx = make_context(config, clock=Clock(), spool=str(tmp_path / "spool"), store=store)
    proto, transport = connect(ctx, "127.0.0.3")
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\n"
                       b"DATA\r\n")
    assert transport.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    transport.clear()
    return store, proto, transport


def test_the_250_comes_after_the_file_and_directory_fsyncs(tmp_path, monkeypatch):
    """The protocol, the real store, and a runner the test steps: the reply
    to the final dot is written only after the message file's fsync and
    then the fsync of the Maildir's new/ (which saw the link)."""
    run = ManualRun()
    store, proto, transport = _session(tmp_path, run)
    events = []
    real_fsync, real_dir = os.fsync, durable.fsync_dir

    def file_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            events.append(("file", transport.value()))
        real_fsync(fd)

    def dir_fsync(path):
        linked = os.listdir(path)
        events.append(("dir", transport.value(), path.endswith(os.path.join("Maildir", "new")), linked))
        real_dir(path)

    monkeypatch.setattr(os, "fsync", file_fsync)
    monkeypatch.setattr(durable, "fsync_dir", dir_fsync)
    proto.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert transport.value() == b""
    [(f, args, _)] = run.calls
    assert f.__name__ == "_inject_file"
    run.step()
    assert all(e[1] == b"" for e in events)  # nothing was answered during any
    file_at = [i for i, e in enumerate(events) if e[0] == "file"]
    new_at = [i for i, e in enumerate(events) if e[0] == "dir" and e[2]]
    assert len(file_at) == 1 and len(new_at) == 1 and file_at[0] < new_at[0]
    assert len(events[new_at[0]][3]) == 1  # new/ was fsynced with the link in it
    assert transport.value().startswith(b"250 2.0.0 ")
    assert transport.value().endswith(b"250 2.0.0 OK\r\n")  # the pipelined NOOP, after


def test_a_failed_directory_fsync_is_a_4xx_and_takes_the_links_back(tmp_path, monkeypatch):
    run = ManualRun()
    store, proto, transport = _session(tmp_path, run)

    def broken(path):
        raise OSError(5, "EIO")

    monkeypatch.setattr(durable, "fsync_dir", broken)
    proto.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    run.step()
    assert transport.value().startswith(b"452 4.3.1")
    assert not list((tmp_path / "spool" / "mail").rglob("new/*"))
    assert os.listdir(tmp_path / "spool" / "incoming") == []


# --- large messages: early fdatasync while the rest arrives ----------------------------

def _big(tmp_path, run):
    store = open_store(tmp_path, run)
    env = Envelope("a@b.test", ("john@example.com",))
    msg = store.begin(env)
    msg.SYNC_EVERY = 1024 * 1024
    return store, env, msg


def test_a_large_message_is_flushed_while_it_arrives_and_committed_after(tmp_path):
    run = ManualRun()
    store, env, msg = _big(tmp_path, run)
    for _ in range(3):
        msg.write(b"x" * 500_000)  # 1.5 MB: one fdatasync started at 1 MB
    [(f, args, _)] = run.calls
    assert f is os.fdatasync
    ids = []
    msg.commit().addCallback(ids.append)
    assert len(run.calls) == 1  # the commit waits for the flush in flight
    run.step()  # the flush
    [(f, args, _)] = run.calls
    assert f.__name__ == "commit_file"
    run.step()
    assert ids == [env.message_id]
    new = tmp_path / "mail" / "example.com" / "john" / "Maildir" / "new" / env.message_id
    assert new.stat().st_size == 1_500_000
    assert os.listdir(tmp_path / "incoming") == []


def test_abort_waits_for_a_flush_in_flight_before_closing(tmp_path, monkeypatch):
    run = ManualRun()
    store, env, msg = _big(tmp_path, run)
    msg.write(b"x" * 1_100_000)
    [(f, (fd,), _)] = run.calls
    closed = []
    real_close = os.close
    monkeypatch.setattr(os, "close", lambda n: (closed.append(n), real_close(n)))
    msg.abort()
    assert closed == [] and len(os.listdir(tmp_path / "incoming")) == 1  # fd still open
    run.step()  # the fdatasync runs on a descriptor that is still the message's
    assert closed == [fd]
    assert os.listdir(tmp_path / "incoming") == []


def test_a_failed_early_flush_fails_the_commit(tmp_path):
    """A write-back error is reported once: the flush that saw it must fail
    the message, even if the final fsync then succeeds."""
    run = ManualRun()
    store, env, msg = _big(tmp_path, run)
    msg.write(b"x" * 1_100_000)
    f, args, d = run.calls.pop(0)
    d.errback(OSError(5, "EIO"))
    msg.write(b"y\r\n")
    failures = []
    msg.commit().addErrback(failures.append)
    assert run.calls == [] and len(failures) == 1 and failures[0].check(OSError)
    assert os.listdir(tmp_path / "incoming") == []
    assert not list((tmp_path / "mail").rglob("new/*"))


def test_a_failed_file_fsync_leaves_nothing_in_incoming(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    msg = store.begin(Envelope("a@b.test", ("john@example.com",)))
    msg.write(BODY)

    def broken(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fsync", broken)
    failures = []
    msg.commit().addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(OSError)
    assert os.listdir(tmp_path / "incoming") == []
    assert not list((tmp_path / "mail").rglob("new/*"))
