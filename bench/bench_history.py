"""The cost of one appended message as histories fill: the store's flush and the view's append.

    .venv/bin/python bench/bench_history.py --json bench/results/history.json

In-process, over the memory store: 200 users each hold ``n`` messages (1 and
100, the cap), then each gets one more message, 20 rounds. ``store_flush`` is
``MemoryStore.write_profile`` of a one-message :class:`ProfileWrite` (what the
write-behind does once per document per flush interval); ``append`` is
``Persistence.append_message`` (what a request does: the cached view and the
queued write; a one-hour flush interval keeps the write-behind out of the
timing). Median microseconds. To compare two trees, run a copy of the script in
each (it imports ``samvad`` from its own tree), alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit
from samvad.config import Settings
from samvad.models import Message, Role
from samvad.persistence import Persistence
from samvad.stores.memory import MemoryStore
from samvad.writes import ProfileWrite

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CONTENT = "x" * 200
USERS = 200
ROUNDS = 20


def _message(user: int, i: int) -> Message:
    return Message(
        id=f"u{user}-{i:06d}",
        role=Role.USER,
        content=CONTENT,
        timestamp=T0 + timedelta(milliseconds=i),
    )


async def _run() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for held in (1, 100):
        store = MemoryStore()
        for u in range(USERS):
            write = ProfileWrite(user_id=f"u{u}", append=[_message(u, i) for i in range(held)])
            await store.write_profile(write, now=T0)
        samples: list[int] = []
        for r in range(ROUNDS):
            for u in range(USERS):
                write = ProfileWrite(user_id=f"u{u}", append=[_message(u, 1000 + r)])
                started = time.perf_counter_ns()
                await store.write_profile(write, now=T0)
                samples.append(time.perf_counter_ns() - started)
        out[f"store_flush_{held}_us"] = round(statistics.median(samples) / 1000, 2)

        persistence = Persistence(
            MemoryStore(), settings=Settings(store="memory", flush_interval=3600.0)
        )
        await persistence.start()
        for u in range(USERS):
            for _ in range(held):
                persistence.append_message(f"u{u}", role=Role.USER, content=CONTENT)
        await persistence.settle()
        samples = []
        for _ in range(ROUNDS):
            for u in range(USERS):
                started = time.perf_counter_ns()
                persistence.append_message(f"u{u}", role=Role.USER, content=CONTENT)
                samples.append(time.perf_counter_ns() - started)
        out[f"append_{held}_us"] = round(statistics.median(samples) / 1000, 2)
        await persistence.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    emit("history", asyncio.run(_run()), args.json)


if __name__ == "__main__":
    main()
