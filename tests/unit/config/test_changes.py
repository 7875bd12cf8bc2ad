"""What a reload changes, on values: two configurations in, one line out."""

from __future__ import annotations

import pytest

from mailguard.config.changes import GATEWAY_DOMAINS, RESTART_ONLY, Changes, Counts, diff, pinned
from mailguard.config.settings import SCALARS, load
from tests.conftest import DEFAULT_VARIABLES, GROUPS, USERS, write_config


@pytest.fixture
def cfg(tmp_path):
    n = iter(range(1000))

    def make(variables=None, **kw):
        return load(str(write_config(tmp_path / f"m{next(n)}.cfg", variables, **kw)))

    return make


def test_the_same_files_change_nothing(cfg):
    changes = diff(cfg(), cfg())
    assert changes == Changes() and not changes
    assert changes.describe() == "no change"


def test_moving_a_line_is_no_change(cfg):
    # the same records, read from other lines (a comment added at the top)
    assert not diff(cfg(), cfg(body="<!-- a comment -->"))
    assert not diff(cfg(users=USERS), cfg(users=tuple(reversed(USERS))))


def test_users_added_removed_and_changed_are_counted_never_shown(cfg):
    old = cfg()
    users = [u for u in USERS if u[0] != "jane"]  # jane removed
    users[0] = ("john", "example.com", "a-new-secret", True)  # john's password changed
    users += [("newbie", "example.com", "newbie-secret", True), ("other", "example.com", "x", False)]
    changes = diff(old, cfg(users=tuple(users)))
    assert changes.users == Counts(added=2, removed=1, changed=1)
    line = changes.describe()
    assert line == "users 2 added, 1 removed, 1 changed"
    for secret in ("a-new-secret", "newbie", "john", "jane"):
        assert secret not in line


def test_a_user_disabled_is_a_change(cfg):
    users = tuple((n, d, p, False if n == "john" else e) for n, d, p, e in USERS)
    assert diff(cfg(), cfg(users=users)).users == Counts(changed=1)


def test_groups_aliases_domains(cfg):
    old = cfg()
    new = cfg(groups=GROUPS[:1] + (("Trusted", "127.0.0.9"), ("Fresh", "10.0.0.0/8")),
              aliases=(("sales", "example.com", "john@example.com"),))
    changes = diff(old, new)
    assert changes.groups == Counts(added=1, removed=1, changed=1)  # Fresh; NoDelay; Trusted
    assert changes.aliases == Counts(changed=1)
    assert changes.domains == Counts()
    assert changes.describe() == "aliases 1 changed; IP groups 1 added, 1 removed, 1 changed"


def test_settings_are_named(cfg):
    changes = diff(cfg(), cfg({"SmtpGreetingDelay": "30", "VRFYEnabled": "0", "SmtpMaxErrors": "5"}))
    assert changes.settings == ("VRFYEnabled", "SmtpGreetingDelay", "SmtpMaxErrors")  # in SCALARS order
    assert changes.restart == ()
    assert changes.describe() == "settings changed: VRFYEnabled, SmtpGreetingDelay, SmtpMaxErrors"


def test_a_setting_back_to_its_default_is_a_change(cfg):
    # VRFYEnabled=1 in the test files; without the line it is the default, 0
    without = {k: v for k, v in DEFAULT_VARIABLES.items() if k != "VRFYEnabled"}
    assert diff(cfg(), cfg(defaults=without)).settings == ("VRFYEnabled",)


def test_restart_only_settings_are_named_apart_and_pinned(cfg):
    old = cfg({"GatewayTimeout": "10", "QueueLifetime": "3600"})
    new = cfg({"GatewayTimeout": "20", "QueueLifetime": "7200", "RelayHostTlsVerify": "1"})
    changes = diff(old, new)
    assert changes.settings == ("QueueLifetime",)
    assert changes.restart == ("GatewayTimeout", "RelayHostTlsVerify")
    assert changes.describe() == ("settings changed: QueueLifetime; changed but applied only at the "
                                  "next restart: GatewayTimeout, RelayHostTlsVerify")
    running = pinned(new, old)
    assert running.gateway_timeout == 10.0 and running.relay_tls_verify is False
    assert running.queue_lifetime == 7200.0  # the rest is the new file's
    assert running.users == new.users
    assert not diff(old, running).restart


def test_in_gateway_mode_a_new_domain_waits_for_a_restart(cfg):
    domain2 = ('<list name="Domain"><listitem><variable name="Domain">example.org</variable>'
               '</listitem></list>')
    old = cfg({"GatewayEnabled": "1"})
    changes = diff(old, cfg({"GatewayEnabled": "1"}, body=domain2))
    assert changes.domains == Counts(added=1)
    assert changes.restart == (GATEWAY_DOMAINS,)
    # not in gateway mode, a domain is just a domain
    assert diff(cfg(), cfg(body=domain2)).restart == ()


def test_the_relay_source_address_waits_for_a_restart(cfg):
    """The relay queue's connector is built once: RelayHostBindAddress
    (like GatewayBindAddress, which the queue also uses) is pinned."""
    old, new = cfg(), cfg({"RelayHostBindAddress": "127.0.0.5"})
    assert diff(old, new).restart == ("RelayHostBindAddress",)
    assert pinned(new, old).relay_source_address == ""


def test_restart_only_names_are_settings():
    assert RESTART_ONLY <= {s.name for s in SCALARS}
