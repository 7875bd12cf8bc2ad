"""Graceful stop on values and a Clock: what each session says when the
server stops (L{ServerSession.shut_down}), and how long the stop waits
(L{mailguard.smtpd.drain.Drain}).

The sessions are real (``tests/helpers_context.make_context``: a Maildir
store whose disk work runs inline, the greeting held 25 s for 127.0.0.3);
StringTransport never calls C{connectionLost}, so L{settle} does, for every
connection the server closed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mailguard import replies as R
from mailguard.policy.session import Session
from mailguard.smtpd import events as E
from mailguard.smtpd.drain import LINGER, Drain, Drained
from mailguard.smtpd.session import ServerSession
from mailguard.testing import connect
from tests.helpers_context import maildir_messages, make_context
from tests.unit.smtpd.test_session import accept, codes, events, written

JOHN = "john@example.com"
GRACE = 30.0
SHUTTING_DOWN = R.SHUTTING_DOWN.to_bytes()
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n.\r\n"


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, {"SmtpGreetingDelay": "25", "SmtpGreetingDelayExceptions": "NoDelay"},
                        tls=object())


# --- the session decides ------------------------------------------------------------

def greeted(ctx, listener="smtp") -> ServerSession:
    m = ServerSession(Session("127.0.0.2", 40000, listener, tls=listener == "smtps"), ctx,
                      token=lambda n: "ab" * n)
    m.greet()
    events(m, b"EHLO client.test\r\n")
    return m


def in_data(ctx) -> ServerSession:
    """A session that has had its 354."""
    m = greeted(ctx)
    events(m, b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
    m.answer(accept())
    evs = events(m)
    assert isinstance(evs[-2], E.BeginMessage)
    m.answer(None)
    assert codes(written(events(m))) == ["250 2.1.0", "250 2.1.5", "354 End"]
    return m


def test_an_idle_session_is_told_421_and_closed(ctx):
    m = greeted(ctx)
    assert m.shut_down() is False
    assert events(m) == [E.Write(SHUTTING_DOWN), E.Close(), E.CLOSED]


def test_a_session_mid_transaction_is_closed_at_once(ctx):
    m = greeted(ctx)
    events(m, b"MAIL FROM:<a@sender.test>\r\n")
    assert m.shut_down() is False
    assert codes(written(events(m))) == ["421 4.3.2"]
    assert m.mode is E.CLOSED


def test_a_session_waiting_on_a_recipient_check_is_closed_and_the_answer_ignored(ctx):
    m = greeted(ctx)
    events(m, b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<john@example.com>\r\n")
    assert m.waiting
    assert m.shut_down() is False
    assert codes(written(events(m))) == ["250 2.1.0", "421 4.3.2"]
    m.answer(accept())
    assert events(m) == [E.CLOSED]


def test_a_session_in_the_middle_of_auth_is_closed(ctx):
    m = greeted(ctx, "smtps")
    events(m, b"AUTH LOGIN\r\n")
    assert m.mode == "AUTH"
    assert m.shut_down() is False
    assert codes(written(events(m))) == ["421 4.3.2"]


def test_a_message_in_data_finishes_then_421(ctx):
    m = in_data(ctx)
    assert m.shut_down() is True
    assert events(m) == [E.NEED_DATA]  # nothing said yet: the client goes on sending
    evs = events(m, b"Subject: hi\r\n\r\nHello.\r\n.\r\nMAIL FROM:<b@sender.test>\r\n")
    assert isinstance(evs[-2], E.CommitMessage) and evs[-1] is E.PAUSED
    m.answer(None)
    evs = events(m)
    # the 250 (fsynced), then 421: the pipelined MAIL is never read
    assert codes(written(evs)) == ["250 2.0.0", "421 4.3.2"]
    assert evs[-2:] == [E.Close(), E.CLOSED]


def test_a_failed_message_is_answered_then_421(ctx):
    m = in_data(ctx)
    m.shut_down()
    events(m, b"Subject: hi\r\n\r\n")
    m.message_failed()  # the disk refused a write
    evs = events(m, b"Hello.\r\n.\r\n")
    assert codes(written(evs)) == ["452 4.3.1", "421 4.3.2"]


def test_the_end_of_the_grace_cuts_a_message_short(ctx):
    m = in_data(ctx)
    assert m.shut_down() is True
    events(m, b"Subject: hi\r\n\r\nHalf a mess")
    assert m.shut_down(force=True) is False
    evs = events(m)
    assert evs == [E.AbortMessage(), E.Write(SHUTTING_DOWN), E.Close(), E.CLOSED]


def test_a_message_being_committed_is_never_cut_short(ctx):
    m = in_data(ctx)
    evs = events(m, MESSAGE)
    assert isinstance(evs[-2], E.CommitMessage)
    assert m.shut_down(force=True) is True
    assert events(m) == [E.PAUSED]
    m.answer(None)
    assert codes(written(events(m))) == ["250 2.0.0", "421 4.3.2"]


def test_a_message_being_opened_may_finish(ctx):
    m = greeted(ctx)
    events(m, b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n")
    m.answer(accept())
    assert isinstance(events(m)[-2], E.BeginMessage)
    assert m.shut_down() is True
    m.answer(None)
    assert codes(written(events(m))) == ["250 2.1.0", "250 2.1.5", "354 End"]
    assert isinstance(events(m, MESSAGE)[-2], E.CommitMessage)
    m.answer(None)
    assert codes(written(events(m))) == ["250 2.0.0", "421 4.3.2"]


def test_a_closed_session_has_nothing_to_say(ctx):
    m = greeted(ctx)
    events(m, b"QUIT\r\n")
    assert m.shut_down() is False
    assert m.shut_down(force=True) is False
    assert events(m) == [E.CLOSED]


# --- the connections: held, greeted, in DATA --------------------------------------

def settle(*clients) -> None:
    """Call connectionLost for every connection the server closed."""
    for c in clients:
        if c.transport.disconnecting and c not in _lost:
            _lost.add(c)
            c.lose(Failure(ConnectionDone()))


_lost: set = set()


def test_a_held_client_is_told_421_and_nothing_is_written_to_the_security_log(ctx):
    held = connect(ctx, "127.0.0.3")
    assert held.take() == b""
    assert held.proto.shut_down() is False
    assert held.take() == SHUTTING_DOWN and held.closed
    settle(held)
    ctx.clock.advance(0)
    assert ctx.security_log.written == 0
    assert ctx.clock.getDelayedCalls() == []  # the hold is cancelled


def test_a_connection_accepted_while_stopping_is_told_421(ctx):
    ctx.connections.stop()
    late = connect(ctx, "127.0.0.4")
    assert late.take() == SHUTTING_DOWN and late.closed
    settle(late)
    assert ctx.connections.total == 0
    assert ctx.clock.getDelayedCalls() == []


def test_the_drain_closes_the_idle_and_waits_for_data(ctx):
    held = [connect(ctx, "127.0.0.3", 5000 + i) for i in range(3)]
    idle = connect(ctx, "127.0.0.4", 6000)
    busy = connect(ctx, "127.0.0.4", 6001)
    for c in (idle, busy):
        c.take()
    idle.cmd("EHLO client.test")
    busy.cmd("EHLO client.test")
    assert busy.codes(busy.send(f"MAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")) == [
        "250 2.1.0", "250 2.1.5", "354 End"]
    drain = Drain(ctx.connections, ctx.clock, GRACE)
    done = drain.start()
    assert drain.start() is done
    for c in (*held, idle):
        assert c.take() == SHUTTING_DOWN and c.closed
    settle(*held, idle, busy)
    assert not done.called and busy.take() == b""
    ctx.clock.advance(GRACE - 1)  # the client is slow, but within the grace
    assert busy.codes(busy.send(MESSAGE)) == ["250 2.0.0", "421 4.3.2"]
    assert len(maildir_messages(ctx, JOHN)) == 1  # on disk before its 250
    settle(busy)
    assert done.called
    assert done.result == Drained(at_once=4, finishing=1)
    assert ctx.clock.getDelayedCalls() == []


def test_the_end_of_the_grace_cuts_data_short_and_stores_nothing(ctx):
    busy = connect(ctx, "127.0.0.4")
    busy.take()
    busy.send(f"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\nSubject: slow\r\n\r\n")
    done = Drain(ctx.connections, ctx.clock, GRACE).start()
    ctx.clock.advance(GRACE)
    assert busy.take() == SHUTTING_DOWN and busy.closed
    settle(busy)
    assert done.result == Drained(at_once=0, finishing=1, cut_short=1)
    assert maildir_messages(ctx, JOHN) == []
    assert list((Path(ctx.store.spool) / "incoming").iterdir()) == []  # the partial file is gone
    assert ctx.clock.getDelayedCalls() == []


def test_a_client_that_never_goes_is_aborted_after_the_linger(ctx):
    stuck = connect(ctx, "127.0.0.4")
    stuck.take()
    done = Drain(ctx.connections, ctx.clock, GRACE).start()
    assert stuck.take() == SHUTTING_DOWN  # but the connection never closes
    ctx.clock.advance(GRACE)
    assert not stuck.transport.disconnected
    ctx.clock.advance(LINGER)
    assert stuck.transport.disconnected  # abortConnection
    assert not done.called
    stuck.lose(Failure(ConnectionDone()))
    assert done.result.aborted == 1
    assert ctx.clock.getDelayedCalls() == []


def test_hurry_ends_the_grace_at_once(ctx):
    busy = connect(ctx, "127.0.0.4")
    busy.take()
    busy.send(f"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")
    drain = Drain(ctx.connections, ctx.clock, GRACE)
    done = drain.start()
    drain.hurry()
    ctx.clock.advance(0)
    assert busy.take() == SHUTTING_DOWN
    settle(busy)
    assert done.called and done.result.cut_short == 1


def test_nothing_to_drain_is_over_at_once(ctx):
    done = Drain(ctx.connections, ctx.clock, GRACE).start()
    assert done.called and done.result == Drained()
    assert ctx.clock.getDelayedCalls() == []
    assert ctx.connections.stopping


def test_a_zero_grace_cuts_data_short_at_the_next_turn(ctx):
    busy = connect(ctx, "127.0.0.4")
    busy.take()
    busy.send(f"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<{JOHN}>\r\nDATA\r\n")
    done = Drain(ctx.connections, ctx.clock, 0.0).start()
    assert busy.take() == b""
    ctx.clock.advance(0)
    assert busy.take() == SHUTTING_DOWN
    settle(busy)
    assert done.result.cut_short == 1
