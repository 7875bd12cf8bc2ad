"""Replies are named data, and their codes agree (RFC 3463)."""

from __future__ import annotations

import re

import pytest

from mailguard import replies as R

ALL = R.all_replies()


@pytest.mark.parametrize("name", sorted(ALL))
def test_basic_and_enhanced_code_agree(name):
    reply = ALL[name]
    assert 200 <= reply.code < 600
    if reply.status:
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.status), name
        assert reply.status[0] == str(reply.code)[0], name
    else:
        # Only the greeting, HELO/EHLO first line, 354 and AUTH challenges
        # carry no enhanced code (RFC 2034 section 3).
        assert reply.code in (220, 250, 354, 334), name


def test_wire_format_single_and_multiline():
    assert R.RELAY_DENIED.to_bytes() == b"554 5.7.1 Relay access denied\r\n"
    assert R.HELO_OK.with_text("mx").to_bytes(("SIZE 10", "HELP")) == b"250-mx\r\n250-SIZE 10\r\n250 HELP\r\n"


def test_spec_replies():
    assert (R.VRFY_WITHHELD.code, R.VRFY_WITHHELD.status, R.VRFY_WITHHELD.text) == \
        (252, "2.1.5", "Verification not supported")
    assert (R.VRFY_DISABLED.code, R.VRFY_DISABLED.status) == (502, "5.5.1")
    assert (R.UNKNOWN_USER.code, R.UNKNOWN_USER.status) == (550, "5.1.1")
    assert (R.RELAY_DENIED.code, R.RELAY_DENIED.status) == (554, "5.7.1")
    assert (R.MESSAGE_TOO_BIG.code, R.MESSAGE_TOO_BIG.status) == (552, "5.3.4")
    assert (R.EARLY_TALKER.code, R.EARLY_TALKER.status) == (554, "5.7.1")
