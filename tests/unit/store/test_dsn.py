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


# --- the report's fields ---------------------------------------------------------------------

@pytest.mark.parametrize("host, field", [
    ("relay.example.net", "dns; relay.example.net"),
    ("127.0.0.1", "dns; [127.0.0.1]"),  # an address is no domain name: the RFC 5321 literal
    ("[192.0.2.7]", "dns; [192.0.2.7]"),
    ("::1", "dns; [IPv6:::1]"),
    ("2001:DB8:0:0::1", "dns; [IPv6:2001:db8::1]"),
])
def test_remote_mta_names_a_host_or_an_address_literal(host, field):
    assert dsn.mta_name(host) == field


@pytest.mark.parametrize("message, rest", [
    (b"Return-Path: <a@b.test>\r\nReceived: x\r\n\r\nbody\r\n", b"Received: x\r\n\r\nbody\r\n"),
    (b"return-path:\r\n <a@b.test>\r\nSubject: s\r\n", b"Subject: s\r\n"),  # folded
    (b"Subject: s\r\nReturn-Path: <a@b.test>\r\n", b"Subject: s\r\nReturn-Path: <a@b.test>\r\n"),  # not ours
    (b"Return-Path: <a@b.test>", b""),
    (b"", b""),
])
def test_without_return_path(message, rest):
    assert dsn.without_return_path(message) == rest


def _report(remote: str, original: bytes, headers_only: bool = False) -> bytes:
    r = dsn.RecipientReport("x@remote.test", "failed", "5.1.1", diagnostic="smtp; 550 5.1.1 no",
                            remote_mta=remote, last_attempt=1_700_000_000.0)
    return dsn.build_report(hostname="mx.example.com", to="john@example.com", recipients=[r],
                            original=original, headers_only=headers_only, now=1_700_000_000.0,
                            message_id="n1@mx.example.com")


@pytest.mark.parametrize("headers_only", [False, True])
def test_returned_message_loses_our_return_path_only(headers_only):
    original = (b"Return-Path: <john@example.com>\r\nReceived: from c ([127.0.0.2])\r\n"
                b"\tby mx.example.com with ESMTP id 1; date\r\nSubject: hi\r\n\r\nbody\r\n")
    data = _report("127.0.0.1", original, headers_only)
    assert b"Return-Path" not in data
    assert b"Received: from c ([127.0.0.2])\r\n\tby mx.example.com" in data and b"Subject: hi" in data
    assert b"\r\nRemote-MTA: dns; [127.0.0.1]\r\n" in data
