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


def watch_waits(monkeypatch) -> list[str]:
    """The names of the threads that wait on a L{DirSyncer}'s condition, in
    order.  A thread in that list is blocked until an fsync ends (Python's
    Condition has no spurious wake-ups), so a test can tell "waiting" from
    "not yet there" without sleeping."""
    waits: list[str] = []

    class Watched(threading.Condition):
        def wait(self, timeout=None):
            waits.append(threading.current_thread().name)
            return super().wait(timeout)

    class WatchedState(durable._DirState):
        __slots__ = ()

        def __init__(self, lock):
            super().__init__(lock)
            self.cond = Watched(lock)

    monkeypatch.setattr(durable, "_DirState", WatchedState)
    return waits


def test_group_commit_shares_directory_fsyncs(monkeypatch):
    waits = watch_waits(monkeypatch)
    fsync = GatedFsync()
    syncer = DirSyncer(fsync)
    done = []

    def client(n):
        syncer.sync("/d")
        done.append(n)

    a = threading.Thread(target=client, args=("a",), name="a")
    a.start()
    _wait(lambda: len(fsync.calls) == 1)  # a runs the first fsync
    # b and c link while it runs: they must not ride on it (it may have
    # missed their links) but share the next one.
    b = threading.Thread(target=client, args=("b",), name="b")
    c = threading.Thread(target=client, args=("c",), name="c")
    b.start()
    c.start()
    _wait(lambda: sorted(waits) == ["b", "c"])  # both blocked on the condition
    assert done == [] and len(fsync.calls) == 1 and syncer.requests == 3
    fsync.open(0)
    # a returns; one of b and c runs the second fsync, the other waits again
    _wait(lambda: done == ["a"] and len(fsync.calls) == 2 and len(waits) == 3)
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
        _wait(lambda: syncer.requests == 5)  # everyone asked while the first one ran
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
    # the first fsync's error is its caller's; the four that asked while
    # it ran share the second one, and its error
    assert len(calls) == 2


def test_group_commit_keeps_directories_apart():
    seen = []
    syncer = DirSyncer(seen.append)
    syncer.sync_all(["/b", "/a", "/b"])
    assert seen == ["/a", "/b"]


def test_group_commit_under_real_threads(tmp_path):
    """Real threads, a real directory: in each round ten threads ask at
    once; the first fsync is held until all have asked, so the other nine
    share the second.  Two fsyncs per round, where one per request would
    be ten."""
    threads_n, rounds = 10, 20
    path = str(tmp_path / "d")
    os.mkdir(path)

    def held_fsync(p):
        asked = syncer.requests
        round_end = -(-asked // threads_n) * threads_n  # the round this call belongs to
        _wait(lambda: syncer.requests >= round_end)
        durable.fsync_dir(p)

    syncer = DirSyncer(held_fsync)
    barrier = threading.Barrier(threads_n, timeout=30)

    def client():
        for _ in range(rounds):
            syncer.sync(path)
            barrier.wait()

    threads = [threading.Thread(target=client) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert (syncer.requests, syncer.fsyncs) == (threads_n * rounds, 2 * rounds)


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


class RecordingFileSystem:
    """An injected file-system layer: C{os.write}, C{os.fsync}, C{os.link}
    and C{os.rename} as the store and the queue call them, each recorded
    under the spool with what the client had been sent at that moment."""

    def __init__(self, monkeypatch, spool: str, transport) -> None:
        self.calls: list[tuple] = []
        self.spool, self.transport = spool, transport
        for name in ("write", "fsync", "link", "rename"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def call(*args):
            paths = [os.readlink(f"/proc/self/fd/{a}") if name in ("write", "fsync") and i == 0 else a
                     for i, a in enumerate(args[:2] if name in ("link", "rename") else args[:1])]
            if all(isinstance(p, str) and p.startswith(self.spool) for p in paths):
                self.calls.append((name, *(os.path.relpath(p, self.spool) for p in paths), self.transport.value()))
            return real(*args)
        return call

    def index(self, *call) -> int:
        """Where the first call that is C{call} was made."""
        for i, c in enumerate(self.calls):
            if c[:len(call)] == call:
                return i
        raise AssertionError(f"no {call} in {self.calls}")


def test_the_file_system_calls_behind_a_250_in_order(tmp_path, monkeypatch):
    """The promise through an injected file-system layer, for a message to
    a local mailbox and a relayed recipient (the queue's files too): the
    message is written and fsynced, then linked; the queue's envelope is
    written, fsynced and renamed into place; the directories are fsynced
    after those names exist; and not one of these calls saw a reply sent.
    The 250 comes after the last."""
    from mailguard.testing import connect, make_context
    from tests.unit.store.world import World

    world = World(tmp_path)
    world.queue.startService()
    ctx = make_context(world.config, clock=world.clock, spool=world.spool, store=world.store, queue=world.queue)
    s = connect(ctx, "127.0.0.2")  # trusted: may relay
    s.take()
    s.cmd("EHLO client.test")
    s.send("MAIL FROM:<john@example.com>\r\nRCPT TO:<jane@example.com>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n")
    s.take()
    fs = RecordingFileSystem(monkeypatch, os.path.realpath(world.spool) + os.sep, s.transport)
    out = s.send(b"Subject: order\r\n\r\nbody\r\n.\r\n")
    monkeypatch.undo()
    [stored] = os.listdir(tmp_path / "spool" / "mail" / "example.com" / "jane" / "Maildir" / "new")
    incoming, new = f"incoming/{stored}", "mail/example.com/jane/Maildir/new"
    [env_tmp] = {c[1] for c in fs.calls if c[0] == "write" and c[1].startswith("queue/tmp/")}
    order = [fs.index("write", incoming), fs.index("fsync", incoming)]
    assert order == sorted(order)
    linked = [fs.index("link", incoming, f"{new}/{stored}"), fs.index("link", incoming, f"queue/active/{stored}.eml")]
    assert min(linked) > order[-1]  # linked only once fsynced
    envelope = [fs.index("write", env_tmp), fs.index("fsync", env_tmp),
                fs.index("rename", env_tmp, f"queue/active/{stored}.env")]
    assert envelope == sorted(envelope)
    assert fs.index("fsync", new) > max(linked)
    assert fs.index("fsync", "queue/active") > max(linked[1], envelope[-1])
    assert all(c[-1] == b"" for c in fs.calls)  # nothing was answered during any of them
    assert s.codes(out) == ["250 2.0.0"]
    world.queue.stopService()


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
