"""The gateway's answer cache (mailguard.gateway.cache): TTLs on the clock,
LRU bound, and agreement with a model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mailguard.gateway.cache import TtlCache


def test_cache_expires_entries_on_the_clock(clock):
    cache = TtlCache(clock, 10)
    cache.put("a", 1, 5)
    cache.put("b", 2, 10)
    clock.advance(4.9)
    assert (cache.get("a"), cache.get("b")) == (1, 2)
    clock.advance(0.1)
    assert cache.get("a") is None
    assert "a" not in cache and "b" in cache
    clock.advance(5)
    assert cache.get("b") is None
    assert len(cache) == 0


def test_cache_is_bounded_lru(clock):
    cache = TtlCache(clock, 3)
    for k in "abc":
        cache.put(k, k, 100)
    assert cache.get("a") == "a"  # a is now the most recently used
    cache.put("d", "d", 100)
    assert len(cache) == 3
    assert cache.get("b") is None
    assert [cache.get(k) for k in "acd"] == ["a", "c", "d"]


def test_cache_zero_ttl_or_size_stores_nothing(clock):
    cache = TtlCache(clock, 3)
    cache.put("a", 1, 0)
    assert cache.get("a") is None
    none = TtlCache(clock, 0)
    none.put("a", 1, 100)
    assert len(none) == 0


_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from("abcdef"), st.integers(0, 20)),
    st.tuples(st.just("get"), st.sampled_from("abcdef"), st.just(0)),
    st.tuples(st.just("advance"), st.just(""), st.integers(0, 10)),
), max_size=60)


@given(ops=_OPS, size=st.integers(0, 4))
def test_cache_agrees_with_a_model(ops, size):
    """Against the obvious model: a list of (key, expiry) in recency order."""
    clock = Clock()
    cache = TtlCache(clock, size)
    model: list[tuple[str, float]] = []
    for op, key, n in ops:
        now = clock.seconds()
        if op == "advance":
            clock.advance(n)
            continue
        others = [(k, e) for k, e in model if k != key]
        entry = [(k, e) for k, e in model if k == key]
        if op == "put":
            cache.put(key, n, n)
            if n > 0 and size > 0:
                model = (others + [(key, now + n)])[-size:]
        else:
            got = cache.get(key)
            if entry and entry[0][1] > now:
                assert got is not None
                model = others + entry  # now the most recently used
            else:
                assert got is None
                model = others  # an expired entry is dropped when seen
        assert len(cache) == len(model)
        assert list(cache._entries) == [k for k, _ in model]
