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
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from mailguard.policy.directory import Lookup, LookupStatus, normalise_domain, split_address
from mailguard.interfaces import IUserDirectory

__all__ = ["ClientSession", "FakeUserDirectory", "LogCapture", "TLSStringTransport", "b64", "body_of",
           "connect", "maildir_messages", "make_context"]


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
        store=MaildirStore(spool, run_inline),
        security_log=SecurityLog(os.path.join(spool, "security.log"), clock, threaded=False),
    )
    fields.update(overrides)
    return ServerContext(**fields)


# --- one client session, driven over a StringTransport ---------------------------


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the call and the
    bytes written before it, so a test can tell plaintext from TLS."""

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
                 listener: str = "smtp", transport_class=TLSStringTransport) -> None:
        from mailguard.smtpd.factory import MailguardFactory

        self.context = context
        self.factory = MailguardFactory(context, listener)
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


def maildir_messages(context, mailbox: str) -> list[bytes]:
    """The messages in C{mailbox}'s Maildir C{new/}, oldest name first."""
    local, domain = mailbox.split("@")
    new = Path(context.store.spool) / "mail" / domain / local / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def body_of(message: bytes) -> bytes:
    """The stored message without the Return-Path and Received headers
    mailguard prepends."""
    assert message.startswith(b"Return-Path: <")
    message = message[message.index(b"\r\n") + 2:]
    assert message.startswith(b"Received: ")
    # The header ends with ";" CRLF TAB date CRLF (the body may itself
    # start with whitespace, so folding cannot tell where it ends).
    date = message.index(b";\r\n\t") + 4
    return message[message.index(b"\r\n", date) + 2:]


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
