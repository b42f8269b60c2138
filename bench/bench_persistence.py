"""In-process cost of the persistence hot path, and Firestore writes per message.

    python bench/bench_persistence.py [--emulator] [--gc MODE] [--skip-writes] [--json PATH]

1. cached state read: ``await persistence.get_state(user)`` on a cache hit;
2. append one message: ``persistence.append_message(...)`` (memory + queue);
3. one conversation turn as the WebSocket glue drives it, minus the sockets
   and the frame encoding: the conversation engine (``samvad.conversation``)
   takes the user's message (stored, acknowledged, reply started), the session
   is touched, the one-chunk reply streams and is stored, the user's state is
   updated through the use-case layer, and a late barge-in pushes an
   interruption that is read back;
   ``fixed_work_reference``: the same number of runs of a fixed piece of pure
   Python work (no allocation that outlives it) sized to the turn's median,
   timed the same way right after: what this machine's own jitter (timer
   ticks, the hypervisor, the other tenants) does to a p99 of that size at
   that moment. The turn's p99 over this p99 is what the turn adds to it.
4. Firestore writes issued while one user appends 100 messages at 10 messages/s
   (real time, 10 s), against 100 for one write per message. With ``--emulator``
   the store is the real Firestore emulator (started here unless
   FIRESTORE_EMULATOR_HOST is set); otherwise the memory store, which counts the
   same writes (the write-behind decides them, not the store).

``--gc`` chooses what the garbage collector does during 1-3: ``default``
(CPython's thresholds), ``server`` (what ``samvad serve`` does once started:
``samvad.server.tune_gc``, a freeze and rarer full collections), ``freeze``
(``gc.freeze()`` once the 1,000 users are loaded, as a server could after
start-up), ``off`` (``gc.disable()``: shows
what is the collector and what the code), or ``T0,T1,T2`` thresholds for
``gc.set_threshold``.

The script runs in the memory allocator ``samvad serve`` would run in: with
``SAMVAD_ALLOCATOR=hugepages`` it executes itself again in
``samvad.allocator``'s environment (the JSON's ``machine.allocator`` says
which).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import emit, percentiles, tune_this_process
from samvad.config import Settings
from samvad.conversation import Device, Disconnect, Engine, Event, Reply
from samvad.firestore_client import make_client
from samvad.interruptions import InterruptionStack
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.principal import ANONYMOUS
from samvad.server import tune_gc
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
    if mode == "server":
        tune_gc()
    elif mode == "freeze":
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


class _Quiet:
    """The engine's fan-out and reply runner, doing nothing: no sockets here."""

    def __init__(self) -> None:
        self.reply: Reply | None = None

    def send(self, devices: Sequence[Device], event: Event) -> None:
        return None

    def disconnect(self, devices: Sequence[Device], why: Disconnect) -> None:
        return None

    def start(self, reply: Reply) -> None:
        self.reply = reply

    def cancel(self, reply: Reply) -> None:
        return None


async def hot_path(p: Persistence, iterations: int, gc_mode: str) -> dict[str, object]:
    users = [f"user-{i}" for i in range(USERS)]
    sessions = [f"session-{i}" for i in range(USERS)]
    await warm(p, users, sessions)
    service = SessionService(p, InterruptionStack())
    quiet = _Quiet()
    engine = Engine(service, quiet, quiet, resume_window=200)
    service.bind_live(engine)
    devices = [f"device-{i}" for i in range(USERS)]
    for user, session, device in zip(users, sessions, devices, strict=True):
        snapshot = await service.start(ANONYMOUS, user_id=user, session_id=session)
        engine.join(
            device, session_id=session, user_id=user, session_history=snapshot.session_history
        )
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
        turn_iterations = max(1, iterations // 4)
        for i in range(turn_iterations):
            user, session, device = users[i % USERS], sessions[i % USERS], devices[i % USERS]
            start = clock()
            engine.user_message(device, QUESTION)
            await service.touch_session(session)
            reply = quiet.reply
            assert reply is not None
            engine.reply_chunk(reply, ANSWER)
            engine.reply_done(reply, complete=True)
            await service.save_state(
                ANONYMOUS, user, {"conversationContext": {"topic": "loans", "turn": i}}
            )
            engine.interrupt(device, reason="barge_in", heard_chars=8, reply_id=reply.id)
            service.interruptions.recent(session)
            turns.append(clock() - start)
        reference = fixed_work(len(turns), statistics.median(turns))
    finally:
        restore_gc()
    turn = percentiles(turns)
    return {
        "cached_state_read": percentiles(reads),
        "append_message": percentiles(appends),
        "service_turn": turn,
        "fixed_work_reference": reference,
        "turn_p99_over_reference_p99": round(turn["p99_us"] / reference["p99_us"], 2),
    }


def _work(size: int) -> int:
    # Dict inserts and str() of ints: interpreter work with a small footprint,
    # freed at once.
    table = {}
    for i in range(size):
        table[i] = str(i)
    return len(table)


def fixed_work(runs: int, median_ns: float) -> dict[str, float]:
    """Percentiles of ``runs`` timings of :func:`_work` sized to take ``median_ns``."""
    clock = time.perf_counter_ns
    size = 200
    for _ in range(3):  # calibrate: the size whose median run takes median_ns
        samples = []
        for _ in range(200):
            start = clock()
            _work(size)
            samples.append(clock() - start)
        size = max(10, round(size * median_ns / statistics.median(samples)))
    timings = []
    for _ in range(runs):
        start = clock()
        _work(size)
        timings.append(clock() - start)
    return {"work_size": size, **percentiles(timings)}


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
    parser.add_argument("--gc", default="default", help="default, server, freeze, off or T0,T1,T2")
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
    tune_this_process()  # the turn as samvad serve runs it (SAMVAD_ALLOCATOR)
    asyncio.run(main())
