"""Durable acceptance (mailguard.delivery): the store, its group commit,
and the promise that the 250 after the final dot comes only after the
message file *and* a directory fsync that started after its link.

The kill -9 test with a real twistd is ``tests/test_durability.py``.
"""

from __future__ import annotations

import os
import stat

import pytest

from twisted.internet import defer
from twisted.internet.task import Clock

from mailguard import config as config_mod
from mailguard.delivery import (
    DirSyncer,
    Envelope,
    MaildirStore,
    ensure_maildir,
    maildir_path,
    makedirs_durable,
)
from tests.conftest import write_config

BODY = b"Subject: test\r\n\r\nHello.\r\n"


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


def test_group_commit_shares_directory_fsyncs(tmp_path):
    run = ManualRun()
    syncer = DirSyncer(run)
    fired = []
    syncer.sync(str(tmp_path)).addCallback(lambda _: fired.append(1))
    assert len(run.calls) == 1  # the first starts an fsync at once
    # Two more arrive while it runs: they must wait for a *new* fsync
    # (the running one may have missed their links) and share it.
    syncer.sync(str(tmp_path)).addCallback(lambda _: fired.append(2))
    syncer.sync(str(tmp_path)).addCallback(lambda _: fired.append(3))
    assert len(run.calls) == 1
    run.step()
    assert fired == [1]
    assert len(run.calls) == 1
    run.step()
    assert fired == [1, 2, 3]
    assert (syncer.requests, syncer.fsyncs) == (3, 2)


def test_no_250_before_the_directory_fsync(tmp_path):
    run = ManualRun()
    store = MaildirStore(str(tmp_path), run)
    msg = store.begin(Envelope("a@b.test", ("john@example.com",)))
    msg.write(BODY)
    done = []
    msg.commit().addCallback(done.append)
    run.step()  # file fsync and links
    assert done == [] and len(run.calls) == 1
    f, args, _ = run.calls[0]
    assert f.__name__ == "fsync_dir" and args[0].endswith(os.path.join("Maildir", "new"))
    run.step()
    assert len(done) == 1


def test_one_copy_for_many_local_recipients(tmp_path):
    store = MaildirStore(str(tmp_path))
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
    store = MaildirStore(str(tmp_path))
    msg = store.begin(Envelope("a@b.test", ("john@example.com",)))
    msg.write(b"x" * (msg.SPILL + 1))  # a big message is written as it arrives
    assert len(os.listdir(tmp_path / "incoming")) == 1
    assert MaildirStore(str(tmp_path)).recover() == 1
    assert os.listdir(tmp_path / "incoming") == []


def test_relay_recipients_without_a_queue_fail_the_commit(tmp_path):
    store = MaildirStore(str(tmp_path))
    msg = store.begin(Envelope("a@b.test", ("john@example.com",), ("x@remote.test",)))
    msg.write(BODY)
    failures = []
    msg.commit().addErrback(failures.append)
    assert failures
    # the local link was taken back: no delivery the client was refused
    assert not list((tmp_path / "mail").rglob("new/*"))


def test_group_commit_errors_reach_every_waiter(tmp_path):
    run = ManualRun()
    syncer = DirSyncer(run)
    errors = []
    syncer.sync(str(tmp_path / "missing")).addErrback(errors.append)
    syncer.sync(str(tmp_path / "missing")).addErrback(errors.append)
    run.step()
    run.step()
    assert len(errors) == 2


def test_group_commit_keeps_directories_apart(tmp_path):
    run = ManualRun()
    syncer = DirSyncer(run)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    syncer.sync(str(tmp_path / "a"))
    syncer.sync(str(tmp_path / "b"))
    assert sorted(args[0] for _, args, _ in run.calls) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_makedirs_durable_fsyncs_each_new_parent(tmp_path, monkeypatch):
    synced = []
    import mailguard.delivery as delivery

    real = delivery.fsync_dir
    monkeypatch.setattr(delivery, "fsync_dir", lambda p: (synced.append(p), real(p)))
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
    store = MaildirStore(str(tmp_path))
    env = Envelope("a@b.test", ("john@example.com",))
    msg = store.begin(env)
    msg.write(BODY)
    msg.commit()
    path = tmp_path / "mail" / "example.com" / "john" / "Maildir" / "new" / env.message_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("size", [10, 600 * 1024])
def test_abort_leaves_nothing(tmp_path, size):
    store = MaildirStore(str(tmp_path))
    msg = store.begin(Envelope("a@b.test", ("john@example.com",)))
    msg.write(b"x" * size)
    msg.abort()
    assert os.listdir(tmp_path / "incoming") == []
    assert not list((tmp_path / "mail").rglob("new/*"))


def test_the_250_waits_for_the_fsyncs_on_the_wire(tmp_path):
    """The protocol, the real store and a runner the test steps: the reply
    to the final dot is written only after the file fsync (with the links)
    and then the directory fsync have finished."""
    from mailguard.testing import connect, make_context

    config = config_mod.load(str(write_config(tmp_path / "mailserver.cfg")))
    run = ManualRun()
    store = MaildirStore(str(tmp_path / "spool"), run)
    ctx = make_context(config, clock=Clock(), spool=str(tmp_path / "spool"), store=store)
    proto, transport = connect(ctx, "127.0.0.3")
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\n"
                       b"DATA\r\n")
    assert transport.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    transport.clear()
    proto.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert transport.value() == b""
    assert run.calls[0][0].__name__ == "_inject_file"  # write, fsync, link
    run.step()
    assert transport.value() == b""  # file fsynced and linked: not yet
    assert run.calls[0][0].__name__ == "fsync_dir"
    run.step()
    assert transport.value().startswith(b"250 2.0.0 ")
    assert transport.value().endswith(b"250 2.0.0 OK\r\n")  # the pipelined NOOP, after


def test_a_failed_directory_fsync_is_a_4xx_and_takes_the_links_back(tmp_path):
    from mailguard.testing import connect, make_context

    config = config_mod.load(str(write_config(tmp_path / "mailserver.cfg")))
    run = ManualRun()
    store = MaildirStore(str(tmp_path / "spool"), run)
    ctx = make_context(config, clock=Clock(), spool=str(tmp_path / "spool"), store=store)
    proto, transport = connect(ctx, "127.0.0.3")
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\n"
                       b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    transport.clear()
    run.step()  # commit_file
    f, args, d = run.calls.pop(0)
    d.errback(OSError(5, "EIO"))
    while run.calls:
        run.step()  # the undo
    assert transport.value().startswith(b"452 4.3.1")
    assert not list((tmp_path / "spool" / "mail").rglob("new/*"))


@pytest.mark.parametrize("chunks", [[BODY], [b"a" * 400000, b"b" * 400000, b"c\r\n"]])
def test_small_and_large_messages_are_stored_whole(tmp_path, chunks):
    store = MaildirStore(str(tmp_path))
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
