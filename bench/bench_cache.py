"""What a cache update costs, and its worst case: the view caches' entries store under churn.

    .venv/bin/python bench/bench_cache.py [--tree ../other-checkout] [--entries N ...]

A view cache (``samvad.cache``) keeps its entries in two ordered dicts (order
of use, order of expiry). Every message updates the cached profile, session
or state of its user: a ``put`` of a key already held. This fills a store of
``--entries`` entries, then puts every key again, round and round
(``--rounds`` passes), timing each put. It prints the mean and the five
slowest. The slowest are what one update can cost the event loop when the
dicts are rebuilt. ``--tree`` imports ``samvad`` from another checkout, to
compare two trees in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run(entries: int, rounds: int) -> dict[str, Any]:
    from samvad.cache import _Expiring

    now = [0.0]
    store: _Expiring[int, int] = _Expiring(
        max_entries=entries, max_size=entries * 1000, ttl=1800.0, timer=lambda: now[0]
    )
    for key in range(entries):
        store.put(key, key, 100)
    clock = time.perf_counter_ns
    timings = []
    for _ in range(rounds):
        for key in range(entries):
            now[0] += 0.001
            start = clock()
            store.put(key, key, 100)
            timings.append(clock() - start)
    timings.sort()
    return {
        "entries": entries,
        "puts": len(timings),
        "mean_us": round(sum(timings) / len(timings) / 1000, 3),
        "p99_us": round(timings[int(len(timings) * 0.99)] / 1000, 2),
        "slowest_us": [round(t / 1000, 1) for t in timings[-5:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to import from")
    parser.add_argument("--entries", type=int, action="append")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import samvad

    print(f"samvad from {Path(samvad.__file__).resolve().parent.parent.name}")
    for entries in args.entries or [1000, 50_000]:
        result = run(entries, args.rounds)
        print(
            f"{result['entries']:>7} entries, {result['puts']} updates: mean "
            f"{result['mean_us']} µs, p99 {result['p99_us']} µs, slowest {result['slowest_us']} µs"
        )


if __name__ == "__main__":
    main()
