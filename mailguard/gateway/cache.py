"""The gateway's answer cache: definitive answers are remembered (positive
and negative TTLs), so a spam run against unknown addresses does not
become a run against the back-end; LRU-bounded, so it cannot grow without
limit.  Times come from an injected clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["TtlCache"]


class TtlCache:
    """A bounded map with an expiry time per entry, least recently used
    evicted first.  Times come from C{clock.seconds()}."""

    def __init__(self, clock, size: int) -> None:
        self.clock = clock
        self.size = size
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: Any, ttl: float) -> None:
        if ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (self.clock.seconds() + ttl, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None
