"""DSN parameters and xtext (mailguard.store.dsn): pure functions, tested as
tables.  The reports themselves are checked where they are written
(test_queue.py, test_notices.py)."""

from __future__ import annotations

import pytest

from mailguard.store import dsn


@pytest.mark.parametrize("key, value, ok", [
    ("RET", "FULL", True), ("RET", "hdrs", True), ("RET", "ALL", False), ("RET", None, False),
    ("ENVID", "abc+2B123", True), ("ENVID", "a" * 101, False), ("ENVID", "a=b", False), ("ENVID", "+zz", False),
])
def test_mail_parameters(key, value, ok):
    assert (dsn.check_mail_parameter(key, value) is None) == ok


@pytest.mark.parametrize("key, value, ok", [
    ("NOTIFY", "NEVER", True), ("NOTIFY", "SUCCESS,FAILURE", True), ("NOTIFY", "delay", True),
    ("NOTIFY", "NEVER,SUCCESS", False), ("NOTIFY", "SOMETIMES", False), ("NOTIFY", None, False),
    ("NOTIFY", "FAILURE,FAILURE", False),
    ("ORCPT", "rfc822;a@b.test", True), ("ORCPT", "rfc822;a+2Bb@c", True), ("ORCPT", "rfc822", False),
    ("ORCPT", ";a@b", False), ("ORCPT", "rfc822;", False),
])
def test_rcpt_parameters(key, value, ok):
    assert (dsn.check_rcpt_parameter(key, value) is None) == ok


def test_xtext_round_trip():
    assert dsn.xtext_decode(dsn.xtext_encode("a+b=c d")) == "a+b=c d"
    assert dsn.xtext_encode("a+b") == "a+2Bb"


def test_notify_default_is_failure_only():
    assert dsn.wants(None, "FAILURE") and not dsn.wants(None, "SUCCESS")
    assert not dsn.wants((), "FAILURE")
