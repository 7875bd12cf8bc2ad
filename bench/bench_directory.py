"""Benchmark: the user directory against a plain dict.

    python bench/bench_directory.py [N]        (default N = 1,000,000)

Builds a directory of N users over 100 domains (10 with a domain alias),
1% of them disabled, 5% with an extra name, plus N/1000 alias records (some
chained), and reports:

  - build time and RSS growth (VmRSS before/after, records already in
    memory, as the configuration loader holds them), bytes per user, and
    the directory's own size by sys.getsizeof;
  - lookups/s for hits and misses, mixed case and through domain aliases;
  - the same against the peer: a plain dict of lower-cased address -> True,
    queried with C{d.get(address.lower())}, built and measured in the same
    run.

Not part of the test suite.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mailguard.policy.directory import LookupStatus  # noqa: E402
from mailguard.policy.directorybuild import build  # noqa: E402
from mailguard.config.problems import Where  # noqa: E402
from mailguard.config.records import AliasRecord, DomainRecord, UserRecord  # noqa: E402

DOMAINS = 100
QUERIES = 200_000


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def records(n: int):
    domains = [
        DomainRecord(f"d{i:03d}.example", (f"d{i:03d}.example.net",) if i < 10 else (),
                     Where("mailserver.cfg", i + 1))
        for i in range(DOMAINS)
    ]
    users = [
        UserRecord(
            f"User{i:07d}",
            f"d{i % DOMAINS:03d}.example",
            None,
            i % 100 != 7,  # 1% disabled
            (f"alt{i:07d}",) if i % 20 == 3 else (),  # 5% with an extra name
            Where("users.cfg", i + 1),
        )
        for i in range(n)
    ]
    aliases = []
    for j in range(max(n // 1000, 1)):
        d = f"d{j % DOMAINS:03d}.example"
        # chains of four: each alias but every fourth points at the previous
        if j % 4:
            target = f"list{j - 1:05d}@d{(j - 1) % DOMAINS:03d}.example"
        else:
            u = (j * 7919) % n
            target = f"user{u:07d}@d{u % DOMAINS:03d}.example"
        aliases.append(
            AliasRecord(
                f"list{j:05d}",
                d,
                (target, "outside@remote.example"),
                Where("mailserver.cfg", 1000 + j),
            )
        )
    return domains, users, aliases


def queries(n: int, rng: random.Random):
    hits, misses = [], []
    for _ in range(QUERIES):
        i = rng.randrange(n)
        d = i % DOMAINS
        domain = f"d{d:03d}.example.net" if d < 10 and rng.random() < 0.5 else f"d{d:03d}.example"
        if rng.random() < 0.3:
            domain = domain.upper()
        # a miss looks like a hit: same length, case and domain mix
        hits.append(f"User{i:07d}@{domain}")
        misses.append(f"Nobody{i:05d}@{domain}")
    return hits, misses


def rate(fn, items) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def deep_size(directory) -> int:
    entries = directory._entries
    size = sys.getsizeof(entries) + sys.getsizeof(directory._accounts)
    seen = set()
    for key, value in entries.items():
        size += sys.getsizeof(key)
        if id(value) not in seen and value is not key and not isinstance(value, str):
            seen.add(id(value))
            size += sys.getsizeof(value)
    return size


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rng = random.Random(2024)
    print(f"python {sys.version.split()[0]}, N = {n:,} users, {DOMAINS} domains")

    start = time.perf_counter()
    domains, users, aliases = records(n)
    hits, misses = queries(n, rng)
    print(f"records and queries made in {time.perf_counter() - start:.1f} s")

    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    directory, problems = build(domains, users, aliases)
    build_s = time.perf_counter() - start
    gc.collect()
    grown = rss_mb() - before
    assert not problems, problems[:3]
    assert len(directory) == n
    print("\nmailguard UserDirectory")
    print(f"  build           {build_s:8.2f} s   ({n / build_s:,.0f} users/s)")
    print(f"  RSS growth      {grown:8.1f} MB  ({grown * 2**20 / n:,.0f} bytes/user)")
    size = deep_size(directory)
    print(f"  getsizeof total {size / 2**20:8.1f} MB  ({size / n:,.0f} bytes/user)")

    for name, items, status in (("hits", hits, None), ("misses", misses, LookupStatus.UNKNOWN)):
        if status is not None:
            assert all(directory.lookup(a).status is status for a in items[:1000])
    hit_rate = rate(directory.lookup, hits)
    miss_rate = rate(directory.lookup, misses)
    print(f"  lookup hits     {hit_rate:12,.0f} /s  ({1e6 / hit_rate:.2f} us)")
    print(f"  lookup misses   {miss_rate:12,.0f} /s  ({1e6 / miss_rate:.2f} us)"
          f"   miss/hit time {hit_rate / miss_rate:.2f}")

    # The peer: what a dict of lower-cased addresses costs, no domain
    # aliases, no disabled users, no alias records.
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    peer = {u.address.lower(): True for u in users}
    peer_build_s = time.perf_counter() - start
    gc.collect()
    peer_grown = rss_mb() - before
    get = peer.get
    peer_hit = rate(lambda a: get(a.lower()), hits)
    peer_miss = rate(lambda a: get(a.lower()), misses)
    print("\npeer: dict[str(lower), True]")
    print(f"  build           {peer_build_s:8.2f} s")
    print(f"  RSS growth      {peer_grown:8.1f} MB  ({peer_grown * 2**20 / n:,.0f} bytes/user)")
    print(f"  lookup hits     {peer_hit:12,.0f} /s  ({1e6 / peer_hit:.2f} us)")
    print(f"  lookup misses   {peer_miss:12,.0f} /s  ({1e6 / peer_miss:.2f} us)")

    print("\nratios (mailguard / peer)")
    print(f"  memory          {grown / peer_grown:8.2f} x")
    print(f"  hit time        {peer_hit / hit_rate:8.2f} x")
    print(f"  miss time       {peer_miss / miss_rate:8.2f} x")


if __name__ == "__main__":
    main()
