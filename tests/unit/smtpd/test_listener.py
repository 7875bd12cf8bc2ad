"""Listeners: endpoint descriptions in, one-line mistakes out; a listener
listens once, however many of listen/privilegedStartService/startService
run; addresses are written as administrators write them."""

from __future__ import annotations

import errno
import socket

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

from mailguard.smtpd import listener as mod
from mailguard.smtpd.listener import Listener, ListenError, format_address, is_local, listener_values, parse


@pytest.mark.parametrize("value, expected", [
    (None, []),
    ("", []),
    ("tcp:25", ["tcp:25"]),
    (["tcp:25", "", "tcp6:25"], ["tcp:25", "tcp6:25"]),
    ((), []),
])
def test_listener_values(value, expected):
    assert listener_values(value) == expected


@pytest.mark.parametrize("description, line", [
    ("tcp:2525:interfce=127.0.0.1",
     '--smtp tcp:2525:interfce=127.0.0.1: unknown parameter "interfce" (see Twisted\'s endpoint documentation)'),
    ("tpc:25", "--smtp tpc:25: unknown endpoint type 'tpc' (tcp, tcp6, ssl, unix, systemd, haproxy:...)"),
    ("tcp:abc", "--smtp tcp:abc: not a valid endpoint description (invalid literal for int() with base 10: 'abc')"),
    ("haproxy:tcp:25:interfce=x", '--smtp haproxy:tcp:25:interfce=x: unknown parameter "interfce" '
                                  "(see Twisted's endpoint documentation)"),
    ("ssl:465:privateKey=/nonexistent/key.pem:certKey=/nonexistent/cert.pem",
     "--smtp ssl:465:privateKey=/nonexistent/key.pem:certKey=/nonexistent/cert.pem: "
     "/nonexistent/cert.pem: No such file or directory"),
])
def test_a_bad_description_is_one_line(description, line):
    with pytest.raises(ListenError) as e:
        parse(MemoryReactor(), "smtp", description)
    assert str(e.value) == line


def test_systemd_without_sockets(monkeypatch):
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ListenError) as e:
        parse(MemoryReactor(), "submission", "systemd:domain=INET:index=0")
    assert str(e.value) == ("--submission systemd:domain=INET:index=0: systemd passed no socket: LISTEN_FDS is "
                            "not set (start mailguard from its socket unit, or use a tcp: endpoint)")


def test_systemd_without_the_named_socket(monkeypatch):
    """The sockets twistd saw at import are none (this process was not
    socket-activated); the line says what the environment holds."""
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "smtp:imap")
    with pytest.raises(ListenError) as e:
        parse(MemoryReactor(), "smtp", "systemd:domain=INET:name=submission")
    assert str(e.value) == ("--smtp systemd:domain=INET:name=submission: systemd passed 2 socket(s) named "
                            "smtp, imap, none named 'submission'")
    monkeypatch.delenv("LISTEN_FDNAMES")
    with pytest.raises(ListenError) as e:
        parse(MemoryReactor(), "smtp", "systemd:domain=INET:name=smtp")
    assert "without names (LISTEN_FDNAMES is not set)" in str(e.value)
    with pytest.raises(ListenError) as e:
        parse(MemoryReactor(), "smtp", "systemd:domain=INET:index=5")
    assert str(e.value).endswith("systemd passed 2 socket(s): the index is out of range")


@pytest.mark.parametrize("error, line", [
    (CannotListenError("127.0.0.1", 2525, OSError(errno.EADDRINUSE, "Address already in use")),
     "cannot listen on 127.0.0.1:2525: address already in use (another server listens there: "
     "stop it or choose another port)"),
    (CannotListenError("", 25, OSError(errno.EACCES, "Permission denied")),
     "cannot listen on *:25: permission denied (a port below 1024 needs root: start twistd as root "
     "with --uid/--gid, which drops privileges after binding)"),
    (CannotListenError("", 2525, OSError(errno.EACCES, "Permission denied")),
     "cannot listen on *:2525: permission denied"),
    (CannotListenError("::", 25, OSError(errno.EADDRINUSE, "Address already in use")),
     "cannot listen on [::]:25: address already in use (another server listens there: "
     "stop it or choose another port)"),
    (CannotListenError("192.0.2.1", 25, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")),
     "cannot listen on 192.0.2.1:25: address not available (the interface is not an address of this host)"),
    (CannotListenError("nohost.invalid", 25, socket.gaierror(-2, "Name or service not known")),
     "cannot listen on nohost.invalid:25: unknown interface address (Name or service not known)"),
    (CannotListenError(None, b"/var/spool/mailguard/control", "Cannot acquire lock"),
     "cannot listen on /var/spool/mailguard/control: its lock is held by a running process "
     "(is another mailguard running on this spool?)"),
    (OverflowError("bind(): port must be 0-65535."), "the port must be 0 to 65535"),
    (OSError(errno.EMFILE, "Too many open files"), "too many open files"),
])
def test_listen_problems(error, line):
    assert mod._listen_problem(error) == line


class _Refusing:
    """An endpoint whose listen fails at once, as a real busy port does."""

    def __init__(self, error):
        self.error = error

    def listen(self, factory):
        from twisted.internet import defer

        return defer.fail(self.error)


def test_listen_raises_the_line():
    refused = Listener("smtp", "tcp:2525", _Refusing(CannotListenError(
        "127.0.0.1", 2525, OSError(errno.EADDRINUSE, "x"))), Factory())
    with pytest.raises(ListenError, match=r"^--smtp tcp:2525: cannot listen on 127.0.0.1:2525: address already"):
        refused.listen()


def test_a_real_busy_port_is_one_line():
    """On a real socket (loopback): someone else holds the port."""
    from twisted.internet import reactor

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        desc = f"tcp:{port}:interface=127.0.0.1"
        busy = Listener("submission", desc, parse(reactor, "submission", desc), Factory())
        with pytest.raises(ListenError) as e:
            busy.listen()
    assert str(e.value) == (f"--submission {desc}: cannot listen on 127.0.0.1:{port}: address already in use "
                            "(another server listens there: stop it or choose another port)")


def test_a_listener_listens_once_and_stops():
    reactor = MemoryReactor()
    factory = Factory.forProtocol(Protocol)
    one = Listener("smtp", "tcp:0:interface=127.0.0.1", parse(reactor, "smtp", "tcp:0:interface=127.0.0.1"),
                   factory)
    assert one.name == "smtp tcp:0:interface=127.0.0.1"
    assert one.address() == "(not listening)"
    one.listen()
    one.privilegedStartService()
    one.startService()
    assert len(reactor.tcpServers) == 1
    port_number, used, _, interface = reactor.tcpServers[0]
    assert (port_number, used, interface) == (0, factory, "127.0.0.1")
    assert one.address() == format_address(one.port.getHost())
    stopped = []
    one.port.stopListening = lambda: stopped.append(True)
    one.stopService()
    assert one.port is None and not one.running
    assert stopped == [True]


def test_a_proxied_listener_knows_it():
    assert Listener("smtp", "haproxy:tcp:25", None, Factory()).proxied
    assert not Listener("smtp", "tcp:25", None, Factory()).proxied


@pytest.mark.parametrize("address, text, local", [
    (IPv4Address("TCP", "127.0.0.1", 2525), "127.0.0.1:2525", True),
    (IPv4Address("TCP", "127.0.0.53", 25), "127.0.0.53:25", True),
    (IPv4Address("TCP", "0.0.0.0", 25), "0.0.0.0:25", False),
    (IPv4Address("TCP", "192.0.2.1", 25), "192.0.2.1:25", False),
    (IPv6Address("TCP", "::1", 25), "[::1]:25", True),
    (IPv6Address("TCP", "::", 25), "[::]:25", False),
    (IPv6Address("TCP", "::ffff:127.0.0.1", 25), "[::ffff:127.0.0.1]:25", True),
    (IPv6Address("TCP", "::ffff:192.0.2.1", 25), "[::ffff:192.0.2.1]:25", False),
    (IPv6Address("TCP", "fe80::1%lo", 25), "[fe80::1%lo]:25", False),
    (UNIXAddress(b"/run/mailguard.sock"), "/run/mailguard.sock", True),
])
def test_addresses(address, text, local):
    assert format_address(address) == text
    assert is_local(address) is local
