"""One listener: a kind (smtp, submission, smtps) on one endpoint.

``twistd`` builds the service (``makeService``), then forks, binds in
``privilegedStartService``, drops privileges and starts.  A port that is in
use would then fail in the forked child, as a traceback in the log and, as
a daemon, a truncated ``repr`` on the terminal.  A L{Listener} can instead
be told to L{listen <Listener.listen>} at once, from ``makeService``: the
port is bound before the fork (still as root, so ports below 1024 work
with ``--uid``), and a mistake is a L{ListenError} whose message is the one
line to print.  Embedding applications need not call it: the service
listens when it starts, as Twisted's ``StreamServerEndpointService`` does.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

KINDS = ("smtp", "smtps", "submission")
PROXY_PREFIX = "haproxy:"


class ListenError(Exception):
    """A listener that cannot be made or cannot listen; the message is one
    line naming the option, the endpoint and what to fix."""


def listener_values(value) -> list[str]:
    """A listener option's value as a list of endpoint descriptions: one
    string (the library's C{{"smtp": "tcp:25"}}), several (the repeatable
    twistd option), or none; empty strings mean "none"."""
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v]


def split_proxy(description: str) -> tuple[str, bool]:
    """(the inner endpoint description, whether it is behind ``haproxy:``)."""
    if description.startswith(PROXY_PREFIX):
        return description[len(PROXY_PREFIX):], True
    return description, False


def parse(reactor, kind: str, description: str):
    """The server endpoint C{description} names, or L{ListenError}.
    ``haproxy:`` is left to the caller (L{split_proxy}): mailguard reads the
    PROXY header itself (L{mailguard.smtpd.proxy})."""
    inner, _ = split_proxy(description)
    try:
        return endpoints.serverFromString(reactor, inner)
    except Exception as e:
        raise ListenError(f"--{kind} {description}: {_parse_problem(inner, e)}") from None


def _parse_problem(inner: str, e: Exception) -> str:
    text = str(e)
    unexpected = re.search(r"unexpected keyword argument '([^']*)'", text)
    if isinstance(e, TypeError) and unexpected:
        return f'unknown parameter "{unexpected.group(1)}" (see Twisted\'s endpoint documentation)'
    if inner.startswith("systemd:") and isinstance(e, (IndexError, KeyError)):
        return _systemd_problem(e)
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    if text.startswith("Unknown endpoint type"):
        return f"unknown endpoint type {text.split(':', 1)[1].strip()} (tcp, tcp6, ssl, unix, systemd, haproxy:...)"
    return f"not a valid endpoint description ({text})"


def _systemd_problem(e: Exception) -> str:
    if "LISTEN_FDS" not in os.environ:
        return ("systemd passed no socket: LISTEN_FDS is not set (start mailguard from its "
                "socket unit, or use a tcp: endpoint)")
    names = os.environ.get("LISTEN_FDNAMES", "")
    have = f"systemd passed {os.environ['LISTEN_FDS']} socket(s)"
    if isinstance(e, KeyError):
        named = f"named {names.replace(':', ', ')}" if names else "without names (LISTEN_FDNAMES is not set)"
        return f"{have} {named}, none named {e}"
    return f"{have}: the index is out of range"


def _listen_problem(e: BaseException) -> str:
    if isinstance(e, OverflowError):
        return "the port must be 0 to 65535"
    if isinstance(e, CannotListenError):
        if e.interface is None:  # a UNIX socket: the port is its path
            where = os.fsdecode(e.port)
        else:
            host = e.interface or "*"
            where = f"[{host}]:{e.port}" if ":" in host else f"{host}:{e.port}"
        return f"cannot listen on {where}: {_socket_problem(e.socketError, e.port)}"
    if isinstance(e, OSError):
        return _socket_problem(e, None)
    return f"cannot listen: {e}"


def _socket_problem(e, port) -> str:
    if e == "Cannot acquire lock":  # Twisted's UNIX port with wantPID
        return "its lock is held by a running process (is another mailguard running on this spool?)"
    if isinstance(e, socket.gaierror):
        return f"unknown interface address ({e.strerror or e})"
    code = getattr(e, "errno", None)
    if code == errno.EADDRINUSE:
        return "address already in use (another server listens there: stop it or choose another port)"
    if code in (errno.EACCES, errno.EPERM):
        low = isinstance(port, int) and 0 < port < 1024
        hint = (" (a port below 1024 needs root: start twistd as root with --uid/--gid, "
                "which drops privileges after binding)") if low else ""
        return f"permission denied{hint}"
    if code == errno.EADDRNOTAVAIL:
        return "address not available (the interface is not an address of this host)"
    return (getattr(e, "strerror", None) or str(e)).lower()


def format_address(address) -> str:
    """An address as an administrator writes it: C{127.0.0.1:25},
    C{[::1]:25}, or the path of a UNIX socket."""
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address)


def is_local(address) -> bool:
    """True for an address only this host can reach: loopback (IPv4,
    IPv6, IPv4-mapped) or a UNIX socket."""
    if isinstance(address, UNIXAddress):
        return True
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return False
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


class Listener(service.Service):
    """A listener of one C{kind} on one endpoint; it listens once, at the
    first of L{listen}, C{privilegedStartService} or C{startService}.

    @ivar port: the C{IListeningPort} once listening, else None.
    """

    def __init__(self, kind: str, description: str, endpoint, factory, label: str | None = None) -> None:
        self.kind = kind
        self.description = description
        self.label = label or f"--{kind} {description}"  # what a mistake names
        self.endpoint = endpoint
        self.factory = factory
        self.proxied = split_proxy(description)[1]
        self.port = None
        self._pending: defer.Deferred | None = None
        self.setName(f"{kind} {description}")

    def listen(self):
        """Bind now; the port, or L{ListenError}.  An endpoint that cannot
        answer at once (none of Twisted's stream endpoints) is left to
        finish, and a later failure is logged."""
        if self.port is not None or self._pending is not None:
            return self.port
        results: list = []
        d = self.endpoint.listen(self.factory)
        d.addBoth(results.append)
        if not results:
            self._pending = d
            d.addCallback(self._listening)
            d.addErrback(self._late_failure)
            return None
        if isinstance(results[0], Failure):
            raise ListenError(f"{self.label}: {_listen_problem(results[0].value)}")
        self._listening(results[0])
        return self.port

    def _listening(self, port) -> None:
        self.port, self._pending = port, None

    def _late_failure(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(defer.CancelledError):
            return
        log.critical("{label}: {problem}", label=self.label, problem=_listen_problem(failure.value))

    def address(self) -> str:
        """Where it listens (the real port, also when given as 0)."""
        return format_address(self.port.getHost()) if self.port is not None else "(not listening)"

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listen()

    def startService(self) -> None:
        super().startService()
        self.listen()

    def stopService(self):
        super().stopService()
        if self._pending is not None:
            self._pending.cancel()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
