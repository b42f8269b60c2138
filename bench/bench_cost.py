"""Firestore writes and reads per conversation turn, per user-minute and per day, and
the highest sustained write rate to one document, against the Firestore emulator.

    python bench/bench_cost.py [--minute-users 20] [--day-users 50] [--json PATH]

The server runs in this process (uvicorn on a free port, ``create_app`` with
the default write-behind settings: flush interval 1.5 s, linger 50 ms, touch
interval 30 s) against the real Firestore emulator (started here unless
FIRESTORE_EMULATOR_HOST is set), behind a store that counts the operations
Firestore bills, per document: a document read is one read, a plain set one
write, and a transaction (profile appends, session writes that keep
``createdAt``) one read plus one write. WebSocket clients (``samvad.client``)
talk to it in real time:

* ``minute``: users sending one message per second for 60 s (each answered by
  the built-in responder, streamed with 20 ms between words, so the reply ends
  before the next message);
* ``minute_with_state``: the same, plus a ``state`` update with every message;
* ``day``: the usage of seed 004's cost estimate, one session of 10 messages
  per user (at one message per second), scaled to 1,000 daily active users and
  a 30-day month at $0.18 per 100K writes and $0.06 per 100K reads;
* ``flood``: one user sending 20 messages per second for 20 s: how many writes
  per second its profile document gets (the flush interval bounds it).

Users of the three groups run at the same time; counts are kept per document,
so each group is counted on its own documents.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit
from samvad.cache import ViewCache
from samvad.config import Settings
from samvad.documents import PROFILES, SESSIONS, STATES, Document
from samvad.firestore_client import make_client
from samvad.models import Profile
from samvad.stores.base import HistoryBounds, Store
from samvad.stores.firestore import FirestoreStore
from samvad.web.app import create_app
from samvad.writes import FieldsWrite, ProfileWrite
from tests.support.server import live_server

WRITE_PRICE = 0.18 / 100_000  # seed 004, per write
READ_PRICE = 0.06 / 100_000  # seed 004, per read
SEED_STORAGE_MONTH = 0.18  # seed 004: 1 GB of storage
SEED_MONTHLY = {"writes": 810_000, "reads": 45_000, "total_usd": 1.67}
CHUNK_DELAY = 0.02


class CountingStore(FirestoreStore):
    """The Firestore store, counting billed reads and writes per document."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: Counter[tuple[str, str]] = Counter()
        self.writes: Counter[tuple[str, str]] = Counter()
        self.write_times: dict[tuple[str, str], list[float]] = {}

    def _wrote(self, key: tuple[str, str]) -> None:
        self.writes[key] += 1
        self.write_times.setdefault(key, []).append(time.monotonic())

    async def get(self, collection: str, doc_id: str) -> Document | None:
        self.reads[(collection, doc_id)] += 1
        return await super().get(collection, doc_id)

    async def write_fields(self, write: FieldsWrite) -> None:
        await super().write_fields(write)
        if write.defaults:  # a transaction: read, then write
            self.reads[write.key] += 1
        self._wrote(write.key)

    async def write_profile(self, write: ProfileWrite, *, now: datetime) -> Profile:
        profile = await super().write_profile(write, now=now)
        self.reads[write.key] += 1
        self._wrote(write.key)
        return profile

    def tally(self, prefix: str) -> dict[str, Any]:
        """Reads and writes of the documents of users (and sessions) named ``prefix``*."""
        by_collection: Counter[str] = Counter()
        reads = 0
        for (collection, doc_id), n in self.writes.items():
            if doc_id.startswith(prefix):
                by_collection[collection] += n
        for (_collection, doc_id), n in self.reads.items():
            if doc_id.startswith(prefix):
                reads += n
        return {
            "writes": sum(by_collection.values()),
            "writes_by_collection": dict(by_collection),
            "reads": reads,
        }


@contextlib.asynccontextmanager
async def emulator_host() -> AsyncIterator[str]:
    import os

    host = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if host:
        yield host
        return
    from samvad.emulator import FirestoreEmulator

    emulator = FirestoreEmulator.start()
    try:
        yield emulator.host_port
    finally:
        emulator.stop()


async def user_session(
    url: str,
    user_id: str,
    *,
    turns: int,
    interval: float,
    with_state: bool,
    start_at: float,
    acked: list[int],
) -> None:
    from samvad.client import SamvadClient

    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    async with await SamvadClient.connect(
        url, user_id=user_id, session_id=f"{user_id}-s", language="en", heartbeat=None
    ) as client:
        began = time.monotonic()
        for i in range(turns):
            target = began + i * interval
            wait = target - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if with_state:
                await client.set_state({"conversationContext": {"topic": "loans", "turn": i}})
            exchange = await client.ask(f"Question {i}: what documents do I need?")
            acked.append(exchange.ack["seq"])
        await client.end()


def per_group(store: CountingStore, prefix: str, users: int, turns: int) -> dict[str, Any]:
    tally = store.tally(prefix)
    messages = users * turns * 2  # each turn: the user's message and the reply
    writes, reads = tally["writes"], tally["reads"]
    return {
        **tally,
        "users": users,
        "turns": users * turns,
        "messages": messages,
        "writes_per_turn": round(writes / (users * turns), 3),
        "writes_per_message": round(writes / messages, 3),
        "reads_per_turn": round(reads / (users * turns), 3),
        "naive_writes": messages,
    }


async def flood(url: str, store: CountingStore, seconds: float, rate: float) -> dict[str, Any]:
    from samvad.client import SamvadClient

    user_id = "flood-user"
    key = (PROFILES, user_id)
    sent = 0
    async with await SamvadClient.connect(url, user_id=user_id, heartbeat=None) as client:

        async def drain() -> None:
            with contextlib.suppress(Exception):
                async for _ in client.frames():
                    pass

        reader = asyncio.create_task(drain())
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < seconds:
            await client.message(f"flood {sent}")
            sent += 1
            await asyncio.sleep(max(0.0, sent / rate - elapsed))
        ended = time.monotonic()
        await asyncio.sleep(2.0)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    times = [t for t in store.write_times.get(key, []) if began <= t <= ended]
    busiest = max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "messages_sent": sent,
        "messages_per_second": rate,
        "seconds": round(ended - began, 1),
        "profile_writes": len(times),
        "writes_per_second": round(len(times) / (ended - began), 2),
        "most_writes_in_any_1s_window": busiest,
        "min_gap_between_writes_s": round(min(gaps), 3) if gaps else None,
    }


def monthly(per_user_day: dict[str, float], daily_users: int = 1000) -> dict[str, Any]:
    writes = per_user_day["writes"] * daily_users * 30
    reads = per_user_day["reads"] * daily_users * 30
    return {
        "writes_per_month": round(writes),
        "reads_per_month": round(reads),
        "writes_usd": round(writes * WRITE_PRICE, 2),
        "reads_usd": round(reads * READ_PRICE, 2),
        "storage_usd": SEED_STORAGE_MONTH,
        "total_usd": round(writes * WRITE_PRICE + reads * READ_PRICE + SEED_STORAGE_MONTH, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with emulator_host() as host:
        project = "bench-cost-" + uuid.uuid4().hex[:8]
        settings = Settings(
            store="firestore",
            emulator_host=host,
            project=project,
            ws_reply_chunk_delay=CHUNK_DELAY,
            ws_rate_per_second=max(20.0, args.flood_rate * 2),
            ws_rate_burst=100,
            log_level="WARNING",
            flush_interval=args.flush_interval,
        )
        if args.absent_ttl is not None:
            # Only to compare with the cache before absence was cached (0).
            defaults = ViewCache.__init__.__kwdefaults__
            assert defaults is not None
            defaults["absent_ttl"] = args.absent_ttl
        bounds = HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes)
        stores: list[CountingStore] = []

        def factory(s: Settings) -> Store:
            store = CountingStore(
                lambda: make_client(project=project, emulator_host=host),
                bounds=bounds,
                deadline=s.firestore_deadline,
            )
            stores.append(store)
            return store

        app = create_app(settings, store_factory=factory)
        figures: dict[str, Any] = {
            "emulator": host,
            "settings": {
                "flush_interval_s": settings.flush_interval,
                "flush_linger_s": settings.flush_linger,
                "touch_interval_s": settings.touch_interval,
                "absent_ttl_s": args.absent_ttl if args.absent_ttl is not None else "default (60)",
                "responder_chunk_delay_s": CHUNK_DELAY,
            },
        }
        async with live_server(app) as server:
            store = stores[0]
            url = server.ws_url + "/ws"
            acked: list[int] = []
            now = time.monotonic() + 0.5
            tasks = []
            for i in range(args.minute_users):
                tasks.append(
                    user_session(
                        url,
                        f"minute-{i}",
                        turns=60,
                        interval=1.0,
                        with_state=False,
                        start_at=now + i * 0.05,
                        acked=acked,
                    )
                )
                tasks.append(
                    user_session(
                        url,
                        f"mstate-{i}",
                        turns=60,
                        interval=1.0,
                        with_state=True,
                        start_at=now + i * 0.05 + 0.025,
                        acked=acked,
                    )
                )
            for i in range(args.day_users):
                tasks.append(
                    user_session(
                        url,
                        f"day-{i}",
                        turns=10,
                        interval=1.0,
                        with_state=False,
                        start_at=now + i * 50.0 / max(1, args.day_users),
                        acked=acked,
                    )
                )
            await asyncio.gather(*tasks)
            persistence = server.services.persistence
            await asyncio.wait_for(persistence.writes.flush(), 120)
            figures["minute"] = per_group(store, "minute-", args.minute_users, 60)
            figures["minute_with_state"] = per_group(store, "mstate-", args.minute_users, 60)
            figures["minute"]["writes_per_user_minute"] = round(
                figures["minute"]["writes"] / args.minute_users, 2
            )
            figures["minute_with_state"]["writes_per_user_minute"] = round(
                figures["minute_with_state"]["writes"] / args.minute_users, 2
            )
            day = per_group(store, "day-", args.day_users, 10)
            per_user_day = {
                "writes": day["writes"] / args.day_users,
                "reads": day["reads"] / args.day_users,
            }
            day["per_user_day"] = {k: round(v, 2) for k, v in per_user_day.items()}
            day["month_1000_dau"] = monthly(per_user_day)
            day["seed_004_month_1000_dau"] = SEED_MONTHLY
            figures["day"] = day
            figures["flood"] = await flood(url, store, args.flood_seconds, args.flood_rate)
            await asyncio.wait_for(persistence.writes.flush(), 120)
            figures["by_collection_all"] = {
                name: sum(n for (c, _), n in store.writes.items() if c == name)
                for name in (STATES, PROFILES, SESSIONS)
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minute-users", type=int, default=20)
    parser.add_argument("--day-users", type=int, default=50)
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--flood-rate", type=float, default=20.0)
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=Settings().flush_interval,
        help="SAMVAD_FLUSH_INTERVAL_SECONDS (default: the server's)",
    )
    parser.add_argument(
        "--absent-ttl", type=float, help="seconds absence is cached (0: as before it was)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    emit("cost", asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
