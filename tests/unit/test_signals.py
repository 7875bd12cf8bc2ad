"""Process signals and systemd notifications, in this process.

Real signals are sent to the test process (the handlers only hand the work
to the reactor, here a recorder); the notification socket is a real Unix
datagram socket; twistd's log-file handler is twistd's own.  A real
``twistd`` receiving them is ``tests/e2e/test_lifecycle.py``.
"""

from __future__ import annotations

import os
import signal
import socket
from types import SimpleNamespace

import pytest
from twisted.internet import defer

from mailguard.lifecycle import Reloaded
from mailguard.signals import ProcessSignals, sd_notify, twistd_log_file
from mailguard.testing import LogCapture


class Reactor:
    """Records what the handlers hand over; runs it when asked."""

    def __init__(self) -> None:
        self.calls: list = []
        self.running = False
        self.stopped = 0

    def callFromThread(self, f, *args):
        self.calls.append((f, args))

    def callWhenRunning(self, f, *args):
        self.running = True
        f(*args)

    def stop(self):
        self.stopped += 1

    def run_calls(self):
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class Top:
    """The service the signals act on."""

    def __init__(self) -> None:
        self.reloads = 0
        self.hurried = 0
        self.drain = None
        self.flushed = 0
        self.context = SimpleNamespace(config=SimpleNamespace(shutdown_grace=30.0),
                                       security_log=SimpleNamespace(flush=self._flush))

    def _flush(self):
        self.flushed += 1

    def reload(self):
        self.reloads += 1
        return defer.succeed(Reloaded(self.reloads % 2 == 1))

    def hurry(self):
        self.hurried += 1


@pytest.fixture
def signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    sent: list[str] = []
    handlers = ProcessSignals(Top(), Reactor(), notify=sent.append)
    handlers.sent = sent
    yield handlers
    found = dict(handlers._previous)
    handlers.uninstall()
    for s, h in found.items():
        assert signal.getsignal(s) is h  # uninstall put back what was there
    for s, h in saved.items():
        signal.signal(s, h)


def kill(signum) -> None:
    os.kill(os.getpid(), signum)  # the handler runs before os.kill returns to us


def test_hup_reloads_and_tells_systemd(signals):
    signals.startService()
    assert signals.sent[0].startswith("READY=1\nMAINPID=")
    kill(signal.SIGHUP)
    assert signals.top.reloads == 0  # only handed to the reactor
    signals.reactor.run_calls()
    assert signals.top.reloads == 1
    assert signals.sent[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert signals.sent[2] == "READY=1\nSTATUS=serving (configuration reloaded)"
    kill(signal.SIGHUP)
    signals.reactor.run_calls()
    assert signals.sent[-1].startswith("READY=1\nSTATUS=serving the previous configuration")


def test_usr1_never_kills_and_flushes_the_security_log(signals):
    signals.startService()
    with LogCapture() as logged:
        kill(signal.SIGUSR1)
        signals.reactor.run_calls()
    assert signals.top.flushed == 1
    assert "no log file to reopen" in logged.text()


def test_term_stops_once_then_hurries(signals):
    signals.startService()
    kill(signal.SIGTERM)
    signals.reactor.run_calls()
    assert signals.reactor.stopped == 1 and signals.sent[-1] == "STOPPING=1\nSTATUS=stopping"
    kill(signal.SIGINT)
    signals.reactor.run_calls()
    assert signals.reactor.stopped == 1 and signals.top.hurried == 1


def test_hup_during_the_stop_is_ignored(signals):
    signals.startService()
    signals.stopService()
    kill(signal.SIGHUP)
    signals.reactor.run_calls()
    assert signals.top.reloads == 0


def test_twistds_log_file_is_found_and_reopened(tmp_path, signals):
    """twistd's own handler for --logfile (installed while twistd starts
    its logging, before the service starts) gives up its file: after
    logrotate moved it, USR1 opens a new one at the same path."""
    from twisted.scripts._twistd_unix import UnixAppLogger

    path = tmp_path / "twistd.log"
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    observer = UnixAppLogger({"logfile": str(path), "nodaemon": True})._getLogObserver()
    try:
        assert twistd_log_file(signal.getsignal(signal.SIGUSR1)) is observer._outFile
        signals.startService()
        assert signals.log_file is observer._outFile
        signals.log_file.write(b"before\n")
        os.rename(path, tmp_path / "twistd.log.1")  # logrotate
        kill(signal.SIGUSR1)
        signals.reactor.run_calls()
        signals.log_file.write(b"after\n")
        assert path.read_bytes() == b"after\n"
        assert (tmp_path / "twistd.log.1").read_bytes() == b"before\n"
    finally:
        observer._outFile.close()


def test_no_log_file_in_a_plain_handler():
    assert twistd_log_file(signal.SIG_DFL) is None
    assert twistd_log_file(lambda n, f: None) is None


# --- sd_notify -----------------------------------------------------------------------

def test_sd_notify_sends_one_datagram(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path})
        assert s.recv(100) == b"READY=1"


def test_sd_notify_to_an_abstract_socket():
    name = f"mailguard-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"


def test_sd_notify_without_systemd_does_nothing(tmp_path):
    assert sd_notify("READY=1", {}) is False
    with LogCapture() as logged:
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert "cannot notify systemd" in logged.text()
