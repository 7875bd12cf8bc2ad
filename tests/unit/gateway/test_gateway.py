"""Gateway mode (mailguard.gateway.gateway): the verdicts, the cache in use,
in-flight sharing, the service, RecipientPolicy's gateway hook and VRFY on
the gateway -- on a task.Clock and the in-memory back-end of
``mailguard.testing``.  The end-to-end tests with real twistd processes
are ``tests/e2e/test_gateway.py``.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer

from mailguard import replies
from mailguard.gateway.gateway import Gateway
from mailguard.policy.decide import RecipientPolicy, RecipientVerdict, Session
from mailguard.policy.gatewayvrfy import GatewayVrfyPolicy, gateway_vrfy
from mailguard.replies import BACKEND_NO_ANSWER
from mailguard.testing import FakeUserDirectory, result_of
from tests.unit.gateway.helpers import check, make_gateway, mbox


def test_backend_no_answer_reply_codes_agree():
    assert (BACKEND_NO_ANSWER.code, BACKEND_NO_ANSWER.status) == (450, "4.4.1")
    assert (replies.RECIPIENT_TRY_LATER.code, replies.RECIPIENT_TRY_LATER.status) == (450, "4.4.3")


# --- the gateway ---------------------------------------------------------------------


def test_gateway_handles_its_domains_only(net, clock):
    gateway = make_gateway(net, clock)
    assert gateway.handles("example.com") and gateway.handles("EXAMPLE.NET.")
    assert not gateway.handles("other.test")
    assert not gateway.handles("sub.example.com")


def test_gateway_verdicts(net, clock):
    gateway = make_gateway(net, clock)
    known = check(gateway, net, "John@example.com")
    assert isinstance(known, RecipientVerdict)
    assert known.reply == replies.RECIPIENT_OK
    assert (known.relay, known.relay_to, known.mailboxes) == (True, ("John@example.com",), ())
    assert known.address == "John@example.com"
    unknown = check(gateway, net, "nobody@example.com")
    assert unknown.reply == replies.UNKNOWN_USER and not unknown.relay
    net.overrides["VRFY"] = lambda arg: b"451 4.3.0 local error\r\n"
    later = check(gateway, net, "fresh@example.com")
    assert later.reply == replies.RECIPIENT_TRY_LATER
    assert (later.reply.code, later.reply.status) == (450, "4.4.3")


def test_gateway_unreachable_backend_is_450_441(net, clock):
    net.up = False
    gateway = make_gateway(net, clock)
    verdict = check(gateway, net, "john@example.com")
    assert verdict.reply == BACKEND_NO_ANSWER
    assert not verdict.accepted and not verdict.relay
    assert "refused" in verdict.reason
    assert gateway.errors == 1  # mailguard_gateway_backend_errors_total


def test_gateway_caches_positive_and_negative_answers(net, clock):
    gateway = make_gateway(net, clock, positive_ttl=100, negative_ttl=10)
    check(gateway, net, "john@example.com")
    check(gateway, net, "nobody@example.com")
    assert len(net.verbs("VRFY")) == 2
    for _ in range(3):
        assert check(gateway, net, "john@example.com").accepted
        assert not check(gateway, net, "nobody@example.com").accepted
    assert len(net.verbs("VRFY")) == 2
    assert (gateway.hits, gateway.misses) == (6, 2)
    assert "cached" in check(gateway, net, "john@example.com").reason
    # The negative answer expires first: the back-end is asked again.
    clock.advance(10)
    net.users.add("nobody@example.com")
    assert check(gateway, net, "nobody@example.com").accepted
    assert check(gateway, net, "john@example.com").accepted
    assert len(net.verbs("VRFY")) == 3
    clock.advance(90)
    check(gateway, net, "john@example.com")
    assert len(net.verbs("VRFY")) == 4


def test_gateway_cache_hit_works_with_the_backend_down(net, clock):
    gateway = make_gateway(net, clock)
    check(gateway, net, "john@example.com")
    check(gateway, net, "nobody@example.com")
    net.up = False
    net.drop_all()
    assert check(gateway, net, "john@example.com").reply == replies.RECIPIENT_OK
    assert check(gateway, net, "nobody@example.com").reply == replies.UNKNOWN_USER
    assert check(gateway, net, "jane@example.com").reply == BACKEND_NO_ANSWER


def test_gateway_never_caches_temporary_failures(net, clock):
    gateway = make_gateway(net, clock)
    net.overrides["VRFY"] = lambda arg: b"451 4.3.0 local error\r\n"
    assert check(gateway, net, "john@example.com").reply == replies.RECIPIENT_TRY_LATER
    del net.overrides["VRFY"]
    assert check(gateway, net, "john@example.com").accepted
    net.up = False
    net.drop_all()
    assert check(gateway, net, "jane@example.com").reply == BACKEND_NO_ANSWER
    net.up = True
    clock.advance(5)
    assert check(gateway, net, "jane@example.com").accepted
    assert len(gateway.cache) == 2


def test_gateway_cache_is_bounded(net, clock):
    gateway = make_gateway(net, clock, cache_size=3)
    for i in range(10):
        check(gateway, net, f"u{i}@example.com")
    assert len(gateway.cache) == 3


def test_gateway_cache_can_be_off(net, clock):
    gateway = make_gateway(net, clock, cache_size=0)
    check(gateway, net, "john@example.com")
    check(gateway, net, "john@example.com")
    assert len(net.verbs("VRFY")) == 2


def test_gateway_concurrent_lookups_share_one_query(net, clock):
    gateway = make_gateway(net, clock)
    ds = [gateway.check(mbox("john@example.com")) for _ in range(5)]
    other = gateway.check(mbox("jane@example.com"))
    net.flush()
    verdicts = [result_of(d) for d in ds]
    assert all(v.accepted for v in verdicts)
    assert result_of(other).accepted
    assert net.verbs("VRFY").count("VRFY john@example.com") == 1
    assert gateway.shared == 4


def test_gateway_concurrent_lookups_share_a_failure_too(net, clock):
    net.hang = True
    gateway = make_gateway(net, clock, timeout=5.0)
    ds = [gateway.check(mbox("john@example.com")) for _ in range(3)]
    clock.advance(5)
    assert [result_of(d).reply for d in ds] == [BACKEND_NO_ANSWER] * 3
    assert net.attempts == 1
    assert gateway.errors == 1  # one lookup, shared


def test_gateway_check_never_fails(clock):
    class BrokenPool:
        def lookup(self, address):
            return defer.fail(RuntimeError("bug"))

    gateway = Gateway(["example.com"], BrokenPool(), clock)
    verdict = result_of(gateway.check(mbox("john@example.com")))
    assert verdict.reply == BACKEND_NO_ANSWER


def test_gateway_service_stop_closes_the_pool(net, clock):
    gateway = make_gateway(net, clock)
    gateway.startService()
    check(gateway, net, "john@example.com")
    d = gateway.stopService()
    net.flush()
    result_of(d)
    assert net.commands[-1] == "QUIT"
    assert not net.servers


# --- in RecipientPolicy --------------------------------------------------------------


class _Trust:
    def __init__(self, trusted=False):
        self.trusted = trusted

    def is_trusted(self, session):
        return self.trusted

    def why_trusted(self, session):
        return "test" if self.trusted else None


SESSION = Session(client_ip="192.0.2.9", client_port=4321, listener="smtp")


def policy_check(policy, net, address):
    d = policy.check_recipient(SESSION, mbox(address))
    net.flush()
    return result_of(d)


def test_policy_asks_the_gateway_and_bypasses_the_directory(net, clock):
    directory = FakeUserDirectory({"local@example.org": "known"}, domains=["example.com", "example.org"])
    gateway = make_gateway(net, clock)
    policy = RecipientPolicy(directory, _Trust(False), gateway=gateway)
    # The directory has no john@example.com: the back-end decides.
    assert policy_check(policy, net, "john@example.com").accepted
    assert policy_check(policy, net, "nobody@example.com").reply == replies.UNKNOWN_USER
    # A domain the gateway does not handle stays local.
    local = policy_check(policy, net, "local@example.org")
    assert local.accepted and local.mailboxes == ("local@example.org",) and not local.relay
    # Relay control is unchanged.
    assert policy_check(policy, net, "someone@other.test").reply == replies.RELAY_DENIED
    assert len(net.verbs("VRFY")) == 2


@pytest.mark.parametrize("address", ['"john@other.test"@example.com', "john%other.test@example.com",
                                     "other.test!john@example.com"])
def test_policy_hidden_destinations_never_reach_the_backend(net, clock, address):
    policy = RecipientPolicy(FakeUserDirectory({}, domains=["example.com"]), _Trust(True),
                             gateway=make_gateway(net, clock))
    assert policy_check(policy, net, address).reply == replies.UNKNOWN_USER
    assert net.attempts == 0


def test_policy_backend_down_is_try_later_not_accept(net, clock):
    net.up = False
    policy = RecipientPolicy(FakeUserDirectory({}, domains=["example.com"]), _Trust(False),
                             gateway=make_gateway(net, clock))
    verdict = policy_check(policy, net, "john@example.com")
    assert (verdict.reply.code, verdict.accepted) == (450, False)


# --- VRFY on the gateway -------------------------------------------------------------


def vrfy_policy(net, clock, *, trusted=True, enabled=True):
    from mailguard.policy.decide import VrfyPolicy

    directory = FakeUserDirectory({"local@example.org": "known"}, domains=["example.com", "example.org"])
    inner = VrfyPolicy(enabled, directory, _Trust(trusted))
    return gateway_vrfy(inner, make_gateway(net, clock))


def vrfy(policy, net, argument):
    d = policy.answer(SESSION, argument)
    net.flush()
    return result_of(d)


def test_gateway_vrfy_policy_provides_the_interface(net, clock):
    from zope.interface.verify import verifyObject

    from mailguard.interfaces import IVrfyPolicy

    policy = vrfy_policy(net, clock)
    assert isinstance(policy, GatewayVrfyPolicy)
    assert verifyObject(IVrfyPolicy, policy)
    assert gateway_vrfy("inner", None) == "inner"


def test_gateway_vrfy_asks_the_backend_for_trusted_clients(net, clock):
    policy = vrfy_policy(net, clock)
    assert vrfy(policy, net, "john@example.com") == replies.VRFY_KNOWN.with_text("<john@example.com>")
    assert vrfy(policy, net, "<nobody@example.com>") == replies.VRFY_UNKNOWN
    # Other domains: the directory, as always.
    assert vrfy(policy, net, "local@example.org").code == 250
    assert vrfy(policy, net, "other@example.org") == replies.VRFY_UNKNOWN
    assert len(net.verbs("VRFY")) == 2
    # Through the same cache as RCPT.
    assert vrfy(policy, net, "john@example.com").code == 250
    assert len(net.verbs("VRFY")) == 2


def test_gateway_vrfy_backend_down_is_try_later(net, clock):
    net.up = False
    policy = vrfy_policy(net, clock)
    assert vrfy(policy, net, "john@example.com") == BACKEND_NO_ANSWER


def test_gateway_vrfy_untrusted_disabled_malformed_bare_hidden(net, clock):
    assert vrfy(vrfy_policy(net, clock, trusted=False), net, "john@example.com") == replies.VRFY_WITHHELD
    assert vrfy(vrfy_policy(net, clock, enabled=False), net, "john@example.com") == replies.VRFY_DISABLED
    policy = vrfy_policy(net, clock)
    assert vrfy(policy, net, "") == replies.SYNTAX_ERROR
    assert vrfy(policy, net, "john") == replies.VRFY_WITHHELD  # cannot tell for a bare user
    assert vrfy(policy, net, '"john@other.test"@example.com') == replies.VRFY_UNKNOWN
    assert vrfy(policy, net, "john@[192.0.2.1]") == replies.VRFY_UNKNOWN
    assert net.attempts == 0
