"""In-memory fakes of mailguard's interfaces, for tests of mailguard and of
code built on it (in the manner of C{txacme.testing}).

Each fake implements its interface fully and passes the same contract tests
as the real implementation (see C{tests/unit/policy/test_directory.py}), so a test that
uses a fake tests real behaviour.  Keep one section per interface, in the
order of L{mailguard.interfaces}.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from zope.interface import implementer

from mailguard.policy.directory import Lookup, LookupStatus, normalise_domain, split_address
from mailguard.interfaces import IUserDirectory

__all__ = ["FakeUserDirectory", "connect", "make_context"]


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


def connect(context, client_ip="127.0.0.3", client_port=40000, listener="smtp"):
    """A protocol connected to a C{StringTransport} from C{client_ip}:
    returns C{(protocol, transport)}.  C{transport.value()} holds what the
    server wrote; C{transport.clear()} forgets it."""
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.internet.testing import StringTransport

    from mailguard.smtpd.factory import MailguardFactory

    factory = MailguardFactory(context, listener)
    address_type = IPv6Address if ":" in client_ip else IPv4Address
    transport = StringTransport(peerAddress=address_type("TCP", client_ip, client_port),
                                hostAddress=address_type("TCP", client_ip, 25))
    proto = factory.buildProtocol(transport.getPeer())
    proto.makeConnection(transport)
    return proto, transport
