"""In-process cost of the persistence hot path, and Firestore writes per message.

    python bench/bench_persistence.py [--emulator] [--gc default|freeze|off|T0,T1,T2] [--json PATH]

1. cached state read: ``await persistence.get_state(user)`` on a cache hit;
2. append one message: ``persistence.append_message(...)`` (memory + queue);
3. a service-level conversation turn through the use-case layer
   (``samvad.service``), the calls the WebSocket glue makes for one exchange
   minus the frames: the user's message recorded, the session touched, the
   assistant's reply recorded, the user's state updated, and an interruption
   pushed and read back;
4. Firestore writes issued while one user appends 100 messages at 10 messages/s
   (real time, 10 s), against 100 for one write per message. With ``--emulator``
   the store is the real Firestore emulator (started here unless
   FIRESTORE_EMULATOR_HOST is set); otherwise the memory store, which counts the
   same writes (the write-behind decides them, not the store).

``--gc`` chooses what the garbage collector does during 1-3: ``default``
(CPython's thresholds), ``freeze`` (``gc.freeze()`` once the 1,000 users are
loaded, as a server could after start-up), ``off`` (``gc.disable()``: shows
what is the collector and what the code), or ``T0,T1,T2`` thresholds for
``gc.set_threshold``.
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
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, percentiles
from samvad.config import Settings
from samvad.firestore_client import make_client
from samvad.interruptions import Interruption, InterruptionStack
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.principal import ANONYMOUS
from samvad.service import SessionService
from samvad.stores.base import HistoryBounds, Store
from samvad.stores.firestore import FirestoreStore
from samvad.stores.memory import MemoryStore

USERS = 1000
QUESTION = "What documents do I need for a home loan?"
ANSWER = (
    'You said: "What documents do I need for a home loan?". That is 9 words; message 3 of '
    "this conversation. I am the built-in responder, so I simply reflect what I hear back to you."
)


def apply_gc_mode(mode: str) -> None:
    gc.collect()
    if mode == "freeze":
        gc.freeze()
    elif mode == "off":
        gc.disable()
    elif mode != "default":
        t0, t1, t2 = (int(x) for x in mode.split(","))
        gc.set_threshold(t0, t1, t2)


def restore_gc() -> None:
    gc.enable()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)


async def warm(p: Persistence, users: list[str], sessions: list[str]) -> None:
    for user, session in zip(users, sessions, strict=True):
        p.save_state(user, {"language": "en", "conversationContext": {"topic": "loans"}})
        await p.get_state(user)
        await p.get_profile(user)
        await p.save_session(session, user_id=user, language="en")
        for i in range(100):  # a full history, as a user who has talked for a while has
            p.append_message(
                user,
                role=Role.USER if i % 2 == 0 else Role.ASSISTANT,
                content=QUESTION if i % 2 == 0 else ANSWER,
                session_id=session,
                seq=i + 1,
            )
    await asyncio.wait_for(p.writes.flush(), 120)


async def hot_path(p: Persistence, iterations: int, gc_mode: str) -> dict[str, object]:
    users = [f"user-{i}" for i in range(USERS)]
    sessions = [f"session-{i}" for i in range(USERS)]
    await warm(p, users, sessions)
    service = SessionService(p, InterruptionStack())
    at = datetime.now(UTC)
    reads: list[int] = []
    appends: list[int] = []
    turns: list[int] = []
    clock = time.perf_counter_ns
    apply_gc_mode(gc_mode)
    try:
        for i in range(iterations):
            user = users[i % USERS]
            start = clock()
            await p.get_state(user)
            reads.append(clock() - start)
        for i in range(iterations):
            user = users[i % USERS]
            start = clock()
            p.append_message(user, role=Role.USER, content=QUESTION)
            appends.append(clock() - start)
        seq = 1000
        turn_iterations = max(1, iterations // 4)
        for i in range(turn_iterations):
            user, session = users[i % USERS], sessions[i % USERS]
            seq += 2
            start = clock()
            service.record_message(user, session, role=Role.USER, content=QUESTION, seq=seq)
            await service.touch_session(session)
            message = service.record_message(
                user, session, role=Role.ASSISTANT, content=ANSWER, seq=seq + 1
            )
            await service.save_state(
                ANONYMOUS, user, {"conversationContext": {"topic": "loans", "turn": seq}}
            )
            service.push_interruption(
                Interruption(
                    session_id=session,
                    user_id=user,
                    at=at,
                    reason="barge_in",
                    heard="You said",
                    cut=" the rest",
                    message_id=message.id,
                )
            )
            service.interruptions.recent(session)
            turns.append(clock() - start)
    finally:
        restore_gc()
    return {
        "cached_state_read": percentiles(reads),
        "append_message": percentiles(appends),
        "service_turn": percentiles(turns),
    }


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulator", action="store_true", help="use the Firestore emulator")
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--gc", default="default", help="default, freeze, off or T0,T1,T2")
    parser.add_argument("--skip-writes", action="store_true", help="only the hot path")
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
            "gc": args.gc,
            "users": USERS,
            "history_per_user": settings.history_cap,
            "settings": {
                "flush_interval_s": settings.flush_interval,
                "flush_linger_s": settings.flush_linger,
                "history_cap": settings.history_cap,
            },
        }
        figures.update(await hot_path(p, args.iterations, args.gc))
        await asyncio.wait_for(p.writes.flush(), 300)
        if not args.skip_writes:
            figures["writes_per_100_messages"] = await writes_per_100_messages(p, args.rate)
    emit("persistence", figures, args.json_path)


if __name__ == "__main__":
    asyncio.run(main())
