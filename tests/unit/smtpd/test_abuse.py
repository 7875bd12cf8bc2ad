"""One named test per attack of issue 11, bytes in and bytes out on a
StringTransport with a task.Clock (the same attacks on real sockets and a
real twistd: ``tests/e2e/test_abuse.py``).

Memory is checked structurally here: reading paused, the input buffered
and the replies written bounded, whatever the client sends.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer

from mailguard import replies as R
from mailguard.smtpd.protocol import INPUT_HOLD_MAX
from mailguard.smtpd.session import OUTPUT_BATCH_MAX
from mailguard.testing import TLSStringTransport, connect
from tests.helpers_context import CRAM_MD5, maildir_messages, make_context
from tests.unit.smtpd.test_auth_tls import TLS, plain, tls_session
from tests.unit.smtpd.test_protocol import JOHN, code, ehlo, transaction

ATTACKER = "127.0.0.3"
TRUSTED = "127.0.0.2"  # the relay IP group of the test configuration


def seclog(ctx) -> list[list[str]]:
    """The security log's lines, split into fields (written first)."""
    ctx.clock.advance(0)
    try:
        with open(ctx.security_log.path) as f:
            return [line.rstrip("\n").split("\t") for line in f]
    except FileNotFoundError:
        return []


def events(ctx, name: str) -> list[list[str]]:
    return [line for line in seclog(ctx) if line[1] == name]


class SmallBufferTransport(TLSStringTransport):
    """A transport whose send buffer is full past C{limit} octets, as a
    socket's is when the client never reads: it tells its producer, as
    Twisted's FileDescriptor does."""

    limit = 4096
    writes: list[int]

    def write(self, data: bytes) -> None:
        super().write(data)
        self.__dict__.setdefault("writes", []).append(len(data))
        if len(self.value()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        out = self.value()
        self.clear()
        self.producer.resumeProducing()
        return out


# --- a client that never reads its replies -------------------------------------------


def test_never_reading_client_gets_no_more_replies_and_is_no_longer_read(tmp_path):
    ctx = make_context(tmp_path)
    s = connect(ctx, client_ip=ATTACKER, transport_class=SmallBufferTransport)
    flood = b"EHLO x\r\n" * 20_000  # 160 KB, each answered by a 200-octet reply
    sent = 0
    while s.transport.producerState == "producing" and sent < 20:  # as a socket delivers: until paused
        s.proto.dataReceived(flood)
        sent += 1
    assert sent < 20
    written = len(s.transport.value())
    assert written <= SmallBufferTransport.limit + OUTPUT_BATCH_MAX + 1024  # not 4 million replies
    assert s.transport.producerState == "paused"  # reading stopped: TCP holds the client back
    assert s.proto.smtp.buffered <= INPUT_HOLD_MAX + len(flood)
    # The client reads: replies resume, in batches, until its input is answered.
    answered = s.transport.drain().count(b"250 HELP\r\n")
    while s.proto.smtp.buffered:
        answered += s.transport.drain().count(b"250 HELP\r\n")
    answered += s.transport.value().count(b"250 HELP\r\n")
    assert s.transport.producerState == "producing"
    assert max(s.transport.writes) <= OUTPUT_BATCH_MAX + 1024
    assert answered == 20_000 * sent


def test_pipelined_replies_are_written_in_bounded_batches(tmp_path):
    ctx = make_context(tmp_path)
    s = connect(ctx, client_ip=ATTACKER, transport_class=SmallBufferTransport)
    SmallBufferTransport.limit = 10 ** 9  # a client that reads everything
    try:
        s.proto.dataReceived(b"HELO x\r\n" * 50_000)
    finally:
        SmallBufferTransport.limit = 4096
    assert s.transport.value().count(b"250 mx.example.com\r\n") == 50_000
    assert max(s.transport.writes) <= OUTPUT_BATCH_MAX + 100
    assert len(s.transport.writes) < 200  # still batched: not a write per reply


def test_never_reading_client_that_times_out_is_aborted(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "30"})
    s = connect(ctx, client_ip=ATTACKER, transport_class=SmallBufferTransport)
    s.proto.dataReceived(b"EHLO x\r\n" * 5000)
    ctx.clock.advance(31)
    assert s.transport.disconnected  # aborted: a close would wait for it to read
    assert s.transport.producer is None


# --- AUTH brute force across connections ----------------------------------------------


def fail_auth(ctx, ip=ATTACKER, password="bad") -> bytes:
    s = tls_session(ctx, ip=ip)
    out = s.cmd("AUTH PLAIN " + plain(JOHN, password))
    ctx.clock.advance(1)  # the per-session slow-down
    out += s.take()
    s.lose()
    return out


def test_auth_brute_force_across_connections_is_locked_out(tmp_path):
    ctx = make_context(tmp_path, {**CRAM_MD5, **{"SmtpMaxAuthFailuresPerIp": "3"}}, tls=TLS)
    for n in range(3):
        assert code(R.AUTH_FAILED) in fail_auth(ctx, password=f"guess{n}").decode()
    s = tls_session(ctx)
    out = s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))  # even the right one: not checked
    assert s.codes(out) == ["454 4.7.0"]
    assert events(ctx, "auth-lockout")[0][2:] == [ATTACKER, "40000", "failures=3", "window=600", "locked=600",
                                                  "mechanism=PLAIN", "user=john@example.com"]
    failed = events(ctx, "auth-failed")
    assert [f[2] for f in failed] == [ATTACKER] * 3
    assert all(f[4:] == ["mechanism=PLAIN", "user=john@example.com"] for f in failed)
    assert "guess" not in open(ctx.security_log.path).read()  # never the password
    ctx.clock.advance(600)  # the lock-out ends
    s = tls_session(ctx)
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]


def test_auth_lockout_does_not_touch_the_relay_ip_group(tmp_path):
    ctx = make_context(tmp_path, {**CRAM_MD5, **{"SmtpMaxAuthFailuresPerIp": "2"}}, tls=TLS)
    for n in range(4):
        assert code(R.AUTH_FAILED) in fail_auth(ctx, ip=TRUSTED, password=f"guess{n}").decode()
    s = tls_session(ctx, ip=TRUSTED)
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]
    assert events(ctx, "auth-lockout") == []


def test_auth_failure_log_escapes_a_hostile_user_name(tmp_path):
    ctx = make_context(tmp_path, CRAM_MD5, tls=TLS)
    s = tls_session(ctx)
    s.cmd("AUTH PLAIN " + plain("x\t127.0.0.9\tforged\njohn", "bad"))
    lines = open(ctx.security_log.path).read() if seclog(ctx) else ""
    assert lines.count("\n") == 1 and lines.count("\t") == 5
    assert 'user="x\\t127.0.0.9\\tforged\\njohn"' in lines


# --- harvesting recipients ---------------------------------------------------------------


def test_harvest_unknown_recipients_count_as_errors(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxErrors": "3"})
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<a@sender.test>")
    out = s.send("".join(f"RCPT TO:<guess{n}@example.com>\r\n" for n in range(200)))
    assert s.codes(out) == ["550 5.1.1"] * 3 + ["421 4.7.0"] and s.closed


def test_harvest_relay_attempts_count_as_errors(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxErrors": "2"})
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<a@sender.test>")
    out = s.send("".join(f"RCPT TO:<x{n}@elsewhere.test>\r\n" for n in range(5)))
    assert s.codes(out) == ["554 5.7.1"] * 2 + ["421 4.7.0"]


def test_harvest_slows_down_past_the_soft_limit(tmp_path):
    ctx = make_context(tmp_path, {"SmtpSoftErrorLimit": "2", "SmtpErrorSleepTime": "5"})
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<a@sender.test>")
    out = s.send("".join(f"RCPT TO:<guess{n}@example.com>\r\n" for n in range(5)))
    assert s.codes(out) == ["550 5.1.1"] * 3  # past 2 errors, each command is read 5 s later
    ctx.clock.advance(4.9)
    assert s.take() == b""
    ctx.clock.advance(0.1)
    assert s.codes(s.take()) == ["550 5.1.1"]
    ctx.clock.advance(5)
    assert s.codes(s.take()) == ["550 5.1.1"]


def test_harvest_past_the_recipient_limit_counts_after_the_overshoot(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxRecipients": "1", "SmtpRecipientOvershootLimit": "2",
                                  "SmtpMaxErrors": "1"})
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<a@sender.test>")
    out = s.send(f"RCPT TO:<{JOHN}>\r\n" + "RCPT TO:<jane@example.com>\r\n" * 9000)
    # two free 452s (Postfix's overshoot), one counted, then the limit
    assert s.codes(out) == ["250 2.1.5"] + ["452 4.5.3"] * 3 + ["421 4.7.0"] and s.closed


def test_errors_are_forgiven_after_a_delivered_message(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxErrors": "3"})
    s = ehlo(ctx)
    for _ in range(2):
        for n in range(3):
            assert s.codes(s.cmd(f"BOGUS{n}")) == ["500 5.5.2"]
        transaction(s)
        assert s.codes(s.send("Subject: x\r\n\r\nhi\r\n.\r\n")) == ["250 2.0.0"]
    assert not s.closed and s.proto.smtp.errors == 0


def test_harvest_across_sessions_locks_the_address_out(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxErrorsPerIp": "5"})
    s = ehlo(ctx)
    s.cmd("MAIL FROM:<a@sender.test>")
    assert s.codes(s.send("RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n")) \
        == ["550 5.1.1"] * 3
    s.cmd("QUIT")
    s = ehlo(ctx, ip=ATTACKER)
    s.cmd("MAIL FROM:<a@sender.test>")
    out = s.send("RCPT TO:<d@example.com>\r\nRCPT TO:<e@example.com>\r\nRCPT TO:<f@example.com>\r\n")
    assert s.codes(out) == ["550 5.1.1", "421 4.7.0"] and b"from your address" in out and s.closed
    later = connect(ctx, client_ip=ATTACKER)  # a new connection during the lock-out
    assert later.codes(later.take()) == ["421 4.7.0"] and later.closed
    assert [line[4] for line in events(ctx, "error-limit")] == ["errors=5", "locked=600"]
    trusted = connect(ctx, client_ip=TRUSTED)
    assert trusted.take().startswith(b"220 ")
    ctx.clock.advance(600)
    assert connect(ctx, client_ip=ATTACKER).take().startswith(b"220 ")


# --- rate limits -------------------------------------------------------------------------


def test_connection_rate_past_the_limit_is_refused_at_connect(tmp_path):
    ctx = make_context(tmp_path, {"SmtpConnectionRateLimit": "2"})
    for _ in range(2):
        assert connect(ctx, client_ip=ATTACKER).take().startswith(b"220 ")
    s = connect(ctx, client_ip=ATTACKER)
    assert s.take() == R.CONNECTION_RATE_LIMIT.to_bytes() and s.closed
    assert events(ctx, "connection-rate")[0][2:] == [ATTACKER, "40000", "limit=2/min"]
    for _ in range(5):  # the relay IP group is exempt
        assert connect(ctx, client_ip=TRUSTED).take().startswith(b"220 ")
    ctx.clock.advance(120)
    assert connect(ctx, client_ip=ATTACKER).take().startswith(b"220 ")


def test_message_rate_past_the_limit_is_refused_at_mail(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMessageRateLimit": "2"})
    s = ehlo(ctx)
    out = s.send("MAIL FROM:<a@sender.test>\r\nRSET\r\nMAIL FROM:<a@sender.test>\r\nRSET\r\n"
                 "MAIL FROM:<a@sender.test>\r\n")
    assert s.codes(out) == ["250 2.1.0", "250 2.0.0", "250 2.1.0", "250 2.0.0", "421 4.7.0"] and s.closed
    assert events(ctx, "message-rate")[0][4] == "limit=2/min"


def test_connections_past_the_total_keep_a_reserve_for_the_relay_ip_group(tmp_path):
    ctx = make_context(tmp_path, {"SmtpMaxConnections": "2", "SmtpMaxConnectionsPerIp": "0"})
    ctx.connections.exempt_reserve = 1
    for n in range(2):
        assert connect(ctx, client_ip=ATTACKER, client_port=n).take().startswith(b"220 ")
    assert connect(ctx, client_ip=ATTACKER, client_port=9).take() == R.TOO_MANY_CONNECTIONS.to_bytes()
    assert connect(ctx, client_ip=TRUSTED).take().startswith(b"220 ")  # the reserve
    assert connect(ctx, client_ip=TRUSTED, client_port=2).take() == R.TOO_MANY_CONNECTIONS.to_bytes()


# --- sending as someone else -------------------------------------------------------------


def logged_in(ctx, ip=ATTACKER):
    s = tls_session(ctx, ip=ip)
    assert s.codes(s.cmd("AUTH PLAIN " + plain(JOHN, "john-secret"))) == ["235 2.7.0"]
    return s


@pytest.mark.parametrize("sender, reply", [
    ("jane@example.com", "553 5.7.1"),  # another local user
    ("someone@elsewhere.test", "553 5.7.1"),
    ("john@example.com", "250 2.1.0"),
    ("john@example.net", "250 2.1.0"),  # the alias domain
    ("sales@example.com", "250 2.1.0"),  # an alias that delivers to john (and jane)
    ("", "250 2.1.0"),  # the null sender
])
def test_sender_must_match_login(tmp_path, sender, reply):
    ctx = make_context(tmp_path, CRAM_MD5, tls=TLS)
    s = logged_in(ctx)
    assert s.codes(s.cmd(f"MAIL FROM:<{sender}>")) == [reply]


def test_sender_login_match_can_be_turned_off(tmp_path):
    ctx = make_context(tmp_path, {**CRAM_MD5, **{"SmtpSenderLoginMatch": "0"}}, tls=TLS)
    s = logged_in(ctx)
    assert s.codes(s.cmd("MAIL FROM:<jane@example.com>")) == ["250 2.1.0"]


def test_sender_login_match_leaves_the_relay_ip_group_alone(tmp_path):
    ctx = make_context(tmp_path, CRAM_MD5, tls=TLS)
    s = logged_in(ctx, ip=TRUSTED)
    assert s.codes(s.cmd("MAIL FROM:<jane@example.com>")) == ["250 2.1.0"]


# --- NUL in DATA ----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"a\0b\r\n", b"\0\r\n", b"line\r\n" * 100 + b"x\0\r\n.."])
def test_nul_in_data_is_refused_and_nothing_stored(tmp_path, body):
    ctx = make_context(tmp_path)
    s = ehlo(ctx)
    transaction(s)
    out = s.send(body + b"\r\n.\r\n" if body.endswith(b"..") else body + b".\r\n")
    assert s.codes(out) == [code(R.NUL_IN_DATA)] == ["554 5.6.0"]
    assert maildir_messages(ctx, JOHN) == []
    assert s.codes(s.cmd("NOOP")) == ["250 2.0.0"]  # the session goes on


# --- slow senders ------------------------------------------------------------------------------


def trickle(ctx, s, data: bytes, every: float = 1.0) -> bytes:
    """Send C{data} one octet per C{every} seconds until the server closes."""
    out = b""
    for i in range(len(data)):
        out += s.send(data[i:i + 1])
        if s.closed:
            break
        ctx.clock.advance(every)
        out += s.take()
        if s.closed:
            break
    return out


def test_slow_sender_in_data_is_cut_off(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "10", "SmtpMaxSessionTime": "0"})
    s = ehlo(ctx)
    transaction(s)
    start = ctx.clock.seconds()
    out = trickle(ctx, s, b"x" * 1000 + b"\r\n.\r\n")
    assert s.codes(out) == ["421 4.4.2"] and s.closed
    assert ctx.clock.seconds() - start <= 11  # not 1000 s
    assert maildir_messages(ctx, JOHN) == []


def test_slow_command_line_is_cut_off(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "10", "SmtpMaxSessionTime": "0"})
    s = ehlo(ctx)
    out = trickle(ctx, s, b"NOOP " + b"x" * 400 + b"\r\n", every=0.5)
    assert s.codes(out) == ["421 4.4.2"] and s.closed
    assert out.count(b"\r\n") == 1


def test_a_message_faster_than_the_minimum_rate_is_never_cut_off(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "10"})
    s = ehlo(ctx)
    transaction(s)
    line = b"y" * 98 + b"\r\n"
    for _ in range(300):  # 30 s at 1 KB/s: longer than SmtpIdleTimeout, faster than 500 B/s
        s.send(line * 10)
        ctx.clock.advance(1)
    assert s.codes(s.send(b".\r\n")) == ["250 2.0.0"]


def test_commands_keep_a_session_alive_as_before(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "10"})
    s = ehlo(ctx)
    for _ in range(30):
        ctx.clock.advance(9)
        assert s.codes(s.cmd("NOOP")) == ["250 2.0.0"]


def test_without_a_minimum_rate_each_read_restarts_the_timer_in_data(tmp_path):
    ctx = make_context(tmp_path, {"SmtpIdleTimeout": "10", "SmtpMinDataRate": "0"})
    s = ehlo(ctx)
    transaction(s)
    out = trickle(ctx, s, b"x" * 50 + b"\r\n.\r\n", every=9)
    assert s.codes(out) == ["250 2.0.0"]


class HeldChecks:
    """A C{run_blocking} that holds each password check until released, as
    a busy thread pool does while parallel guesses arrive."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((d, f, args))
        return d

    def release(self) -> None:
        for d, f, args in self.calls:
            d.callback(f(*args))


def test_auth_guesses_in_flight_when_the_lock_out_begins_get_no_answer(tmp_path):
    """Parallel connections all past the lock-out check: only the guesses
    answered before it began are answered; the others learn nothing, the
    right password included."""
    ctx = make_context(tmp_path, {**CRAM_MD5, **{"SmtpMaxAuthFailuresPerIp": "2"}}, tls=TLS)
    ctx.run_blocking = checks = HeldChecks()
    sessions = [tls_session(ctx) for _ in range(5)]
    for n, s in enumerate(sessions):
        s.send("AUTH PLAIN " + plain(JOHN, "john-secret" if n == 4 else f"guess{n}") + "\r\n")
    checks.release()
    ctx.clock.advance(10)
    replies = [s.codes(s.take()) for s in sessions]
    assert replies == [["535 5.7.8"], ["535 5.7.8"], ["454 4.7.0"], ["454 4.7.0"], ["454 4.7.0"]]
    assert not any(s.proto.smtp.facts.authenticated for s in sessions)


# --- a reload forgets nobody ---------------------------------------------------------------------


def test_a_reload_keeps_the_per_address_budgets_and_the_descriptor_cap(tmp_path):
    from tests.unit.test_lifecycle import World

    world = World(tmp_path, {"SmtpMaxErrorsPerIp": "3"})
    world.service.context.connections.descriptor_cap = 40  # what the open-file limit held at start
    s = world.connect(ip=ATTACKER)
    world.clock.advance(25)  # the greeting delay
    s.take()
    assert s.codes(s.send("BOGUS\r\nBOGUS\r\nBOGUS\r\n")) == ["500 5.5.2", "500 5.5.2", "421 4.7.0"]
    limits = world.service.context.limits
    world.write({"SmtpMaxErrorsPerIp": "5", "SmtpMaxConnections": "100000"})
    assert world.reload().ok
    assert world.service.context.limits is limits
    assert world.service.context.connections.max_total == 40
    again = world.connect(ip=ATTACKER)
    assert again.codes(again.take()) == ["421 4.7.0"]  # still locked out
