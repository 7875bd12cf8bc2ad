"""The relay queue's fixtures (see L{tests.unit.store.world})."""

import pytest

from tests.unit.store.world import World


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    w.queue.startService()
    yield w
    w.queue.stopService()
