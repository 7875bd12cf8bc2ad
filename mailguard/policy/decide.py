"""Sans-IO decisions: who is trusted, which recipients are taken, what VRFY says.

The protocol gathers facts about a connection into a L{Session} and asks
the objects here; they answer with values (a L{RecipientVerdict}, a
L{mailguard.replies.Reply}).  Nothing here touches a reactor or a socket.
Deferreds appear only at the L{IRecipientPolicy}/L{IVrfyPolicy} boundary
(already fired, via ``defer.maybeDeferred``: a result, or a failure the
protocol answers with ``451 4.3.0``), so that a gateway back-end that
really does wait (VRFY over the network) fits the same seam.

Decisions taken here (the README repeats them for administrators):

- **Trust is the relay policy's notion and nothing else** (SPEC "Trust"):
  the client IP is in the relay IP group (with RelayControlIpGroupEnabled=1),
  or the session authenticated (with RelayControlAuthEnabled=1).  With
  RelayControlAuthEnabled=0 an authenticated user is *not* trusted: it may
  not relay and VRFY tells it nothing, exactly like an anonymous client.
  The sender (null, or in a local domain) and the HELO name never matter.
  The client address arrives normalised in the L{Session} facts
  (``::ffff:192.0.2.1`` is ``192.0.2.1``; see L{mailguard.policy.session}).
- **Hidden destinations** (``user%other@local``, ``"user@other"@local``,
  ``other!user@local``...; see L{mailguard.policy.addresses.hidden_destination})
  are refused before anything else, for trusted clients too: in a local
  domain they are accepted only when the directory knows that exact
  address as an account (its own mailbox: not an alias, not a wildcard
  catch-all, not a rewritten local part), and then delivered to that
  mailbox only (never forwarded); elsewhere they are refused as relaying.
  In a gateway domain they are refused (``550 5.1.1``): the back-end must
  never see them.
- **Order for RCPT**: address literal; hidden destination; a domain the
  gateway (if any) handles, decided by the gateway; a local domain, decided
  by the directory (KNOWN ``250 2.1.5``, UNKNOWN ``550 5.1.1``, DISABLED
  ``550 5.2.1``; a KNOWN address with neither mailbox nor forward is
  refused as unknown rather than accepted and lost); any other domain:
  relayed for a trusted client, ``554 5.7.1`` for anyone else.
- **Address literals** are never local (``user@[127.0.0.1]`` is not "us").
  A trusted client may relay to one, except to loopback, unspecified,
  link-local, multicast or reserved addresses, which nobody may use.
- **VRFY.** Disabled: ``502 5.5.1`` for everything.  An empty or
  unparseable argument: ``501 5.5.4`` for everyone; that depends on the
  syntax only and reveals nothing about users (both decided by
  L{mailguard.policy.rules.vrfy_refusal}, which the session asks first).  Untrusted: ``252 2.1.5``,
  byte for byte the same for every well-formed argument, and the directory
  is not consulted.  Trusted: ``250 2.1.5 <user@domain>`` for a known
  address; ``550 5.1.1`` for unknown, non-local and *disabled* accounts (a
  gateway asking VRFY must refuse mail for a disabled account, and a single
  negative code is what gateways understand).  A bare ``user`` is looked up
  in the primary domain when there is one, else in every primary domain:
  found in several, ``553 5.1.4``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

from twisted.internet import defer
from zope.interface import implementer

from mailguard import replies
from mailguard.policy.addresses import (
    AddressError,
    Mailbox,
    hidden_destination,
    parse_path,
    parse_vrfy_argument,
)
from mailguard.interfaces import IRecipientPolicy, ITrustPolicy, IVrfyPolicy
from mailguard.policy.rules import vrfy_refusal
from mailguard.policy.session import Session
from mailguard.replies import Reply

__all__ = [
    "RecipientVerdict",
    "TrustPolicy",
    "RecipientPolicy",
    "VrfyPolicy",
]


@dataclass(frozen=True)
class RecipientVerdict:
    """The decision on one RCPT TO.

    @ivar reply: what to answer.
    @ivar reason: why, for the log (never sent to the client).
    @ivar mailboxes: local accounts ("user@domain") to deliver to.
    @ivar relay: the message (also) goes to the relay queue / next hop.
    @ivar address: the canonical recipient.
    @ivar relay_to: the addresses the relay queue sends to: the recipient
        itself, or the external targets of an alias.  Given C{relay=True}
        and no C{relay_to}, it is C{(address,)}; given C{relay_to},
        C{relay} is true.
    """

    reply: Reply
    reason: str
    mailboxes: tuple[str, ...] = ()
    relay: bool = False
    address: str = ""
    relay_to: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "mailboxes", tuple(self.mailboxes))
        relay_to = tuple(self.relay_to)
        if self.relay and not relay_to and self.address:
            relay_to = (self.address,)
        object.__setattr__(self, "relay_to", relay_to)
        object.__setattr__(self, "relay", bool(self.relay or relay_to))
        if not self.accepted and (self.mailboxes or self.relay):
            raise ValueError("a refused recipient has no destinations")

    @property
    def accepted(self) -> bool:
        return self.reply.positive


# --- helpers ----------------------------------------------------------------------

def _status(result: Any) -> str:
    """The name of a lookup's status: KNOWN, UNKNOWN, DISABLED or NOT_LOCAL.

    Compared by name so that any enum with those members works (the real
    C{mailguard.policy.directory.LookupStatus} and test fakes alike)."""
    status = getattr(result, "status", None)
    return str(getattr(status, "name", status)).upper()


def _local_part(address: str) -> str:
    """The unquoted local part of a directory's "local@domain"."""
    try:
        mailbox = parse_path(address, allow_null=False)
    except AddressError:
        local = address.rpartition("@")[0]
        if len(local) >= 2 and local[0] == local[-1] == '"':
            local = local[1:-1]
        return local
    assert mailbox is not None
    return mailbox.local


def _exact_account(result: Any, mailbox: Mailbox) -> str | None:
    """The canonical address when the directory resolved C{mailbox} as an
    account with exactly this local part, else None.

    An account is its own mailbox; an alias, a wildcard (catch-all) or a
    lookup that rewrote the local part (``user%other`` read as ``user``) is
    not exact."""
    if _status(result) != "KNOWN":
        return None
    address = str(getattr(result, "address", "") or "")
    if _local_part(address).lower() != mailbox.local.lower():
        return None
    if address.lower() not in {m.lower() for m in result.mailboxes}:
        return None
    return address


def _unroutable_literal(mailbox: Mailbox) -> bool:
    ip = mailbox.ip_literal
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.is_reserved


# --- trust --------------------------------------------------------------------------

@implementer(ITrustPolicy)
class TrustPolicy:
    """SPEC "Trust": the relay IP group, or SMTP AUTH (each when enabled).

    @param ip_groups: an L{mailguard.interfaces.IIPGroups}.
    @param relay_group_enabled: RelayControlIpGroupEnabled.
    @param relay_group: RelayControlIpGroup (a group name).
    @param auth_enabled: RelayControlAuthEnabled.
    """

    def __init__(self, ip_groups, relay_group_enabled: bool, relay_group: str,
                 auth_enabled: bool):
        self.ip_groups = ip_groups
        self.relay_group_enabled = bool(relay_group_enabled)
        self.relay_group = relay_group
        self.auth_enabled = bool(auth_enabled)

    def why_trusted(self, session: Session) -> str | None:
        """``"relay-group"``, ``"auth"`` or None: the reason, for the log."""
        if self.relay_group_enabled and self.relay_group:
            if session.client_ip and self.ip_groups.contains(self.relay_group, session.client_ip):
                return "relay-group"
        if self.auth_enabled and session.authenticated:
            return "auth"
        return None

    def is_trusted(self, session: Session) -> bool:
        return self.why_trusted(session) is not None


# --- RCPT ---------------------------------------------------------------------------

@implementer(IRecipientPolicy)
class RecipientPolicy:
    """Relay control and recipient validation for RCPT TO.

    @param directory: an L{mailguard.interfaces.IUserDirectory}.
    @param trust: an L{ITrustPolicy}.
    @param gateway: for gateway mode, an object with ``handles(domain) ->
        bool`` and ``check(mailbox) -> Deferred[RecipientVerdict]`` (the
        back-end's answer); recipients in a domain it handles are decided by
        it, after the hidden-destination and address-literal checks.
    """

    def __init__(self, directory, trust, *, gateway=None):
        self.directory = directory
        self.trust = trust
        self.gateway = gateway

    def check_recipient(self, session: Session, recipient: Mailbox) -> defer.Deferred:
        return defer.maybeDeferred(self._decide, session, recipient)

    def _decide(self, session: Session, mailbox: Mailbox):
        address = mailbox.address
        if mailbox.is_ip_literal:
            if hidden_destination(mailbox):
                return _refuse(replies.RELAY_DENIED, "hidden destination in the local part", address)
            if _unroutable_literal(mailbox):
                return _refuse(replies.RELAY_DENIED, "address literal of a non-routable address", address)
            if self.trust.is_trusted(session):
                return _relay(address, "trusted client relays to an address literal")
            return _refuse(replies.RELAY_DENIED, "address literal from an untrusted client", address)

        gateway = self.gateway is not None and bool(self.gateway.handles(mailbox.domain))
        local = not gateway and bool(self.directory.is_local_domain(mailbox.domain))

        if hidden_destination(mailbox):
            if gateway:
                return _refuse(replies.UNKNOWN_USER, "hidden destination in the local part (gateway domain)", address)
            if not local:
                return _refuse(replies.RELAY_DENIED, "hidden destination in the local part", address)
            account = _exact_account(self.directory.lookup(address), mailbox)
            if account is not None:
                return RecipientVerdict(
                    replies.RECIPIENT_OK, "exact local account (hidden-destination syntax, delivered locally only)",
                    mailboxes=(account,), address=account)
            return _refuse(replies.UNKNOWN_USER, "hidden destination in the local part", address)

        if gateway:
            return self.gateway.check(mailbox)

        if local:
            result = self.directory.lookup(address)
            status = _status(result)
            if status == "KNOWN":
                forwards = tuple(getattr(result, "forwards", ()) or ())
                if not result.mailboxes and not forwards:
                    return _refuse(replies.UNKNOWN_USER, "local address with no destination", address)
                return RecipientVerdict(
                    replies.RECIPIENT_OK, "local recipient",
                    mailboxes=tuple(result.mailboxes), address=result.address,
                    relay_to=forwards)
            if status == "UNKNOWN":
                return _refuse(replies.UNKNOWN_USER, "unknown user in a local domain", address)
            if status == "DISABLED":
                return _refuse(replies.DISABLED_USER, "disabled account", address)
            if status == "NOT_LOCAL":
                # Inconsistent directory: the domain is ours, the address is
                # not.  We are authoritative for the domain: never relay it.
                return _refuse(replies.UNKNOWN_USER, "directory: local domain, address not local", address)
            raise ValueError(f"directory lookup status {status!r}")

        if self.trust.is_trusted(session):
            return _relay(address, f"relay for a trusted client ({self._trust_reason(session)})")
        return _refuse(replies.RELAY_DENIED, "relay denied: domain not local, client not trusted", address)

    def _trust_reason(self, session: Session) -> str:
        why = getattr(self.trust, "why_trusted", None)
        return (why(session) if why else None) or "trusted"


def _refuse(reply: Reply, reason: str, address: str) -> RecipientVerdict:
    return RecipientVerdict(reply, reason, address=address)


def _relay(address: str, reason: str) -> RecipientVerdict:
    return RecipientVerdict(replies.RECIPIENT_OK, reason, relay=True, address=address)


# --- VRFY ---------------------------------------------------------------------------

@implementer(IVrfyPolicy)
class VrfyPolicy:
    """VRFY as Kerio answers it: only trusted clients learn anything.

    @param enabled: VRFYEnabled.
    @param directory: an L{mailguard.interfaces.IUserDirectory}.
    @param trust: an L{ITrustPolicy}.
    @param domains: the primary local domains, in configuration order, for
        resolving a bare ``user``.  When None, the directory's ``domains``
        (an iterable of names or of records with ``.name``, or a method
        returning one) is used if it has one.
    """

    def __init__(self, enabled: bool, directory, trust, *,
                 domains: Iterable[str] | None = None):
        self.enabled = bool(enabled)
        self.directory = directory
        self.trust = trust
        self._domains = None if domains is None else tuple(d.lower().rstrip(".") for d in domains)

    @property
    def domains(self) -> tuple[str, ...]:
        if self._domains is not None:
            return self._domains
        found = getattr(self.directory, "domains", ())
        if callable(found):
            found = found()
        return tuple(str(getattr(d, "name", d)).lower().rstrip(".") for d in found or ())

    def answer(self, session: Session, argument) -> defer.Deferred:
        return defer.maybeDeferred(self._answer, session, argument)

    def _answer(self, session: Session, argument) -> Reply:
        refused = vrfy_refusal(self.enabled, argument)
        if refused is not None:
            return refused.reply
        target = parse_vrfy_argument(argument)
        assert target is not None
        if not self.trust.is_trusted(session):
            return replies.VRFY_WITHHELD
        try:
            mailbox = parse_path(f"<{target}>", allow_null=False)
        except AddressError:  # no domain: a bare user
            return self._bare(target)
        assert mailbox is not None
        found = self._known(mailbox)
        return _vrfy_known(found) if found else replies.VRFY_UNKNOWN

    def _known(self, mailbox: Mailbox) -> str | None:
        """The canonical address when C{mailbox} is a known local account."""
        if mailbox.is_ip_literal or not self.directory.is_local_domain(mailbox.domain):
            return None
        result = self.directory.lookup(mailbox.address)
        if hidden_destination(mailbox):
            return _exact_account(result, mailbox)
        if _status(result) != "KNOWN":
            return None
        return result.address

    def _bare(self, local: str) -> Reply:
        found: dict[str, str] = {}
        for domain in self.domains:
            try:
                mailbox = parse_path(f"<{local}@{domain}>", allow_null=False)
            except AddressError:  # an unusable domain name, or too long
                continue
            assert mailbox is not None
            address = self._known(mailbox)
            if address:
                found.setdefault(address.lower(), address)
        if not found:
            return replies.VRFY_UNKNOWN
        if len(found) > 1:
            return replies.VRFY_AMBIGUOUS
        return _vrfy_known(next(iter(found.values())))


def _vrfy_known(address: str) -> Reply:
    return replies.VRFY_KNOWN.with_text(replies.VRFY_KNOWN.text.format(address=address))
