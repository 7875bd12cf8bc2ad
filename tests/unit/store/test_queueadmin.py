"""Managing the relay queue by hand (mailguard.store.queueadmin and the
control socket's protocol): delete, hold, release and flush on a running
queue, the same on a stopped one's spool, and entries whose files
vanish -- on a Clock, with the in-memory back-end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.internet.testing import StringTransport

from mailguard.store.control import ControlFactory
from mailguard.store.envelope import queue_id
from mailguard.store.queueadmin import offline, read_entries
from mailguard.testing import LogCapture, result_of
from tests.unit.store.world import World


def sent(world) -> list[list[str]]:
    """The recipients of each message the back-end accepted."""
    return [[r[r.index("<") + 1:r.index(">")] for r in t.rcpts] for t in world.net.messages]


def down_with(world, n: int) -> list[str]:
    """n entries, each deferred once (the relay host refuses)."""
    world.net.up = False
    ids = [world.accept(relay=(f"u{i}@remote.test",)) for i in range(n)]
    world.run()
    world.net.up = True
    return ids


def test_delete_forgets_the_entry_and_its_files_without_a_dsn(world):
    a, b = down_with(world, 2)
    with LogCapture() as logs:
        assert result_of(world.queue.delete(queue_id(a))) == [a]
    assert a not in world.queue.entries
    assert not [p for p in world.active() if a in p]
    world.run(300)  # the retry time: only b is tried
    assert sent(world) == [["u1@remote.test"]]
    assert world.maildir("john@example.com") == []  # no DSN for the sender
    assert f"queue-deleted queue={queue_id(a)} from=john@example.com to=u0@remote.test" in logs.text()
    assert result_of(world.queue.delete(a)) == []  # gone for good


def test_delete_during_an_attempt_records_nothing_and_resurrects_nothing(world):
    world.net.silent.add("MAIL")  # the attempt never ends by itself
    mid = world.accept()
    world.run()
    [entry] = world.queue.entries.values()
    assert entry.in_flight
    result_of(world.queue.delete("ALL"))
    assert world.active() == []
    from mailguard.store.entries import Outcome

    world.queue.attempted(entry, Outcome(error="connection lost"))  # the attempt ends now
    assert world.active() == [] and world.queue.entries == {}
    assert not entry.in_flight and mid


def test_hold_is_never_tried_until_release(world):
    a, b = down_with(world, 2)
    assert result_of(world.queue.hold(a)) == [a]
    assert json.loads(Path(world.queue.disk.env_path(a)).read_bytes())["held"] is True
    world.run(300)
    assert sent(world) == [["u1@remote.test"]]
    assert result_of(world.queue.flush()) == []  # a flush leaves it held
    assert world.queue.kick(None) == 0  # and so does ETRN
    world.run(100000)
    assert len(world.net.messages) == 1
    assert result_of(world.queue.release(queue_id(a))) == [a]
    world.run()  # released: tried at once
    assert sent(world)[-1] == ["u0@remote.test"]
    assert world.active() == []


def test_held_survives_a_restart(world):
    [a] = down_with(world, 1)
    result_of(world.queue.hold(a))
    world.restart()
    world.run(1000)
    assert world.net.messages == [] and world.queue.entries[a].held
    result_of(world.queue.release("ALL"))
    world.run()
    assert len(world.net.messages) == 1


def test_flush_by_id_domain_and_all_ends_a_suspension(world):
    world.net.up = False
    a = world.accept(relay=("x@one.test",))
    b = world.accept(relay=("y@sub.two.test",))
    c = world.accept(relay=("z@three.test",))
    world.run()
    world.net.up = True
    assert result_of(world.queue.flush(queue_id(a))) == [a]
    world.run()
    assert sent(world) == [["x@one.test"]]
    assert result_of(world.queue.flush("two.test")) == []  # not a subdomain match
    assert result_of(world.queue.flush("@two.test")) == [b]
    world.run()
    assert result_of(world.queue.flush()) == [c]
    world.run()
    assert len(world.net.messages) == 3 and world.active() == []


def test_a_message_file_removed_by_hand_is_dropped_not_retried(world):
    """No "cannot read the queued message" loop, no .env rewritten."""
    [a] = down_with(world, 1)
    os.unlink(world.queue.disk.eml_path(a))
    with LogCapture() as logs:
        world.run(300)
    assert a not in world.queue.entries and world.active() == []
    assert f"queue-removed queue={queue_id(a)}" in logs.text()
    assert world.maildir("john@example.com") == []
    attempts = world.net.attempts
    world.run(100000)
    assert world.net.attempts == attempts


def test_rewrite_does_not_bring_back_an_entry_without_its_message(world):
    [a] = down_with(world, 1)
    os.unlink(world.queue.disk.eml_path(a))
    os.unlink(world.queue.disk.env_path(a))
    assert world.queue.disk.rewrite(a, b"{}") is False
    assert world.active() == []


def test_offline_changes_the_spool_of_a_stopped_server(tmp_path):
    w = World(tmp_path)
    w.queue.startService()
    a, b, c = down_with(w, 3)
    w.queue.stopService()
    assert offline(w.spool, "hold", "ALL") == [a, b, c]
    assert offline(w.spool, "hold", a) == []  # already held
    assert offline(w.spool, "release", queue_id(b)) == [b]
    assert offline(w.spool, "delete", c) == [c]
    assert offline(w.spool, "flush", None) == [b]  # nothing to do on disk: b is not held
    assert [(e.id, e.held) for e in read_entries(w.spool)] == [(a, True), (b, False)]
    w.start()
    w.queue.startService()
    w.run()
    assert sent(w) == [["u1@remote.test"]]
    w.queue.stopService()


def control(queue, line: bytes) -> dict:
    proto = ControlFactory(queue).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(line)
    assert transport.disconnecting
    return json.loads(transport.value())


def test_the_control_protocol(world):
    a, b = down_with(world, 2)
    assert control(world.queue, json.dumps({"op": "hold", "arg": queue_id(a)}).encode() + b"\n") == {
        "ok": True, "ids": [a]}
    assert world.queue.entries[a].held
    assert control(world.queue, b'{"op": "delete", "arg": "ALL"}\n') == {"ok": True, "ids": [a, b]}
    assert world.queue.entries == {}
    for bad in (b"not json\n", b'{"op": "list"}\n', b'{"op": "delete", "arg": 5}\n', b'{"arg": "x"}\n'):
        assert control(world.queue, bad) == {"ok": False, "error": "bad request"}
    assert control(world.queue, b"x" * 5000 + b"\n")["ok"] is False
