"""Process signals as a mail administrator expects them, and systemd's
readiness protocol.

==========  ===============================================================
``HUP``     reload the configuration (L{MailguardService.reload
            <mailguard.lifecycle.MailguardService.reload>})
``USR1``    reopen twistd's ``--logfile`` (after logrotate moved it) and
            flush the security log; never kills
``TERM``    graceful stop (L{mailguard.smtpd.drain}); exit status 0
``INT``     the same
second      ``TERM``/``INT`` during the stop: the grace ends now
==========  ===============================================================

A signal handler only hands the work to the reactor
(C{reactor.callFromThread}), the way Twisted's own handlers do, so it runs
between two reactor iterations, whether twistd runs in the foreground
(``-n``) or as a daemon.  ``HUP`` and ``USR1`` are installed when the
service starts (after twistd has forked and opened its log), ``TERM`` and
``INT`` once the reactor runs, replacing Twisted's: Twisted would end the
process by that signal after the stop (exit status 143) instead of 0.

With ``NOTIFY_SOCKET`` set (systemd ``Type=notify``), L{sd_notify} tells
systemd ``READY=1`` once the listeners are up, ``RELOADING=1`` ... ``READY=1``
around each reload, ``STOPPING=1`` at the stop, and a ``STATUS=`` line.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from twisted.application import service
from twisted.internet import error
from twisted.logger import Logger

__all__ = ["ProcessSignals", "sd_notify", "twistd_log_file"]

log = Logger()


def sd_notify(state: str, environ=os.environ) -> bool:
    """Send C{state} to systemd's notification socket, if there is one
    (``NOTIFY_SOCKET``; an abstract socket when it starts with ``@``).
    True if sent.  Never raises: systemd may be gone already."""
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode("utf-8"))
        return True
    except OSError as e:
        log.warn("cannot notify systemd at {path}: {error}", path=environ.get("NOTIFY_SOCKET"), error=e)
        return False


def twistd_log_file(handler):
    """The log file twistd's own ``SIGUSR1`` handler would rotate, or None.

    twistd (C{twisted.scripts._twistd_unix.UnixAppLogger}) installs that
    handler when it logs to a file; the file object is in the handler's
    closure.  Anything with a C{reopen} method there is it."""
    for cell in getattr(handler, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(getattr(value, "reopen", None)):
            return value
    return None


class ProcessSignals(service.Service):
    """Installs the signal handlers for L{top <mailguard.lifecycle.MailguardService>}.

    Add it last to the application (C{mailguard.tap} does), so that it
    starts once the listeners are listening.

    @param notify: L{sd_notify}, or a stand-in in tests.
    """

    name = "signals"

    def __init__(self, top, reactor, notify=sd_notify) -> None:
        self.top = top
        self.reactor = reactor
        self.notify = notify
        self.log_file = None  # twistd's --logfile, when it has one
        self.stopping = False
        self._previous: dict[int, object] = {}

    def startService(self) -> None:
        super().startService()
        previous = self._install(signal.SIGUSR1, self.usr1)
        self.log_file = twistd_log_file(previous)
        self._install(signal.SIGHUP, self.hup)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        """After the reactor's own handlers are in place: replace them."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._install(signum, self.stop)
        self.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")

    def _install(self, signum: int, action):
        def handler(number, frame):
            self.reactor.callFromThread(action, number)

        old = signal.signal(signum, handler)
        self._previous.setdefault(signum, old)
        return old

    def stopService(self):
        """The stop has begun: the handlers stay (a HUP now is ignored, a
        second TERM hurries the stop) until the process ends."""
        self.stopping = True
        return super().stopService()

    def uninstall(self) -> None:
        """Put back the handlers found at the start (for tests)."""
        for signum, old in self._previous.items():
            signal.signal(signum, old)
        self._previous.clear()

    @property
    def _stopping(self) -> bool:
        return self.stopping or getattr(self.top, "drain", None) is not None

    # -- what each signal does, on the reactor thread -----------------------------------------
    def hup(self, signum: int = signal.SIGHUP):
        if self._stopping:
            log.info("SIGHUP during the stop: ignored")
            return None
        log.info("SIGHUP: reloading the configuration")
        usec = int(time.monotonic() * 1_000_000)
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration")

        def done(result):
            status = "serving (configuration reloaded)" if result.ok else \
                "serving the previous configuration: the reload failed, see the log"
            self.notify(f"READY=1\nSTATUS={status}")
            return result

        return self.top.reload().addCallback(done)

    def usr1(self, signum: int = signal.SIGUSR1) -> None:
        if self.log_file is not None:
            self.log_file.reopen()
            what = f"reopened {getattr(self.log_file, 'path', 'the log file')}"
        else:
            what = "no log file to reopen (twistd logs to standard output or syslog)"
        flush = getattr(self.top.context.security_log, "flush", None)
        if flush is not None:
            flush()
        log.info("SIGUSR1: {what}; the security log is opened at each write", what=what)

    def stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            log.warn("{name} again: ending the grace now", name=name)
            self.top.hurry()
            return
        grace = self.top.context.config.shutdown_grace
        log.info("{name}: stopping gracefully (messages in DATA have {grace:g} s to finish)",
                 name=name, grace=grace)
        self.notify("STOPPING=1\nSTATUS=stopping")
        self.stopping = True
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass
