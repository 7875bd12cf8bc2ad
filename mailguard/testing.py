"""In-memory fakes of mailguard's interfaces, for tests of mailguard and of
code built on it (in the manner of C{txacme.testing}).

Each fake implements its interface fully and passes the same contract tests
as the real implementation (see C{tests/unit/policy/test_directory.py}), so a test that
uses a fake tests real behaviour.  Keep one section per interface, in the
order of L{mailguard.interfaces}.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Mapping

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from mailguard.policy.directory import Lookup, LookupStatus, normalise_domain, split_address
from mailguard.interfaces import IUserDirectory

__all__ = ["ClientSession", "FakeUserDirectory", "LogCapture", "TLSStringTransport", "b64", "connect",
           "make_context"]


# --- IUserDirectory -------------------------------------------------------


@implementer(IUserDirectory)
class FakeUserDirectory:
    """A user directory from a plain mapping.

        FakeUserDirectory(
            {"john@example.com": "known", "old@example.com": "disabled"},
            domains=["example.com"],
            domain_aliases={"example.net": "example.com"},
        )

    @param users: address -> C{"known"} or C{"disabled"} (an account), or a
        L{Lookup} to answer for that address as it is (an alias, say).
        Addresses are matched case-insensitively.
    @param domains: the local (primary) domains; by default the domains of
        C{users}.
    @param domain_aliases: alias domain -> primary domain.
    """

    def __init__(
        self,
        users: Mapping[str, str | Lookup],
        domains: Iterable[str] | None = None,
        domain_aliases: Mapping[str, str] | None = None,
    ):
        self._entries: dict[str, Lookup] = {}
        self._accounts: list[str] = []
        for address, value in users.items():
            local, domain, _ = split_address(address)
            key = f"{local.lower()}@{domain}"
            if isinstance(value, Lookup):
                self._entries[key] = value
            elif value in ("known", "disabled"):
                status = LookupStatus.KNOWN if value == "known" else LookupStatus.DISABLED
                mailboxes = (key,) if value == "known" else ()
                self._entries[key] = Lookup(status, key, mailboxes)
                self._accounts.append(key)
            else:
                raise ValueError(f"{address}: expected 'known', 'disabled' or a Lookup")
        if domains is None:
            domains = dict.fromkeys(k.rpartition("@")[2] for k in self._entries)
        self._primaries = tuple(normalise_domain(d) for d in domains)
        self._domains = {d: d for d in self._primaries}
        for alias, primary in (domain_aliases or {}).items():
            self._domains[normalise_domain(alias)] = normalise_domain(primary)

    def is_local_domain(self, domain: str) -> bool:
        return normalise_domain(domain) in self._domains

    def canonical_domain(self, domain: str) -> str | None:
        return self._domains.get(normalise_domain(domain))

    def lookup(self, address: str) -> Lookup:
        local, domain, has_at = split_address(address)
        primary = self._domains.get(domain)
        if primary is None:
            if has_at and domain:
                return Lookup(LookupStatus.NOT_LOCAL, f"{local}@{domain}")
            normalised = f"{local.lower()}@{domain}" if has_at else local.lower()
            return Lookup(LookupStatus.UNKNOWN, normalised)
        found = self._entries.get(f"{local.lower()}@{primary}")
        if found is None:
            return Lookup(LookupStatus.UNKNOWN, f"{local.lower()}@{domain}")
        return found

    def __len__(self) -> int:
        return len(self._accounts)

    def domains(self) -> tuple[str, ...]:
        return self._primaries

    def users(self) -> Iterator[str]:
        return iter(self._accounts)


# --- a whole server context, for protocol tests ------------------------------


def make_context(config=None, *, clock=None, spool=None, tables=None, gateway=None, **overrides):
    """A L{mailguard.smtpd.factory.ServerContext} wired like production:
    the policies come from L{mailguard.policy.build.build_policies} (the
    function C{mailguard.service} uses), built from C{config} (default: the
    embedded example), on a C{task.Clock}, with a Maildir store under
    C{spool} whose disk work runs inline, and an unthreaded security log.

    C{overrides} replace any context field, or any policy by its name
    (C{recipients}, C{vrfy}, C{trust}, C{greeting}, C{passwords}): a fake
    policy, say.  Protocol tests drive a session with it over a
    C{StringTransport}; see L{connect}.
    """
    import dataclasses
    import os
    import tempfile

    from twisted.internet.task import Clock

    from mailguard.config import settings
    from mailguard.policy.build import Policies, build_policies
    from mailguard.smtpd.factory import ServerContext
    from mailguard.smtpd.seclog import SecurityLog
    from mailguard.store.maildir import MaildirStore, run_inline

    config = config if config is not None else settings.load(None)
    clock = clock if clock is not None else Clock()
    spool = spool if spool is not None else tempfile.mkdtemp(prefix="mailguard-test-")
    policies = build_policies(config, clock, tables=tables, gateway=gateway)
    policy_names = {f.name for f in dataclasses.fields(Policies)}
    policy_overrides = {k: overrides.pop(k) for k in list(overrides) if k in policy_names}
    fields = dict(
        config=config,
        clock=clock,
        policies=dataclasses.replace(policies, **policy_overrides),
        store=_opened(MaildirStore(spool, run_inline)),
        security_log=SecurityLog(os.path.join(spool, "security.log"), clock, threaded=False),
    )
    fields.update(overrides)
    return ServerContext(**fields)


# --- one client session, driven over a StringTransport ---------------------------


class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the call and the
    bytes written before it, so a test can tell plaintext from TLS.  (It
    does not claim C{ITLSTransport}: it has none of ITCPTransport's knobs.)"""

    tls_context = None
    before_tls = b""

    def startTLS(self, contextFactory, normal=True):
        self.before_tls = self.value()
        self.clear()
        self.tls_context = contextFactory


class ClientSession:
    """One client's connection to a real L{MailguardESMTP}, over a
    L{TLSStringTransport}, time on the context's clock.

    C{proto} and C{transport} are there for tests that drive the protocol
    directly; a session also unpacks as C{(proto, transport)}.  Nothing
    the server wrote is forgotten until L{take} takes it (the greeting
    included).
    """

    def __init__(self, context, client_ip: str = "127.0.0.3", client_port: int = 40000,
                 listener: str = "smtp", transport_class=TLSStringTransport, factory=None) -> None:
        from mailguard.smtpd.factory import MailguardFactory

        self.context = context
        # A listener's own factory (a reload changes its context), or one for this session.
        self.factory = factory if factory is not None else MailguardFactory(context, listener)
        address_type = IPv6Address if ":" in client_ip else IPv4Address
        self.transport = transport_class(peerAddress=address_type("TCP", client_ip, client_port),
                                         hostAddress=address_type("TCP", client_ip, 25))
        self.proto = self.factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)

    def __iter__(self):
        return iter((self.proto, self.transport))

    def send(self, data: bytes | str) -> bytes:
        """Feed bytes; return (and take) what the server wrote."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str) -> bytes:
        return self.send(line + "\r\n")

    def take(self) -> bytes:
        """What the server wrote since the last take."""
        out = self.transport.value()
        self.transport.clear()
        return out

    @staticmethod
    def codes(out: bytes) -> list[str]:
        """The code (with enhanced code) of every final reply line in C{out}."""
        return [" ".join(line.split(" ")[:2]) for line in out.decode().split("\r\n")
                if line[:3].isdigit() and line[3:4] == " "]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self, reason=None) -> None:
        """The connection is gone (StringTransport never says so itself)."""
        self.proto.connectionLost(reason)


def connect(context, client_ip: str = "127.0.0.3", client_port: int = 40000,
            listener: str = "smtp", **kw) -> ClientSession:
    """A L{ClientSession} from C{client_ip} to C{listener}: connected,
    greeted or held as the policies decide."""
    return ClientSession(context, client_ip, client_port, listener, **kw)


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


class LogCapture:
    """Every twisted.logger event while active, raw and formatted."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def __enter__(self) -> "LogCapture":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)

    def text(self) -> str:
        """Everything an observer could write: formatted messages, every
        field's repr, and any failure's traceback."""
        out = []
        for e in self.events:
            out.append(formatEvent(e) or "")
            out.append(repr(e))
            f = e.get("log_failure")
            if f is not None:
                out.append(f.getTraceback())
        return "\n".join(out)


# --- the store, opened (as mailguard.service opens it at start-up) -----------


def _opened(store):
    """C{store} after its start-up step (its directories exist)."""
    store.open()
    return store


# --- a scriptable SMTP back-end, in memory -----------------------------------
#
# One fake next hop for every client mailguard runs: the relay queue's
# RelayClient and the gateway's VrfyClient.  (Imports are kept in this
# section so that it stands alone.)

import re  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from twisted.internet import defer  # noqa: E402
from twisted.internet.error import ConnectionRefusedError  # noqa: E402
from twisted.internet.interfaces import IStreamClientEndpoint  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

__all__ += ["FakeSMTPBackend", "FakeSMTPServer", "Transaction", "result_of"]

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
