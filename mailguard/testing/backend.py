"""A scriptable SMTP back-end, in memory: one fake next hop for every
client mailguard runs (the relay queue's RelayClient and the gateway's
VrfyClient), a real Twisted protocol over in-memory transports."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

__all__ = ["FakeSMTPBackend", "FakeSMTPServer", "Transaction", "result_of"]

_RCPT_ADDRESS = re.compile(r"<([^>]*)>")


def result_of(d: defer.Deferred):
    """The result of a Deferred that has already fired: its value, or its
    L{twisted.python.failure.Failure} for the test to C{check()} (handled
    here, so it is not logged as unhandled).  A Deferred that has not
    fired fails the test."""
    out: list = []
    d.addBoth(out.append)
    if not out:
        raise AssertionError("the Deferred has not fired")
    return out[0]


@dataclass
class Transaction:
    """One mail transaction as the back-end saw it."""

    mail: str  # the MAIL command line
    rcpts: list[str] = field(default_factory=list)  # the accepted RCPT command lines
    data: bytes | None = None  # the message (dot-unstuffed, CRLF lines)


class FakeSMTPServer(LineReceiver):
    """One connection to a L{FakeSMTPBackend}: a real Twisted protocol that
    answers as its back-end is scripted."""

    delimiter = b"\r\n"
    MAX_LENGTH = 100000

    def __init__(self, backend: "FakeSMTPBackend") -> None:
        self.backend = backend
        self.tx: Transaction | None = None
        self._line = ""  # the command line being answered
        self._data: list[bytes] | None = None  # lines of DATA, while in DATA

    def connectionMade(self) -> None:
        self.backend.servers.append(self)
        if self.backend.greeting:
            self.reply(self.backend.greeting)

    def connectionLost(self, reason=None) -> None:
        if self in self.backend.servers:
            self.backend.servers.remove(self)

    def reply(self, text: str) -> None:
        self.transport.write(text.encode("utf-8") + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        if self._data is not None:
            return self._data_line(line)
        b = self.backend
        text = line.decode("utf-8", "replace")
        b.commands.append(text)
        self._line = text
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb in b.silent:
            return
        answer = b.overrides.get(verb)
        if callable(answer):
            answer = answer(arg)
        if answer is not None:
            self.transport.write(answer)
            return
        handler = getattr(self, "smtp_" + verb, None)
        if handler is None:
            self.reply("500 5.5.2 Command not recognized")
        else:
            handler(arg)

    def smtp_EHLO(self, arg: str) -> None:
        lines = [self.backend.hostname, *self.backend.extensions]
        self.transport.write("".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n"
                                     for i, x in enumerate(lines)).encode("utf-8"))

    def smtp_HELO(self, arg: str) -> None:
        self.reply(f"250 {self.backend.hostname}")

    def smtp_VRFY(self, arg: str) -> None:
        mode = self.backend.vrfy
        if mode == "252":
            self.reply("252 2.1.5 Verification not supported")
        elif mode == "502":
            self.reply("502 5.5.1 VRFY command is disabled")
        elif self.backend.knows(address := arg.strip().strip("<>")):
            self.reply(f"250 2.1.5 <{address.lower()}>")
        else:
            self.reply("550 5.1.1 User unknown")

    def smtp_MAIL(self, arg: str) -> None:
        if self.tx is not None:
            self.reply("503 5.5.1 Sender already specified")
            return
        self.tx = Transaction(self._line)
        self.reply("250 2.1.0 Sender OK")

    def smtp_RCPT(self, arg: str) -> None:
        if self.tx is None:
            self.reply("503 5.5.1 Need MAIL first")
            return
        m = _RCPT_ADDRESS.search(arg)
        address = m.group(1) if m else arg.partition(":")[2].strip()
        reply = self.backend.rcpt_replies.get(address)
        if reply is None:
            reply = ("250 2.1.5 Recipient OK" if self.backend.knows(address)
                     else "550 5.1.1 Recipient address rejected: user unknown")
        if reply.startswith("2"):
            self.tx.rcpts.append(self._line)
        self.reply(reply)

    def smtp_DATA(self, arg: str) -> None:
        if self.tx is None or not self.tx.rcpts:
            self.reply("554 5.5.1 No valid recipients")
            return
        self._data = []
        self.reply("354 End data with <CR><LF>.<CR><LF>")

    def _data_line(self, line: bytes) -> None:
        if line != b".":
            self._data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        tx, self.tx = self.tx, None
        tx.data, self._data = b"".join(self._data), None
        reply = self.backend.data_reply(tx)
        if reply.startswith("2"):
            self.backend.messages.append(tx)
        self.reply(reply)

    def smtp_RSET(self, arg: str) -> None:
        self.tx = None
        self.reply("250 2.0.0 Reset state")

    def smtp_NOOP(self, arg: str) -> None:
        self.reply("250 2.0.0 OK")

    def smtp_QUIT(self, arg: str) -> None:
        self.reply("221 2.0.0 Bye")
        self.transport.loseConnection()


@implementer(IStreamClientEndpoint)
class FakeSMTPBackend:
    """A scriptable ESMTP server in memory, and the endpoint that connects a
    client to it: C{connect(factory)} builds the client's protocol and joins
    it to a new L{FakeSMTPServer} with C{twisted.test.iosim} (bytes in,
    bytes out, no socket); L{flush} moves the bytes.

    The script (change it at any time):

    - C{users}: the known addresses (VRFY, RCPT), or None: every recipient
      is accepted;
    - C{vrfy}: ``"answer"`` (from C{users}), ``"252"`` or ``"502"``;
    - C{greeting} (``""``: none), C{hostname}, C{extensions} (the EHLO
      reply after the hostname line);
    - C{overrides}: verb -> reply bytes as sent (CRLF included), or a
      callable C{arg -> bytes | None} (None: answer as usual);
    - C{silent}: verbs never answered;
    - C{rcpt_replies}: address -> reply line; C{data_reply}: transaction ->
      the reply line to the final dot;
    - C{up} (False: connections are refused) and C{hang} (connections
      never complete).

    What it saw: C{commands} (every command line, in order), C{messages}
    (the L{Transaction}s it accepted), C{servers} (open connections),
    C{attempts} (connections asked for, refused ones too).
    """

    def __init__(self, users=None, *, hostname: str = "backend.test",
                 extensions=("PIPELINING", "SIZE 1000000", "8BITMIME", "VRFY", "HELP")) -> None:
        self.users = None if users is None else {u.lower() for u in users}
        self.vrfy = "answer"
        self.hostname = hostname
        self.greeting = f"220 {hostname} ESMTP"
        self.extensions = list(extensions)
        self.overrides: dict = {}
        self.silent: set[str] = set()
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = lambda tx: "250 2.0.0 queued as X"
        self.up = True
        self.hang = False
        self.attempts = 0
        self.commands: list[str] = []
        self.messages: list[Transaction] = []
        self.servers: list[FakeSMTPServer] = []
        self.pumps: list = []

    def knows(self, address: str) -> bool:
        return self.users is None or address.lower() in self.users

    def connect(self, factory) -> defer.Deferred:
        from twisted.test import iosim

        self.attempts += 1
        if not self.up:
            return defer.fail(ConnectionRefusedError("refused"))
        if self.hang:
            return defer.Deferred()  # cancelling it is the only way out
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        server = FakeSMTPServer(self)
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server),
                                        client, iosim.makeFakeClient(client), greet=False))
        return defer.succeed(client)

    def flush(self) -> None:
        """Move bytes (and disconnections) until nothing moves."""
        for _ in range(10000):
            if not any([pump.flush(advanceClock=False) for pump in list(self.pumps)]):
                return
        raise AssertionError("the client and the fake back-end never stop talking")

    def drop_all(self) -> None:
        """The back-end goes away: every connection is cut."""
        for server in list(self.servers):
            server.transport.loseConnection()
        self.flush()

    def verbs(self, verb: str) -> list[str]:
        """The command lines that start with C{verb}."""
        return [c for c in self.commands if c.upper().startswith(verb.upper())]
