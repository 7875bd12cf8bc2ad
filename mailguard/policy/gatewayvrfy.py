"""VRFY on a gateway: a policy over an L{IRecipientGateway}.

The gateway knows no users of its gateway domains, so a trusted client
asking about one gets the back-end's answer (through the gateway's cache).
Sans-IO like the rest of ``mailguard.policy``: the gateway is an interface
whose C{check} returns a Deferred; nothing here touches the network.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from mailguard import replies
from mailguard.interfaces import IRecipientGateway, IVrfyPolicy
from mailguard.policy.addresses import AddressError, hidden_destination, parse_path, parse_vrfy_argument
from mailguard.policy.decide import RecipientVerdict, VrfyPolicy
from mailguard.replies import Reply


@implementer(IVrfyPolicy)
class GatewayVrfyPolicy:
    """VRFY on a gateway: the gateway knows no users of its gateway
    domains, so a trusted client asking about one gets the back-end's
    answer (through the same cache); everything else is C{inner}'s.

    Trusted, address in a gateway domain: ``250 2.1.5 <address>`` /
    ``550 5.1.1``, or ``450 4.4.x`` when the back-end cannot say now.  A
    bare user, when a primary domain is a gateway domain:
    ``252 2.1.5`` (the gateway cannot tell).  Disabled, untrusted,
    malformed, hidden destinations, other domains: as C{inner} answers.

    @param inner: the L{mailguard.policy.decide.VrfyPolicy} (its C{enabled},
        C{trust} and C{domains} are read).
    @param gateway: an L{IRecipientGateway} (L{mailguard.gateway.gateway.Gateway}).
    """

    def __init__(self, inner: VrfyPolicy, gateway: IRecipientGateway) -> None:
        self.inner = inner
        self.gateway = gateway

    def answer(self, session, argument) -> defer.Deferred:
        inner = self.inner
        if not inner.enabled or not inner.trust.is_trusted(session):
            return inner.answer(session, argument)
        target = parse_vrfy_argument(argument)
        if target is None:
            return inner.answer(session, argument)
        try:
            mailbox = parse_path(f"<{target}>", allow_null=False)
        except AddressError:  # a bare user
            if any(self.gateway.handles(d) for d in inner.domains):
                return defer.succeed(replies.VRFY_WITHHELD)
            return inner.answer(session, argument)
        assert mailbox is not None
        if mailbox.is_ip_literal or hidden_destination(mailbox) or not self.gateway.handles(mailbox.domain):
            return inner.answer(session, argument)
        return self.gateway.check(mailbox).addCallback(_vrfy_reply)


def _vrfy_reply(verdict: RecipientVerdict) -> Reply:
    if verdict.accepted:
        return replies.VRFY_KNOWN.with_text(replies.VRFY_KNOWN.text.format(address=verdict.address))
    if verdict.reply == replies.UNKNOWN_USER:
        return replies.VRFY_UNKNOWN
    return verdict.reply


def gateway_vrfy(inner, gateway):
    """C{inner} itself without a gateway, else a L{GatewayVrfyPolicy}."""
    return inner if gateway is None else GatewayVrfyPolicy(inner, gateway)
