"""SamvadSessionService beyond ADK's contract: durability across a restart, two
instances on one session, erasure, history, collections and the registry."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.adk.cli.service_registry import get_service_registry
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.sessions.session import Session
from google.genai import types

from samvad.adk import SamvadSessionService
from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.stores.base import Store
from samvad.stores.memory import MemoryStore
from tests.adk.conftest import SETTINGS, firestore_store, samvad_service

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0

pytestmark = pytest.mark.firestore


def text_event(i: int, text: str, *, author: str = "user", **delta: object) -> Event:
    return Event(
        invocation_id=f"inv{i}",
        author=author,
        timestamp=T0 + i,
        content=types.Content(
            role="user" if author == "user" else "model", parts=[types.Part(text=text)]
        ),
        actions=EventActions(state_delta=dict(delta)),
    )


def run_writer(host: str, project: str, session_id: str, first: int, count: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.adk._writer",
            host,
            project,
            session_id,
            str(first),
            str(count),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


async def test_a_session_survives_a_server_restart_whole(
    firestore_emulator: str, firestore_project: str, emulator_store: Store
) -> None:
    # A server process appends and shuts down; this process, the restarted
    # server, reads the session back whole and goes on appending.
    run_writer(firestore_emulator, firestore_project, "s-restart", 0, 6)
    async with samvad_service(emulator_store) as restarted:
        session = await restarted.get_session(app_name="app", user_id="u1", session_id="s-restart")
        assert session is not None
        assert [e.invocation_id for e in session.events] == [str(i) for i in range(6)]
        assert session.state == {"turns": 6, "app:seen": 5, "user:name": "Ada"}
        for i in range(6, 10):
            await restarted.append_event(session, text_event(i, f"turn {i}", turns=i + 1))
    async with samvad_service(emulator_store) as again:
        whole = await again.get_session(app_name="app", user_id="u1", session_id="s-restart")
        assert whole is not None
        assert [e.content.parts[0].text for e in whole.events] == [f"turn {i}" for i in range(10)]
        assert whole.state == {"turns": 10, "app:seen": 5, "user:name": "Ada"}
        assert whole.last_update_time == T0 + 9
        assert await again.get_user_state(app_name="app", user_id="u1") == {"name": "Ada"}


async def test_two_instances_appending_to_one_session_lose_nothing(
    firestore_emulator: str, firestore_project: str
) -> None:
    async with (
        firestore_store(firestore_emulator, firestore_project) as store_a,
        firestore_store(firestore_emulator, firestore_project) as store_b,
        samvad_service(store_a) as a,
        samvad_service(store_b) as b,
    ):
        created = await a.create_session(app_name="app", user_id="u1", session_id="shared")
        await a.flush()
        from_b = await b.get_session(app_name="app", user_id="u1", session_id="shared")
        assert from_b is not None

        async def append(service: SamvadSessionService, session: Session, parity: int) -> None:
            for i in range(parity, 20, 2):
                await service.append_event(
                    session, text_event(i, f"m{i}", **{f"k{parity}": i, "last": i})
                )
                await asyncio.sleep(0)  # let the other instance interleave

        await asyncio.gather(append(a, created, 0), append(b, from_b, 1))
        await asyncio.gather(a.flush(), b.flush())

    async with (
        firestore_store(firestore_emulator, firestore_project) as store_c,
        samvad_service(store_c) as c,
    ):
        merged = await c.get_session(app_name="app", user_id="u1", session_id="shared")
        assert merged is not None
        # Every event of both instances, in the order they happened.
        assert [e.invocation_id for e in merged.events] == [f"inv{i}" for i in range(20)]
        # Each instance's keys survive; a key both wrote holds one of the two.
        assert merged.state["k0"] == 18
        assert merged.state["k1"] == 19
        assert merged.state["last"] in (18, 19)


async def test_erasing_a_user_erases_their_adk_data_in_every_app(
    firestore_emulator: str, firestore_project: str, emulator_store: Store
) -> None:
    async with samvad_service(emulator_store) as service:
        for app in ("app1", "app2"):
            session = await service.create_session(
                app_name=app, user_id="u1", state={"user:pref": app, "app:shared": 1}
            )
            await service.append_event(session, text_event(1, "hello"))
        kept = await service.create_session(app_name="app1", user_id="u2", session_id="keep")
        await service.append_event(kept, text_event(1, "mine"))
        await service.flush()
        # A write still queued when the erase comes must not resurrect anything.
        late = await service.create_session(app_name="app1", user_id="u1", session_id="late")
        await service.append_event(late, text_event(2, "late"))
        assert await service.erase_user("u1") >= 3
        assert (await service.list_sessions(app_name="app1", user_id="u1")).sessions == []
        await service.flush()

    async with (
        firestore_store(firestore_emulator, firestore_project) as fresh,
        samvad_service(fresh) as reader,
    ):
        for app in ("app1", "app2"):
            assert (await reader.list_sessions(app_name=app, user_id="u1")).sessions == []
            assert await reader.get_user_state(app_name=app, user_id="u1") == {}
        assert await reader.get_session(app_name="app1", user_id="u1", session_id="late") is None
        other = await reader.get_session(app_name="app1", user_id="u2", session_id="keep")
        assert other is not None
        assert [e.content.parts[0].text for e in other.events] == ["mine"]
        # App-scoped state belongs to the app, not to the erased user.
        assert other.state == {"app:shared": 1}
    c = service.collections
    assert await emulator_store.select(c.events, where={"userId": "u1"}) == []
    assert await emulator_store.select(c.sessions, where={"userId": "u1"}) == []
    assert [doc_id for doc_id, _ in await emulator_store.select(c.events, where={"userId": "u2"})]


async def test_collections_are_apart_from_samvad_and_from_adk_firestore(
    emulator_store: Store,
) -> None:
    async with samvad_service(emulator_store, prefix="bot_") as service:
        session = await service.create_session(app_name="app", user_id="u1", session_id="s1")
        await service.append_event(session, text_event(1, "hi", k=1))
        await service.flush()
    c = service.collections
    assert (c.sessions, c.events, c.app_states, c.user_states) == (
        "bot_sessions",
        "bot_events",
        "bot_app_states",
        "bot_user_states",
    )
    assert [doc_id for doc_id, _ in await emulator_store.select(c.sessions, where={"userId": "u1"})]
    # Samvad's own sessions and ADK's FirestoreSessionService's collections stay empty.
    for collection in ("sessions", "adk-session", "app_states", "user_states", "adk_sessions"):
        assert await emulator_store.select(collection, where={"userId": "u1"}) == []


async def test_a_burst_of_events_in_one_session_is_one_write_per_document(
    emulator_store: Store,
) -> None:
    async with samvad_service(emulator_store) as service:
        session = await service.create_session(app_name="app", user_id="u1", session_id="s1")
        await service.flush()
        before = dict(service.writes_by_collection)
        for i in range(30):
            await service.append_event(session, text_event(i, f"m{i}", turn=i))
        await service.flush()
        c = service.collections
        after = service.writes_by_collection
        assert after[c.events] - before.get(c.events, 0) == 1
        assert after[c.sessions] - before[c.sessions] == 1


async def test_text_turns_reach_the_users_samvad_history(emulator_store: Store) -> None:
    persistence = Persistence(emulator_store, settings=SETTINGS)
    async with (
        persistence,
        samvad_service(emulator_store, persistence=persistence, mirror_history=True) as service,
    ):
        session = await service.create_session(app_name="app", user_id="u-hist", session_id="s1")
        await service.append_event(session, text_event(1, "What are the fees?"))
        tool_call = Event(
            author="agent",
            content=types.Content(
                role="model",
                parts=[types.Part(function_call=types.FunctionCall(name="fees", args={}))],
            ),
        )
        await service.append_event(session, tool_call)
        await service.append_event(session, text_event(2, "Two percent.", author="agent"))
        await service.flush()
    async with Persistence(emulator_store, settings=SETTINGS) as reader:
        profile = await reader.get_profile("u-hist")
    assert profile is not None
    assert [(m.role, m.content, m.session_id) for m in profile.history] == [
        (Role.USER, "What are the fees?", "s1"),
        (Role.ASSISTANT, "Two percent.", "s1"),
    ]


async def test_the_samvad_scheme_builds_the_service_from_the_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    registry = get_service_registry()
    service = registry.create_session_service("samvad://my-project?prefix=bot_&store=memory")
    assert isinstance(service, SamvadSessionService)
    assert service.settings.project == "my-project"
    assert service.settings.store == "memory"
    assert service.collections.sessions == "bot_sessions"
    async with service:
        session = await service.create_session(app_name="app", user_id="u1", state={"k": 1})
        got = await service.get_session(app_name="app", user_id="u1", session_id=session.id)
        assert got == session
        assert service.status() is not None
    with pytest.raises(ConfigError, match="colour"):
        registry.create_session_service("samvad://?colour=blue")


async def test_on_the_memory_store_sessions_live_in_memory_and_nothing_is_queued() -> None:
    store = MemoryStore()
    async with SamvadSessionService(
        store=store, settings=Settings(store="memory", cache_ttl=1.0), mirror_history=False
    ) as service:
        session = await service.create_session(app_name="app", user_id="u1", state={"user:a": 1})
        await service.append_event(session, text_event(1, "hi", k=1))
        status = service.status()
        assert status is not None and status.pending_documents == 0
        await service.flush()
        assert store.writes == 0
        got = await service.get_session(app_name="app", user_id="u1", session_id=session.id)
        assert got is not None
        assert got.state == {"k": 1, "user:a": 1}
        assert [e.content.parts[0].text for e in got.events] == ["hi"]
