"""Gateway fixtures: a clock, and the back-end (``mailguard.testing``'s
in-memory SMTP server) that knows john@ and jane@example.com."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mailguard.testing import FakeSMTPBackend


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def net():
    return FakeSMTPBackend({"john@example.com", "jane@example.com"})

