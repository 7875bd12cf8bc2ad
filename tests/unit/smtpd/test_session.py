"""The SMTP state machine on values: bytes in, events out, no transport.

The context is real (``tests/helpers_context.make_context``: the relay
group "Trusted" is 127.0.0.2); requests are answered by hand, as the
adapter would, so each test says exactly what came back.
"""

from __future__ import annotations

import pytest

from mailguard import replies as R
from mailguard.policy.decide import RecipientVerdict
from mailguard.policy.session import Session
from mailguard.smtpd import events as E
from mailguard.smtpd.sasl import PlainCredentials
from mailguard.smtpd.session import JUNK_COMMAND_LIMIT, ServerSession
from mailguard.testing import b64
from tests.helpers_context import CRAM_MD5, make_context

JOHN = "john@example.com"
TLS = object()  # a stand-in TLS context


def machine(ctx, ip="127.0.0.3", listener="smtp") -> ServerSession:
    """A session just greeted (its 220 taken)."""
    m = ServerSession(Session(ip, 40000, listener, tls=listener == "smtps"), ctx, token=lambda n: "ab" * n)
    m.greet()
    assert events(m) == [E.Write(b"220 mx.example.com ESMTP\r\n"), E.NEED_DATA]
    return m


def events(m: ServerSession, data: bytes = b"") -> list:
    """Feed C{data}; every event up to and including the signal."""
    if data:
        m.receive_data(data)
    out = []
    while True:
        event = m.next_event()
        out.append(event)
        if isinstance(event, E.Signal):
            return out


def written(evs) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, E.Write))


def codes(data: bytes) -> list[str]:
    return [" ".join(line.split(" ")[:2]) for line in data.decode().split("\r\n")
            if line[:3].isdigit() and line[3:4] == " "]


def accept(address=JOHN) -> RecipientVerdict:
    return RecipientVerdict(R.RECIPIENT_OK, "test", mailboxes=(address,), address=address)


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, CRAM_MD5, tls=TLS)


@pytest.fixture
def m(ctx):
    m = machine(ctx)
    evs = events(m, b"EHLO client.test\r\n")
    assert codes(written(evs)) == ["250 HELP"] and evs[-1] is E.NEED_DATA
    return m


def test_no_state_on_the_class():
    for cls in ServerSession.__mro__:
        for name, value in vars(cls).items():
            if not name.startswith("__"):
                assert not isinstance(value, (list, dict, set, bytearray)), (cls, name)


def test_each_session_has_its_own_state(ctx):
    a, b = machine(ctx), machine(ctx)
    events(a, b"EHLO a\r\nMAIL FROM:<a@b.test>\r\n")
    assert a.transaction is not None and b.transaction is None
    assert a.facts.helo == "a" and b.facts.helo is None


def test_partial_line_needs_data(m):
    assert events(m, b"NOO") == [E.NEED_DATA]
    assert codes(written(events(m, b"P\r\n"))) == ["250 2.0.0"]


# --- requests, pausing, pipelining ------------------------------------------------------


def test_a_pipelined_group_waits_for_each_check_and_is_answered_in_one_write(m):
    evs = events(m, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.com>\r\nRCPT TO:<two@example.com>\r\n"
                    b"NOOP\r\n")
    [request] = [e for e in evs if isinstance(e, E.Request)]
    assert evs == [request, E.PAUSED]  # the 250 for MAIL is held with the group
    assert isinstance(request, E.CheckRecipient) and request.mailbox.address == "one@example.com"
    assert request.session is m.facts and m.waiting
    assert events(m, b"QUIT\r\n") == [E.PAUSED]  # more input while waiting: not read yet
    m.answer(RecipientVerdict(R.UNKNOWN_USER, "test", address="one@example.com"))
    evs = events(m)
    assert isinstance(evs[0], E.CheckRecipient) and evs[0].mailbox.address == "two@example.com"
    m.answer(accept("two@example.com"))
    evs = events(m)
    assert codes(written(evs)) == ["250 2.1.0", "550 5.1.1", "250 2.1.5", "250 2.0.0", "221 2.0.0"]
    assert len([e for e in evs if isinstance(e, E.Write)]) == 1
    assert evs[-2:] == [E.Close(), E.CLOSED]
    assert [verdict.address for verdict, _ in m.transaction.recipients] == ["two@example.com"]


def test_a_failed_check_is_451_in_order(m):
    events(m, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<one@example.com>\r\nNOOP\r\n")
    m.failed()
    assert codes(written(events(m))) == ["250 2.1.0", "451 4.3.0", "250 2.0.0"]


def test_rcpt_parameters_ride_with_the_request_and_stay_with_the_recipient(ctx):
    ctx.dsn = True
    m = machine(ctx)
    evs = events(m, b"EHLO c\r\nMAIL FROM:<a@b.test> RET=HDRS\r\nRCPT TO:<john@example.com> NOTIFY=NEVER\r\n")
    assert evs[-2].params == {"NOTIFY": "NEVER"}
    m.answer(accept())
    events(m)
    assert m.transaction.params == {"RET": "HDRS"}
    assert [params for _, params in m.transaction.recipients] == [{"NOTIFY": "NEVER"}]


def test_vrfy_is_asked_of_the_policy_with_the_facts(ctx):
    m = machine(ctx, ip="127.0.0.2")
    evs = events(m, b"EHLO gw\r\nVRFY john\r\n")
    request = evs[-2]
    assert request == E.AnswerVrfy(m.facts, "john") and evs[-1] is E.PAUSED
    m.answer(R.VRFY_KNOWN.with_text("<john@example.com>"))
    assert written(events(m)).endswith(b"\r\n250 2.1.5 <john@example.com>\r\n")  # after EHLO's, held


# --- DATA --------------------------------------------------------------------------------


def open_data(m, body: bytes = b"") -> E.BeginMessage:
    events(m, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nDATA\r\n" + body)
    m.answer(accept())
    [begin, paused] = events(m)
    assert isinstance(begin, E.BeginMessage) and paused is E.PAUSED
    return begin


def test_data_opens_writes_and_commits(m):
    begin = open_data(m, b"Subject: x\r\n\r\n")
    assert begin.envelope.mailboxes == (JOHN,) and begin.envelope.mail_from == "a@b.test"
    assert begin.header.startswith(b"Return-Path: <a@b.test>\r\nReceived: from client.test ([127.0.0.3])")
    assert b" with ESMTP id " in begin.header
    m.answer(None)
    evs = events(m)
    assert codes(written(evs)) == ["250 2.1.0", "250 2.1.5", "354 End"]
    assert evs[-2:] == [E.WriteMessage(b"Subject: x\r\n\r\n"), E.NEED_DATA]
    evs = events(m, b"..hi\r\n.\r\nNOOP\r\n")
    assert evs == [E.WriteMessage(b".hi\r\n"), E.CommitMessage(begin.envelope), E.PAUSED]
    assert m.message_size == 0  # the message is done
    assert m.mode == "COMMAND" and m.transaction is None
    m.answer(None)
    queued = begin.envelope.message_id.split(".")[1]
    assert written(events(m)) == f"250 2.0.0 Ok: queued as {queued}\r\n250 2.0.0 OK\r\n".encode()


def test_data_that_cannot_be_opened_is_452_and_the_transaction_stays(m):
    open_data(m)
    m.failed()
    evs = events(m)
    assert codes(written(evs)) == ["250 2.1.0", "250 2.1.5", "452 4.3.1"]
    assert m.mode == "COMMAND" and m.transaction is not None


def test_a_write_failure_aborts_and_is_answered_at_the_final_dot(m):
    open_data(m, b"Subject: x\r\n\r\n")
    m.answer(None)
    assert isinstance(m.next_event(), E.Write)  # 250, 250, 354
    assert m.next_event() == E.WriteMessage(b"Subject: x\r\n\r\n")
    assert m.message_size == len(b"Subject: x\r\n\r\n")
    m.message_failed()  # that could not be written
    assert events(m) == [E.AbortMessage(), E.NEED_DATA]
    assert events(m, b"more\r\n") == [E.NEED_DATA]  # nothing more is written
    assert codes(written(events(m, b".\r\n"))) == ["452 4.3.1"]


def test_bare_lf_aborts_and_closes(m):
    open_data(m)
    m.answer(None)
    events(m)
    evs = events(m, b"hello\n.\nMAIL FROM:<x@y.test>\r\n")
    assert evs[0] == E.AbortMessage()
    assert codes(written(evs)) == ["554 5.6.0"]
    assert evs[-2:] == [E.Close(), E.CLOSED]
    assert events(m, b"NOOP\r\n") == [E.CLOSED]


def test_a_long_line_is_message_data(m):
    open_data(m)
    m.answer(None)
    events(m)
    assert events(m, b"x" * 1200 + b"\r\n") == [E.WriteMessage(b"x" * 1200 + b"\r\n"), E.NEED_DATA]
    assert events(m, b"y" * 1200 + b"\r\n") == [E.WriteMessage(b"y" * 1200 + b"\r\n"), E.NEED_DATA]
    evs = events(m, b".\r\n")
    assert isinstance(evs[0], E.CommitMessage)


def test_an_oversized_message_fails_once(tmp_path):
    m = machine(make_context(tmp_path, {"MaxMessageSize": "1000"}))
    events(m, b"EHLO client.test\r\n")
    open_data(m)
    m.answer(None)
    events(m)
    assert events(m, b"x" * 1200 + b"\r\n") == [E.AbortMessage(), E.NEED_DATA]
    assert events(m, b"y" * 1200 + b"\r\n") == [E.NEED_DATA]
    assert codes(written(events(m, b".\r\n"))) == ["552 5.3.4"]


# --- STARTTLS, AUTH ----------------------------------------------------------------------


def test_starttls_writes_220_then_starts_tls_and_forgets(m):
    evs = events(m, b"MAIL FROM:<a@b.test>\r\nSTARTTLS\r\nRCPT TO:<john@example.com>\r\n")
    assert codes(written(evs)) == ["250 2.1.0", "220 2.0.0"]
    assert evs.index(E.StartTLS()) > max(i for i, e in enumerate(evs) if isinstance(e, E.Write))
    assert evs[-1] is E.NEED_DATA  # the pipelined RCPT was discarded, not run
    assert (m.facts.tls, m.facts.helo, m.facts.esmtp, m.transaction) == (True, None, False, None)


def test_auth_asks_for_credentials_then_slows_down(ctx):
    m = machine(ctx, listener="smtps")
    evs = events(m, b"EHLO c\r\nAUTH PLAIN " + b64("\0john\0nope").encode() + b"\r\nNOOP\r\n")
    assert evs[-2:] == [E.CheckCredentials(PlainCredentials("john", "nope")), E.PAUSED]
    m.answer(None)
    assert events(m) == [E.SecurityEvent("auth-failed", {"mechanism": "PLAIN", "user": "john"}),
                         E.AuthFailureDelay(1.0), E.PAUSED]
    m.answer(None)
    assert codes(written(events(m))) == ["250 HELP", "535 5.7.8", "250 2.0.0"]
    assert m.auth_failures == 1


def test_auth_success_changes_the_facts(ctx):
    m = machine(ctx, listener="smtps")
    events(m, b"EHLO c\r\nAUTH LOGIN\r\n")
    events(m, b64("john").encode() + b"\r\n")
    evs = events(m, b64("john-secret").encode() + b"\r\n")
    assert evs[-2] == E.CheckCredentials(PlainCredentials("john", "john-secret"))
    m.answer(JOHN)
    assert codes(written(events(m))) == ["235 2.7.0"]
    assert m.facts.authenticated == JOHN and m.facts.tls


def test_auth_check_failure_is_454(ctx):
    m = machine(ctx, listener="smtps")
    events(m, b"EHLO c\r\nAUTH PLAIN " + b64("\0john\0x").encode() + b"\r\n")
    m.failed()
    assert codes(written(events(m)))[-1] == "454 4.7.0" and m.mode == "COMMAND"


def test_cram_md5_nonce_uses_the_injected_sources(ctx):
    m = machine(ctx)
    ctx.clock.advance(1234)
    evs = events(m, b"EHLO c\r\nAUTH CRAM-MD5\r\n")
    assert written(evs).endswith(b"334 " + b64("<" + "ab" * 12 + ".1234@mx.example.com>").encode() + b"\r\n")
    assert m.mode == "AUTH"


# --- budgets, closing ---------------------------------------------------------------------


def test_error_budget_closes_with_421(tmp_path):
    m = machine(make_context(tmp_path, {"SmtpMaxErrors": "2"}))
    evs = events(m, b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert codes(written(evs)) == ["500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert evs[-2:] == [E.Close(), E.CLOSED] and m.errors == 3


def test_junk_commands_are_free_up_to_their_budget(tmp_path):
    m = machine(make_context(tmp_path, {"SmtpMaxErrors": "1"}))
    events(m, b"NOOP\r\n" * JUNK_COMMAND_LIMIT)
    assert m.errors == 0
    assert codes(written(events(m, b"NOOP\r\nNOOP\r\n"))) == ["250 2.0.0", "421 4.7.0"]


def test_a_refusal_that_is_not_an_error_is_not_counted(ctx):
    m = machine(ctx)
    events(m, b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=999999999\r\nMAIL FROM:<a@b.test> FOO=1\r\n")
    assert m.errors == 0
    events(m, b"MAIL FROM:<a@b.test> SIZE=x\r\n")
    assert m.errors == 1


def test_vrfy_budget_for_untrusted_clients(tmp_path):
    ctx = make_context(tmp_path, {"SmtpVrfyLimit": "1"})
    m = machine(ctx)
    evs = events(m, b"EHLO c\r\nVRFY john\r\n")
    assert isinstance(evs[-2], E.AnswerVrfy)
    m.answer(R.VRFY_WITHHELD)
    evs = events(m, b"VRFY john\r\n")
    assert codes(written(evs))[-1] == "421 4.7.0" and evs[-1] is E.CLOSED


def test_disabled_vrfy_is_an_error_and_asks_nobody(tmp_path):
    m = machine(make_context(tmp_path, {"VRFYEnabled": "0"}))
    evs = events(m, b"EHLO c\r\nVRFY john\r\n")
    assert not any(isinstance(e, E.Request) for e in evs) and m.errors == 1
    assert codes(written(evs))[-1] == "502 5.5.1"


def test_close_says_the_held_replies_first(m):
    events(m, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<john@example.com>\r\nNOOP\r\n")
    m.close(R.TIMEOUT)
    evs = events(m)
    assert codes(written(evs)) == ["250 2.1.0", "421 4.4.2"] and evs[-2:] == [E.Close(), E.CLOSED]
    m.answer(accept())  # the check comes back after the close: nothing more is said
    assert events(m) == [E.CLOSED]


def test_a_commit_answered_after_the_connection_is_lost_says_nothing(m):
    open_data(m)
    m.answer(None)
    events(m)
    assert isinstance(events(m, b".\r\n")[-2], E.CommitMessage)
    m.connection_lost()
    m.answer(None)
    assert events(m) == [E.CLOSED]


def test_etrn_kicks_the_queue_for_trusted_clients_only(tmp_path):
    ctx = make_context(tmp_path)
    ctx.queue = object()  # a queue is configured; the adapter, not the session, kicks it
    trusted = machine(ctx, ip="127.0.0.2")
    evs = events(trusted, b"EHLO gw\r\nETRN @example.com\r\nETRN #q\r\nETRN x\r\n")
    assert evs[-2:] == [E.KickQueue("@example.com"), E.PAUSED]
    trusted.answer(None)
    assert events(trusted)[-2:] == [E.KickQueue(None), E.PAUSED]
    trusted.failed()  # the queue could not start a run
    assert events(trusted)[-2:] == [E.KickQueue("x"), E.PAUSED]
    trusted.answer(None)
    assert codes(written(events(trusted))) == ["250 HELP", "250 2.0.0", "451 4.3.0", "250 2.0.0"]
    outsider = machine(ctx)
    evs = events(outsider, b"EHLO c\r\nETRN example.com\r\n")
    assert codes(written(evs))[-1] == "458 4.5.0" and outsider.errors == 0
    assert not any(isinstance(e, E.KickQueue) for e in evs)
