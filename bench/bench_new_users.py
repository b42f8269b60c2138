"""CPU per first write of a user the cache does not hold: the append (or state
save) and the background load of the user's view that it starts, in process,
on the memory store.

    python bench/bench_new_users.py [--users N] [--rounds R] [--root DIR ...]

Each ``--root`` is a checkout to import ``samvad`` from (default: this one);
with several, the rounds alternate between them, each in a fresh process, so
that the machine's drift hits every tree alike. Prints µs of process CPU per
user for each tree and round, and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import asyncio, gc, json, sys, time
from samvad.config import Settings
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.stores.memory import MemoryStore

async def main(users: int) -> None:
    store = MemoryStore()
    async with Persistence(store, settings=Settings(flush_interval=3600.0)) as p:
        for warm in range(200):  # imports, first-use allocations
            p.append_message(f"w{warm}", role=Role.USER, content="hello")
        await p.settle()
        gc.collect()
        gc.freeze()
        started = time.process_time()
        for i in range(users):
            p.append_message(f"u{i}", role=Role.USER, content="hello there")
            p.save_state(f"u{i}", {"language": "en"})
            if i % 100 == 99:
                await p.settle()
        await p.settle()
        spent = time.process_time() - started
        print(json.dumps({"us_per_user": spent / users * 1e6}))

asyncio.run(main(int(sys.argv[1])))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", action="append", default=None)
    args = parser.parse_args(argv)
    roots = args.root or [str(Path(__file__).resolve().parent.parent)]
    figures: dict[str, list[float]] = {root: [] for root in roots}
    for _round in range(args.rounds):
        for root in roots:
            env = {**os.environ, "PYTHONPATH": root}
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(args.users)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
                cwd=root,
            ).stdout
            figures[root].append(json.loads(out.splitlines()[-1])["us_per_user"])
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    for root, values in figures.items():
        rounds = " / ".join(f"{v:.1f}" for v in values)
        print(f"{Path(root).name}: {rounds} µs per user (median {statistics.median(values):.1f})")
    print(f"load average: {' '.join(load)}")


if __name__ == "__main__":
    main()
