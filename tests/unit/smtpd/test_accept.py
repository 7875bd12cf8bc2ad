"""The listening socket when descriptors run out (mailguard.smtpd.accept):
accepting pauses, waiting connections are kept, one log line per interval."""

from __future__ import annotations

import errno

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailguard.smtpd.accept import AcceptGuard, GuardedEndpoint
from mailguard.testing import LogCapture


class FakeSocket:
    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.accepted = 0
        self.closed = False

    def accept(self):
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, "fake")
        self.accepted += 1
        return object(), ("127.0.0.3", 4000 + self.accepted)

    def close(self):
        self.closed = True


class FakePort:
    connected = True

    def __init__(self, sock) -> None:
        self.socket = sock
        self.reading = True

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True


def warnings(capture: LogCapture) -> list[dict]:
    return [e for e in capture.events if "cannot accept" in e.get("log_format", "")]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_out_of_descriptors_pauses_accepting_instead_of_failing(code):
    clock = Clock()
    port = FakePort(FakeSocket(code))
    guard = AcceptGuard(port.socket, port, clock, pause=1.0)
    with pytest.raises(BlockingIOError) as raised:  # Twisted's accept loop: "no more for now"
        guard.accept()
    assert raised.value.errno == errno.EAGAIN
    assert not port.reading
    clock.advance(1.0)
    assert port.reading
    assert guard.accept()[1] == ("127.0.0.3", 4001)


def test_other_errors_are_the_sockets_own():
    guard = AcceptGuard(FakeSocket(errno.EPERM), FakePort(None), Clock())
    with pytest.raises(OSError) as raised:
        guard.accept()
    assert raised.value.errno == errno.EPERM


def test_one_log_line_per_interval_with_a_count():
    clock = Clock()
    port = FakePort(FakeSocket(*[errno.EMFILE] * 50))
    guard = AcceptGuard(port.socket, port, clock, pause=1.0, interval=60.0)
    with LogCapture() as capture:
        for _ in range(50):
            with pytest.raises(BlockingIOError):
                guard.accept()
            clock.advance(2.0)  # 100 s in all
    lines = warnings(capture)
    assert len(lines) == 2  # at 0 s and at 60 s, not 50
    assert lines[1]["count"] == 30 and lines[1]["error"] == "EMFILE"
    assert clock.getDelayedCalls() == []


def test_the_rest_of_the_socket_shows_through():
    sock = FakeSocket()
    guard = AcceptGuard(sock, FakePort(sock), Clock())
    guard.close()
    assert sock.closed


def test_a_guarded_endpoint_guards_each_port_it_listens_on():
    port = FakePort(FakeSocket())

    class Endpoint:
        def listen(self, factory):
            return defer.succeed(port)

    listened = []
    GuardedEndpoint(Endpoint(), Clock()).listen(object()).addCallback(listened.append)
    assert listened == [port] and isinstance(port.socket, AcceptGuard)
