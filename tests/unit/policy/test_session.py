"""The session facts: frozen, evolved with replace, the client address
normalised once when they are made."""

from __future__ import annotations

import dataclasses

import pytest

from mailguard.policy.session import Session, normalise_ip


def test_session_is_frozen_and_evolves_with_replace():
    s = Session("192.0.2.9", 25, "smtp")
    assert (s.tls, s.authenticated, s.helo, s.esmtp) == (False, None, None, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tls = True  # type: ignore[misc]
    t = dataclasses.replace(s, tls=True, helo="client.test")
    assert (t.tls, t.helo, s.tls) == (True, "client.test", False)


def test_session_has_no_instance_dict():
    """Slots: a connection held in the greeting delay keeps one."""
    assert not hasattr(Session("192.0.2.9", 25, "smtp"), "__dict__")


@pytest.mark.parametrize("given, expected", [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("::FFFF:10.0.0.1", "10.0.0.1"),
    ("::ffff:c000:0201", "192.0.2.1"),
    ("2001:DB8:0::25", "2001:db8::25"),
    ("2001:db8::25", "2001:db8::25"),
    ("::1", "::1"),
    ("", ""),
    ("not an ip", "not an ip"),
    ("fe80::1%eth0", "fe80::1%eth0"),
])
def test_client_ip_is_normalised_when_the_facts_are_made(given, expected):
    assert normalise_ip(given) == expected
    session = Session(given, 1, "smtp")
    assert session.client_ip == expected
    assert dataclasses.replace(session, helo="x").client_ip == expected
