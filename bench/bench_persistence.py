"""In-process cost of the persistence hot path, and Firestore writes per message.

    python bench/bench_persistence.py [--emulator] [--json PATH]

1. cached state read: ``await persistence.get_state(user)`` on a cache hit;
2. append one message: ``persistence.append_message(...)`` (memory + queue);
3. Firestore writes issued while one user appends 100 messages at 10 messages/s
   (real time, 10 s), against 100 for one write per message. With ``--emulator``
   the store is the real Firestore emulator (started here unless
   FIRESTORE_EMULATOR_HOST is set); otherwise the memory store, which counts the
   same writes (the write-behind decides them, not the store).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, percentiles
from samvad.config import Settings
from samvad.firestore_client import make_client
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.stores.base import HistoryBounds, Store
from samvad.stores.firestore import FirestoreStore
from samvad.stores.memory import MemoryStore


async def hot_path(p: Persistence, iterations: int) -> dict[str, dict[str, float]]:
    users = [f"user-{i}" for i in range(1000)]
    for user in users:
        p.save_state(user, {"language": "en", "conversationContext": {"topic": "loans"}})
        await p.get_state(user)
        await p.get_profile(user)
    reads: list[int] = []
    appends: list[int] = []
    clock = time.perf_counter_ns
    gc.collect()
    for i in range(iterations):
        user = users[i % len(users)]
        start = clock()
        await p.get_state(user)
        reads.append(clock() - start)
    for i in range(iterations):
        user = users[i % len(users)]
        start = clock()
        p.append_message(user, role=Role.USER, content="What documents do I need for a home loan?")
        appends.append(clock() - start)
    return {"cached_state_read": percentiles(reads), "append_message": percentiles(appends)}


async def writes_per_100_messages(p: Persistence, rate: float) -> dict[str, float]:
    user = "steady-user"
    before = p.writes.writes_by_collection.get("user_profiles", 0)
    interval = 1.0 / rate
    start = time.monotonic()
    for i in range(100):
        target = start + i * interval
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        p.append_message(user, role=Role.USER if i % 2 == 0 else Role.ASSISTANT, content=f"m{i}")
    await asyncio.wait_for(p.writes.flush(), 30)
    writes = p.writes.writes_by_collection.get("user_profiles", 0) - before
    return {
        "messages": 100,
        "rate_per_second": rate,
        "firestore_writes": writes,
        "naive_writes": 100,
        "seconds": round(time.monotonic() - start, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emulator", action="store_true", help="use the Firestore emulator")
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    settings = Settings()
    bounds = HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes)
    async with AsyncExitStack() as stack:
        store: Store
        backend = "memory"
        if args.emulator:
            host = os.environ.get("FIRESTORE_EMULATOR_HOST")
            if not host:
                from samvad.emulator import FirestoreEmulator

                emulator = FirestoreEmulator.start()
                stack.callback(emulator.stop)
                host = emulator.host_port
            project = "bench-" + uuid.uuid4().hex[:8]
            store = FirestoreStore(
                lambda: make_client(project=project, emulator_host=host), bounds=bounds
            )
            backend = "firestore-emulator"
        else:
            store = MemoryStore(bounds=bounds)
        await stack.enter_async_context(store)
        p = Persistence(store, settings=settings)
        await stack.enter_async_context(p)
        figures: dict[str, object] = {
            "store": backend,
            "settings": {
                "flush_interval_s": settings.flush_interval,
                "flush_linger_s": settings.flush_linger,
                "history_cap": settings.history_cap,
            },
        }
        figures.update(await hot_path(p, args.iterations))
        await asyncio.wait_for(p.writes.flush(), 120)
        figures["writes_per_100_messages"] = await writes_per_100_messages(p, args.rate)
    emit("persistence", figures, args.json_path)


if __name__ == "__main__":
    asyncio.run(main())
