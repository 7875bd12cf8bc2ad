"""The queue's control socket: how ``python -m mailguard queue`` steers a
running server.

A UNIX socket, ``SPOOL/control`` (mode 0600: only the user the server
started as may use it -- root, or the mailguard user), with a lock file
``SPOOL/control.lock`` holding the server's pid, so that a socket left by
a killed server is replaced at the next start and a second server on the
same spool cannot start.  One request per connection, one JSON object per
line each way::

    -> {"op": "hold", "arg": "M123456P789Q4"}
    <- {"ok": true, "ids": ["1733.M123456P789Q4.mx"]}

``op`` is one of L{mailguard.store.queueadmin.OPERATIONS}; the answer
comes once the change is on disk.  The queue itself does the work
(L{mailguard.store.queueadmin.QueueAdmin}): it is the only writer of its
spool while it runs.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from mailguard.store.queueadmin import OPERATIONS

__all__ = ["ControlFactory", "control_path", "request"]

log = Logger()

SOCKET_NAME = "control"
MAX_PATH = 107  # sun_path is 108 bytes with its NUL


def control_path(spool: str) -> str:
    return os.path.join(os.path.abspath(spool), SOCKET_NAME)


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def lineReceived(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            op, arg = req["op"], req.get("arg")
            if op not in OPERATIONS or not (arg is None or isinstance(arg, str)):
                raise ValueError(op)
        except (ValueError, KeyError, TypeError):
            return self._answer({"ok": False, "error": "bad request"})
        d = defer.maybeDeferred(getattr(self.factory.queue, op), arg)
        d.addCallbacks(lambda ids: self._answer({"ok": True, "ids": ids}), self._failed)

    def _failed(self, failure) -> None:
        log.failure("queue control request failed", failure)
        self._answer({"ok": False, "error": f"failed: {failure.getErrorMessage()}"})

    def _answer(self, obj) -> None:
        if self.transport is not None:
            self.sendLine(json.dumps(obj).encode("utf-8"))
            self.transport.loseConnection()

    def lineLengthExceeded(self, line) -> None:
        self._answer({"ok": False, "error": "request too long"})


class ControlFactory(Factory):
    protocol = ControlProtocol
    noisy = False

    def __init__(self, queue) -> None:
        self.queue = queue


def request(spool: str, op: str, arg: str | None, timeout: float = 60.0) -> dict | None:
    """Ask the server running on C{spool} (blocking; for the command
    line).  None when no server answers there: none is running."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(control_path(spool))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        s.sendall(json.dumps({"op": op, "arg": arg}).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return json.loads(data) if data else {"ok": False, "error": "the server closed the connection"}
