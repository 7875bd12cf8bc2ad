"""A whole server context wired as production wires it, and a client
session driven over a C{StringTransport} on a C{task.Clock}."""

from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

__all__ = ["ClientSession", "LogCapture", "TLSStringTransport", "b64", "connect", "make_context"]


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
