"""Queue entries as values (mailguard.store.entries): the back-off, what an
attempt's replies mean for each recipient, and the ``.env`` file's JSON."""

from __future__ import annotations

import pytest

from mailguard.store.entries import FAILED, PENDING, SENT, Outcome, QueueEntry, Recipient, backoff, classify
from mailguard.store.envelope import Envelope
from tests.unit.store.world import T0


def test_backoff_doubles_up_to_the_maximum():
    assert [backoff(n, 300, 14400) for n in range(1, 9)] == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400]


@pytest.mark.parametrize("outcome, expected", [
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(250, "2.0.0 ok")), (SENT, "2.0.0")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (550, "5.1.1 no such user")}), (FAILED, "5.1.1")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (450, "4.2.0 greylisted")}), (PENDING, "4.2.0")),
    (Outcome(mail=(553, "no")), (FAILED, "5.0.0")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(552, "5.3.4 too big")), (FAILED, "5.3.4")),
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(451, "4.3.0 later")), (PENDING, "4.3.0")),
    (Outcome(error="connection refused"), (PENDING, "4.4.1")),
    # the end of DATA was acknowledged, then the connection dropped: sent
    (Outcome(mail=(250, "ok"), rcpts={"a@x": (250, "ok")}, data=(250, "ok"), error="lost"), (SENT, "2.0.0")),
])
def test_classify(outcome, expected):
    assert classify(outcome, "a@x")[:2] == expected


def test_queue_entry_round_trips_json():
    e = QueueEntry("id1", "a@b", [], T0, envid="x+2By", ret="HDRS")
    assert QueueEntry.from_json(e.to_json()) == e


def test_entry_from_envelope_keeps_the_dsn_parameters():
    env = Envelope("a@b.test", (), ("x@remote.test", "y@remote.test", "x@remote.test"),
                   {"ret": "hdrs", "ENVID": "id+2B1", "BODY": "8bitmime"},
                   {"x@remote.test": {"notify": "SUCCESS,FAILURE", "ORCPT": "rfc822;x@remote.test"},
                    "y@remote.test": {"NOTIFY": "SOMETIMES"}},
                   client_ip="127.0.0.2", message_id="m1")
    entry = QueueEntry.from_envelope(env, T0, 123)
    assert (entry.id, entry.sender, entry.arrival, entry.size, entry.client_ip) == ("m1", "a@b.test", T0, 123,
                                                                                   "127.0.0.2")
    assert (entry.ret, entry.envid, entry.body) == ("HDRS", "id+2B1", "8BITMIME")
    assert entry.recipients == [Recipient("x@remote.test", ["SUCCESS", "FAILURE"], "rfc822;x@remote.test"),
                                Recipient("y@remote.test")]  # one per address; a bad NOTIFY is dropped
    assert entry.pending() == entry.recipients

