"""Gateway mode: decide ``RCPT TO`` for a back-end's domains by asking it.

This is the anti-spam gateway of the seed document: mailguard stands in
front of a back-end mail server (Kerio Connect, or another mailguard) and
must not accept mail that the back-end would refuse, or it would have to
bounce it later (backscatter).  For each recipient in a gateway domain it
asks the back-end (L{mailguard.gateway.client}: VRFY, or a MAIL/RCPT
probe) over a pooled, persistent connection (L{mailguard.gateway.pool}),
and answers the client from that (L{Gateway.check}):

    known                        250 2.1.5, relayed to the back-end
    unknown                      550 5.1.1 (cached)
    back-end 4xx, other answers  450 4.4.3 (never cached)
    back-end unreachable, slow   450 4.4.1 (never cached)

Never accept-then-bounce: when the back-end cannot say, the client is told
to try later.  Definitive answers are cached (L{mailguard.gateway.cache});
concurrent lookups of one address share one query.

L{Gateway} holds the cache, the in-flight sharing and the verdicts; it is
what L{mailguard.policy.decide.RecipientPolicy} calls.  It is a Twisted
service, so stopping mailguard says QUIT on every pooled connection.  (VRFY about a gateway domain is answered through the same L{Gateway} by
L{mailguard.policy.gatewayvrfy.GatewayVrfyPolicy}.)

L{mailguard.gateway.build} builds the real thing from the configuration
(see ``docs/gateway.md`` for the settings); nothing here imports the
global reactor.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailguard import replies
from mailguard.gateway.cache import TtlCache
from mailguard.gateway.client import BackendAnswer, BackendUnavailable, Outcome
from mailguard.interfaces import IRecipientGateway
from mailguard.policy.decide import RecipientVerdict
from mailguard.replies import BACKEND_NO_ANSWER

__all__ = ["Gateway"]

log = Logger()


@implementer(IRecipientGateway)
class Gateway(service.Service):
    """The back-end's verdict on recipients of its domains, for
    L{mailguard.policy.decide.RecipientPolicy} (its C{gateway} hook).

    @param domains: the domains the back-end holds (any case).
    @param pool: a L{BackendPool} (or anything with C{lookup(address)} and
        C{close()}).
    @param clock: an C{IReactorTime}, for the cache.
    @param positive_ttl: seconds a "known" answer is remembered; 0: never.
    @param negative_ttl: seconds an "unknown" answer is remembered; 0: never.
    @param cache_size: most addresses remembered; 0: no cache.
    """

    name = "gateway"

    def __init__(self, domains: Iterable[str], pool, clock, *, positive_ttl: float = 3600.0,
                 negative_ttl: float = 300.0, cache_size: int = 100000) -> None:
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self.pool = pool
        self.clock = clock
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.cache = TtlCache(clock, cache_size)
        self._inflight: dict[str, list[tuple[Any, defer.Deferred]]] = {}
        self.hits = 0
        self.misses = 0
        self.shared = 0  # lookups that joined one already in flight
        self.errors = 0  # lookups the back-end did not answer (the metrics read these counts)

    def handles(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains

    def check(self, mailbox) -> defer.Deferred:
        """The verdict on C{mailbox} (a L{mailguard.policy.addresses.Mailbox} in a
        gateway domain): a Deferred that always fires with a
        L{RecipientVerdict}, never fails."""
        key = mailbox.address
        cached = self.cache.get(key)
        if cached is not None:
            self.hits += 1
            outcome, code, via = cached
            return defer.succeed(_verdict(mailbox, outcome, f"back-end {via} {code} (cached)"))
        self.misses += 1
        d = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            self.shared += 1
            waiters.append((mailbox, d))
            return d
        self._inflight[key] = [(mailbox, d)]
        self.pool.lookup(key).addBoth(self._answered, key)
        return d

    def _answered(self, result, key: str) -> None:
        waiters = self._inflight.pop(key, [])
        if isinstance(result, Failure):
            self.errors += 1
            if not result.check(BackendUnavailable):
                log.failure("gateway lookup of {address} failed", result, address=key)
            reason = f"back-end not answering: {result.getErrorMessage()}"
            for mailbox, d in waiters:
                d.callback(RecipientVerdict(BACKEND_NO_ANSWER, reason, address=mailbox.address))
            return
        answer: BackendAnswer = result
        outcome, code, via = answer.outcome, answer.reply.code, answer.via
        if outcome is Outcome.KNOWN:
            self.cache.put(key, (outcome, code, via), self.positive_ttl)
        elif outcome is Outcome.UNKNOWN:
            self.cache.put(key, (outcome, code, via), self.negative_ttl)
        else:
            log.warn("back-end cannot verify {address} now: {via} {reply}",
                     address=key, via=via, reply=str(answer.reply))
        reason = f"back-end {via} {code}"
        for mailbox, d in waiters:
            d.callback(_verdict(mailbox, outcome, reason))

    def stopService(self):
        super().stopService()
        return self.pool.close()


def _verdict(mailbox, outcome: Outcome, reason: str) -> RecipientVerdict:
    if outcome is Outcome.KNOWN:
        return RecipientVerdict(replies.RECIPIENT_OK, f"gateway: known ({reason})",
                                relay=True, address=mailbox.address)
    if outcome is Outcome.UNKNOWN:
        return RecipientVerdict(replies.UNKNOWN_USER, f"gateway: unknown ({reason})",
                                address=mailbox.address)
    return RecipientVerdict(replies.RECIPIENT_TRY_LATER, f"gateway: cannot verify now ({reason})",
                            address=mailbox.address)
