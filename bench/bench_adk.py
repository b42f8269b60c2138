"""ADK session services side by side: a conversation turn, 50 users x 20 turns.

    python bench/bench_adk.py [--users 50] [--turns 20] [--rounds 2] [--json PATH]

A turn is what an ADK runner does with its session service for one exchange:
append the user's event, append the model's event with a small state delta,
read the session with its last 20 events. Each user runs its turns one after
the other; the users run concurrently, all in this process. The events are
built before the clock starts (identical for every service), so what is timed
is the session service. Services, in one
interleaved run (their order rotates each round):

* ``samvad_durable`` — SamvadSessionService on the Firestore emulator; its
  throughput counts until the final ``flush()`` returned, so every turn is in
  Firestore (default write-behind settings: flush interval 1 s, linger 50 ms);
* ``samvad_memory`` — SamvadSessionService on the memory store;
* ``adk_firestore`` — ADK's FirestoreSessionService on the same emulator
  (every call is a Firestore round trip, appends are transactions);
* ``adk_in_memory`` / ``adk_in_memory_light_copy`` — ADK's
  InMemorySessionService, normal (deep copies) and with its light-copy flag.

Firestore documents read and written per turn are counted at the client: for
Samvad by a counting store, for ADK's service by a proxy in front of the
client's RPC layer (a document in a commit is one write; a document returned
by a get or a query is one read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.features import FeatureName, override_feature_enabled
from google.adk.integrations.firestore import FirestoreSessionService
from google.adk.sessions.base_session_service import BaseSessionService, GetSessionConfig
from google.adk.sessions.in_memory_session_service import InMemorySessionService
from google.genai import types

from bench._common import emit, percentiles
from samvad.adk import SamvadSessionService
from samvad.config import Settings
from samvad.documents import Document
from samvad.firestore_client import close_client, make_client
from samvad.stores.base import HistoryBounds
from samvad.stores.firestore import FirestoreStore
from samvad.stores.memory import MemoryStore
from samvad.writes import FieldsWrite

APP = "bench_app"
RECENT = GetSessionConfig(num_recent_events=20)


class CountingStore(FirestoreStore):
    """The Firestore store, counting documents read and written."""

    reads = 0
    writes = 0

    async def get(self, collection: str, doc_id: str) -> Document | None:
        self.reads += 1
        return await super().get(collection, doc_id)

    async def select(self, collection: str, *, where: Any) -> list[tuple[str, Document]]:
        rows = await super().select(collection, where=where)
        self.reads += max(1, len(rows))  # an empty query is billed one read
        return rows

    async def write_fields(self, write: FieldsWrite) -> None:
        await super().write_fields(write)
        self.writes += 1


class CountingApi:
    """Stands in front of a Firestore client's RPC layer, counting documents."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self.reads = 0
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    async def _counted(self, stream: Any, found: Callable[[Any], bool]) -> AsyncIterator[Any]:
        seen = 0
        async for response in stream:
            if found(response):
                seen += 1
            yield response
        self.reads += max(1, seen)

    async def batch_get_documents(self, *args: Any, **kwargs: Any) -> Any:
        stream = await self._api.batch_get_documents(*args, **kwargs)
        return self._counted(stream, lambda r: True)

    async def run_query(self, *args: Any, **kwargs: Any) -> Any:
        stream = await self._api.run_query(*args, **kwargs)
        return self._counted(stream, lambda r: bool(r.document and r.document.name))

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        request = kwargs.get("request", args[0] if args else None)
        writes = request.get("writes") if isinstance(request, dict) else request.writes
        self.writes += len(writes or ())
        return await self._api.commit(*args, **kwargs)


def user_event(turn: int) -> Event:
    return Event(
        invocation_id=f"inv{turn}",
        author="user",
        content=types.Content(
            role="user", parts=[types.Part(text=f"Question {turn}: what documents do I need?")]
        ),
    )


def model_event(turn: int) -> Event:
    return Event(
        invocation_id=f"inv{turn}",
        author="assistant",
        content=types.Content(
            role="model",
            parts=[types.Part(text="Your ID, proof of address and the last three payslips.")],
        ),
        actions=EventActions(state_delta={"turn": turn, "topic": "loans"}),
    )


Turn = tuple[Event, Event]


def script(turns: int) -> list[Turn]:
    """One user's events, built before the clock starts: building pydantic
    events costs more than some services' whole turn, and is the caller's work."""
    return [(user_event(turn), model_event(turn)) for turn in range(turns)]


async def user(
    service: BaseSessionService, user_id: str, turns: list[Turn], samples: list[int]
) -> None:
    session = await service.create_session(app_name=APP, user_id=user_id)
    for index, (asked, answered) in enumerate(turns):
        began = time.perf_counter_ns()
        await service.append_event(session, asked)
        await service.append_event(session, answered)
        fresh = await service.get_session(
            app_name=APP, user_id=user_id, session_id=session.id, config=RECENT
        )
        samples.append(time.perf_counter_ns() - began)
        assert fresh is not None and len(fresh.events) == min(20, 2 * index + 2)
        session = fresh


@contextlib.asynccontextmanager
async def emulator() -> AsyncIterator[str]:
    host = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if host:
        yield host
        return
    from samvad.emulator import FirestoreEmulator

    with FirestoreEmulator.start() as started:
        yield started.host_port


@contextlib.asynccontextmanager
async def build(
    name: str, host: str
) -> AsyncIterator[tuple[BaseSessionService, Callable[[], Any]]]:
    """The service ``name`` on a project of its own, and a counter reader."""
    project = "bench-adk-" + uuid.uuid4().hex[:8]
    settings = Settings(store="firestore")
    bounds = HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes)
    if name == "samvad_durable":
        store = CountingStore(
            lambda: make_client(project=project, emulator_host=host), bounds=bounds
        )
        async with (
            store,
            SamvadSessionService(store=store, settings=settings, mirror_history=False) as service,
        ):
            yield service, lambda: (store.reads, store.writes)
    elif name == "samvad_memory":
        async with SamvadSessionService(
            store=MemoryStore(bounds=bounds), settings=settings, mirror_history=False
        ) as service:
            yield service, lambda: (0, 0)
    elif name == "adk_firestore":
        client = make_client(project=project, emulator_host=host)
        api = CountingApi(client._firestore_api)
        client._firestore_api_internal = api
        try:
            yield FirestoreSessionService(client=client), lambda: (api.reads, api.writes)
        finally:
            await close_client(client)
    else:
        light = name == "adk_in_memory_light_copy"
        override_feature_enabled(FeatureName.IN_MEMORY_SESSION_SERVICE_LIGHT_COPY, light)
        try:
            yield InMemorySessionService(), lambda: (0, 0)
        finally:
            override_feature_enabled(FeatureName.IN_MEMORY_SESSION_SERVICE_LIGHT_COPY, False)


async def run_one(name: str, host: str, users: int, turns: int) -> dict[str, Any]:
    async with build(name, host) as (service, counts):
        samples: list[int] = []
        scripts = [script(turns) for _ in range(users)]
        gc.collect()
        cpu_began = time.process_time()
        began = time.perf_counter()
        await asyncio.gather(
            *(
                user(service, f"u{i}-{uuid.uuid4().hex[:6]}", scripts[i], samples)
                for i in range(users)
            )
        )
        served = time.perf_counter() - began
        await service.flush()
        durable = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        reads, writes = counts()
    total = users * turns
    return {
        "turns": total,
        "served_s": served,
        "durable_s": durable,
        "cpu_s": cpu,
        "reads": reads,
        "writes": writes,
        "samples": samples,
    }


async def main(args: argparse.Namespace) -> None:
    names = [
        "samvad_durable",
        "adk_firestore",
        "samvad_memory",
        "adk_in_memory",
        "adk_in_memory_light_copy",
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    async with emulator() as host:
        # Warm the emulator (its JIT) and every code path once, unmeasured.
        for name in names:
            await run_one(name, host, 5, 3)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                runs[name].append(await run_one(name, host, args.users, args.turns))
                print(f"round {round_ + 1}: {name} done", file=sys.stderr, flush=True)
    figures: dict[str, Any] = {
        "users": args.users,
        "turns_per_user": args.turns,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
    }
    for name, results in runs.items():
        samples = [s for r in results for s in r["samples"]]
        turns = sum(r["turns"] for r in results)
        served = sum(r["served_s"] for r in results)
        durable = sum(r["durable_s"] for r in results)
        stats = percentiles(samples)
        figures[name] = {
            "p50_ms": round(stats["p50_us"] / 1000, 3),
            "p99_ms": round(stats["p99_us"] / 1000, 3),
            "turns_per_s": round(turns / served, 1),
            "durable_turns_per_s": (
                round(turns / durable, 1) if name.endswith(("durable", "firestore")) else None
            ),
            # This process's CPU (not the emulator's), until durable: steadier
            # than wall time on a shared machine.
            "cpu_us_per_turn": round(sum(r["cpu_s"] for r in results) / turns * 1e6, 1),
            "reads_per_turn": round(sum(r["reads"] for r in results) / turns, 3),
            "writes_per_turn": round(sum(r["writes"] for r in results) / turns, 3),
        }
    best_durable_adk = figures["adk_firestore"]["durable_turns_per_s"]
    fastest_memory_adk = max(
        figures["adk_in_memory"]["turns_per_s"], figures["adk_in_memory_light_copy"]["turns_per_s"]
    )
    figures["ratios"] = {
        "samvad_durable_vs_adk_firestore": round(
            figures["samvad_durable"]["durable_turns_per_s"] / best_durable_adk, 1
        ),
        "samvad_memory_vs_fastest_adk_in_memory": round(
            figures["samvad_memory"]["turns_per_s"] / fastest_memory_adk, 2
        ),
    }
    emit("bench_adk", figures, args.json)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    asyncio.run(main(parser.parse_args()))
