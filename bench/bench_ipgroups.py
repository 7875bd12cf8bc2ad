"""Benchmark: IP group build time and lookup rate, against a linear scan.

Run: .venv/bin/python bench/bench_ipgroups.py [--quick]

Not part of the test suite.  It shows that membership is logarithmic (the
lookup rate barely moves from 100 to 100,000 rows) and what the flattening
buys over the obvious implementation -- a list of ``ipaddress.ip_network``
objects scanned with ``in`` -- measured in the same run on the same rows.
"""

from __future__ import annotations

import ipaddress
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mailguard.policy.ipgroups import build  # noqa: E402
from mailguard.config.records import IpGroupRow  # noqa: E402

GROUP = "Big"
V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))


def make_rows(n: int, rnd: random.Random) -> list[IpGroupRow]:
    """A realistic mix: 60% single IPv4, 20% IPv4 prefixes (/20-/30),
    10% IPv4 ranges, 10% IPv6 (addresses and /48-/64 prefixes), spread over
    10.0.0.0/8 and 2001:db8::/32 so hits and misses interleave."""
    rows = []
    for _ in range(n):
        kind = rnd.random()
        if kind < 0.6:
            addr = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        elif kind < 0.8:
            plen = rnd.randint(20, 30)
            net = ipaddress.IPv4Network((rnd.getrandbits(32), plen), strict=False)
            addr = str(net)
        elif kind < 0.9:
            lo = rnd.getrandbits(32)
            hi = min(lo + rnd.randint(1, 4000), (1 << 32) - 1)
            addr = f"{ipaddress.IPv4Address(lo)} - {ipaddress.IPv4Address(hi)}"
        elif kind < 0.95:
            addr = str(ipaddress.IPv6Address(V6_BASE + (rnd.getrandbits(32) << 64) + rnd.getrandbits(16)))
        else:
            plen = rnd.randint(48, 64)
            net = ipaddress.IPv6Network((V6_BASE + (rnd.getrandbits(32) << 64), plen), strict=False)
            addr = str(net)
        rows.append(IpGroupRow(GROUP, addr))
    return rows


def probes(groups, rows, rnd: random.Random, count: int) -> tuple[list[str], list[str]]:
    """Addresses that are in the group (taken from its rows) and addresses in
    the same space that are not (so misses bisect into the middle too)."""
    hits, misses = [], []
    while len(hits) < count:
        value = rnd.choice(rows).address
        first = value.split("-")[0].split("/")[0].strip()
        if groups.contains(GROUP, first):
            hits.append(first)
    while len(misses) < count:
        if rnd.random() < 0.9:
            a = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        else:
            a = str(ipaddress.IPv6Address(V6_BASE + (rnd.getrandbits(32) << 64) + rnd.getrandbits(16)))
        if not groups.contains(GROUP, a):
            misses.append(a)
    return hits, misses


def rate(fn, items, min_seconds: float = 0.3) -> float:
    """Calls per second of fn over items, repeated for at least min_seconds."""
    done = 0
    start = time.perf_counter()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def naive(rows):
    """The peer: every row as ipaddress networks, scanned linearly."""
    nets = []
    for row in rows:
        value = row.address
        if "-" in value:
            a, b = (ipaddress.ip_address(x.strip()) for x in value.split("-"))
            nets.extend(ipaddress.summarize_address_range(a, b))
        else:
            nets.append(ipaddress.ip_network(value, strict=False))
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]

    def contains(address: str) -> bool:
        a = ipaddress.ip_address(address)
        return any(a in n for n in (v4 if a.version == 4 else v6))

    return contains, len(nets)


def main() -> None:
    quick = "--quick" in sys.argv
    rnd = random.Random(20240611)
    sizes = [100, 10_000] if quick else [100, 10_000, 100_000]
    nprobe = 2000
    print(f"Python {sys.version.split()[0]}; lookups take str addresses "
          f"(as Twisted reports them) unless noted; {nprobe} distinct probes each")
    print()
    header = (f"{'rows':>8} {'intervals':>9} {'build s':>8} {'hits/s':>10} "
              f"{'misses/s':>10} {'hits/s (obj)':>12}")
    print(header)
    print("-" * len(header))
    results = {}
    for n in sizes:
        rows = make_rows(n, rnd)
        t0 = time.perf_counter()
        groups, problems = build(rows)
        build_s = time.perf_counter() - t0
        assert not [p for p in problems if p.is_error], problems[:3]
        hits, misses = probes(groups, rows, rnd, nprobe)
        hit_objs = [ipaddress.ip_address(h) for h in hits]
        contains = groups.contains
        hit_rate = rate(lambda a: contains(GROUP, a), hits)
        miss_rate = rate(lambda a: contains(GROUP, a), misses)
        obj_rate = rate(lambda a: contains(GROUP, a), hit_objs)
        results[n] = (rows, hits, misses, hit_rate, miss_rate)
        print(f"{n:>8,} {groups.interval_count(GROUP):>9,} {build_s:>8.3f} {hit_rate:>10,.0f} "
              f"{miss_rate:>10,.0f} {obj_rate:>12,.0f}")

    print()
    rows, hits, misses, hit_rate, miss_rate = results[10_000]
    t0 = time.perf_counter()
    scan, nnets = naive(rows)
    naive_build = time.perf_counter() - t0
    few_hits, few_misses = hits[:100], misses[:100]
    for a in few_hits:
        assert scan(a), a
    for a in few_misses:
        assert not scan(a), a
    naive_hit = rate(scan, few_hits, 1.0)
    naive_miss = rate(scan, few_misses, 1.0)
    print(f"peer at 10,000 rows: linear scan over {nnets:,} ipaddress networks "
          f"(built in {naive_build:.3f} s), same probes")
    print(f"{'':>8} {'mailguard/s':>12} {'linear/s':>10} {'ratio':>8}")
    print(f"{'hits':>8} {hit_rate:>12,.0f} {naive_hit:>10,.0f} {hit_rate / naive_hit:>7,.0f}x")
    print(f"{'misses':>8} {miss_rate:>12,.0f} {naive_miss:>10,.0f} {miss_rate / naive_miss:>7,.0f}x")


if __name__ == "__main__":
    main()
