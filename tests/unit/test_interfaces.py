"""Every implementer provides its interface fully (verifyObject), fakes
included."""

from __future__ import annotations

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailguard.config import settings as config_mod
from mailguard import interfaces as I
from mailguard.store.maildir import Envelope, MaildirStore
from mailguard.policy import build
from mailguard.policy.passwords import PasswordChecker
from mailguard.policy.decide import RecipientPolicy, TrustPolicy, VrfyPolicy
from mailguard.smtpd.seclog import SecurityLog
from mailguard.testing import FakeUserDirectory


def _implementers(tmp_path):
    config, tables = build.load(None)
    clock = Clock()
    policies = build.build_policies(config, clock, tables=tables)
    trust = TrustPolicy(tables.ip_groups, True, "Trusted relays", True)
    store = MaildirStore(str(tmp_path))
    store.open()
    return [
        (I.IIPGroups, tables.ip_groups),
        (I.IUserDirectory, tables.directory),
        (I.IUserDirectory, FakeUserDirectory({"a@b.test": "known"})),
        (I.IPasswordChecker, PasswordChecker(config.users, tables.directory)),
        (I.ITrustPolicy, trust),
        (I.IRecipientPolicy, RecipientPolicy(tables.directory, trust)),
        (I.IVrfyPolicy, VrfyPolicy(True, tables.directory, trust)),
        (I.IGreetingPolicy, policies.greeting),
        (I.ISecurityLog, SecurityLog(str(tmp_path / "s.log"), clock, threaded=False)),
        (I.IMessageStore, store),
        (I.IIncomingMessage, store.begin(Envelope("a@b.test", ("john@example.com",)))),
    ] + [(iface, obj) for iface, obj in _context_extras(tmp_path)]


def _context_extras(tmp_path):
    """The queue and the gateway, as build_context wires them."""
    import dataclasses

    from twisted.internet import reactor  # built, never run: nothing connects

    from mailguard.service import build_context

    config = dataclasses.replace(config_mod.load(None), gateway_enabled=True)
    ctx = build_context(config, {"spool": str(tmp_path / "ctx"), "relay-host": "127.0.0.1:1"}, reactor)
    return [(I.IRelayQueue, ctx.queue), (I.IRelayIntake, ctx.store.relay),
            (I.IRecipientGateway, ctx.recipients.gateway), (I.IVrfyPolicy, ctx.vrfy)]


def test_every_implementer_verifies(tmp_path):
    for iface, obj in _implementers(tmp_path):
        assert verifyObject(iface, obj), (iface, obj)


def test_every_interface_has_an_implementer(tmp_path):
    covered = {iface for iface, _ in _implementers(tmp_path)}
    declared = {v for v in vars(I).values()
                if isinstance(v, type(I.IIPGroups)) and v.__module__ == I.__name__}
    missing = declared - covered
    assert not missing, sorted(m.__name__ for m in missing)
