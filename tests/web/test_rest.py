"""The REST session API over real HTTP: every endpoint against a live server with
the Firestore emulator behind it, exact response shapes, and Firestore read
directly to prove what was stored."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from google.cloud.firestore import AsyncClient
from google.cloud.firestore_v1.base_query import FieldFilter
from starlette.routing import Route

from samvad.clock import Clock, ManualClock
from samvad.config import Settings
from samvad.interruptions import Interruption
from samvad.web.apidocs import openapi_document as document
from samvad.web.app import create_app
from samvad.web.schemas import plain_json as jsonable
from tests.support.server import LiveServer, live_server

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SESSION_KEYS = {
    "id",
    "userId",
    "language",
    "metadata",
    "isActive",
    "status",
    "createdAt",
    "lastActivity",
    "endedAt",
    "expireAt",
}


class AnyIso:
    """Equal to any wire-format timestamp."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and ISO.match(other) is not None

    def __repr__(self) -> str:
        return "<ISO timestamp>"


ANY_ISO: Any = AnyIso()


@dataclass
class Api:
    server: LiveServer
    http: httpx.AsyncClient

    async def flush(self) -> None:
        async with asyncio.timeout(15):
            await self.server.services.persistence.writes.flush()

    async def ok(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self.http.request(method, path, **kwargs)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["success"] is True
        return body


@contextlib.asynccontextmanager
async def serve(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Api]:
    app = create_app(settings, clock=clock)
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        yield Api(server, http)


def firestore_settings(host: str, project: str, **changes: object) -> Settings:
    # Writes wait in the queue until a test flushes them: what each test sees
    # before its flush is the memory overlay, deterministically, and what it
    # reads from Firestore after the flush is what the queue wrote.
    base = Settings(
        store="firestore",
        emulator_host=host,
        project=project,
        flush_linger=30.0,
        firestore_deadline=5.0,
    )
    return base.replace(**changes)


@pytest.fixture
async def api(firestore_emulator: str, firestore_project: str) -> AsyncIterator[Api]:
    async with serve(firestore_settings(firestore_emulator, firestore_project)) as running:
        yield running


@pytest.fixture
async def memory_api() -> AsyncIterator[Api]:
    async with serve(Settings(store="memory")) as running:
        yield running


async def stored(client: AsyncClient, collection: str, doc_id: str) -> dict[str, Any] | None:
    snapshot = await client.collection(collection).document(doc_id).get()
    return snapshot.to_dict() if snapshot.exists else None


async def stored_sessions(client: AsyncClient, user_id: str) -> dict[str, dict[str, Any]]:
    query = client.collection("sessions").where(filter=FieldFilter("userId", "==", user_id))
    return {s.id: s.to_dict() or {} for s in await query.get()}


def interruption(session_id: str, user_id: str) -> Interruption:
    return Interruption(
        session_id=session_id, user_id=user_id, at=T0, reason="barge-in", heard="Our", cut="rates"
    )


# -- the original's endpoints, against Firestore ------------------------------------


@pytest.mark.firestore
async def test_state_is_saved_merged_served_and_stored(
    api: Api, firestore_client: AsyncClient
) -> None:
    body = await api.ok(
        "POST",
        "/api/session/user_456/state",
        json={
            "language": "en",
            "conversationContext": {"topic": "home loans", "lastIntent": "eligibility_check"},
            "activeSessionId": "session_123",
            "isActive": False,  # server-owned: ignored
        },
    )
    assert body == {
        "success": True,
        "message": "User state saved successfully",
        "userId": "user_456",
    }
    await api.ok("POST", "/api/session/user_456/state", json={"language": "hi"})

    body = await api.ok("GET", "/api/session/user_456/state")
    assert body == {
        "success": True,
        "userId": "user_456",
        "state": {
            "language": "hi",
            "conversationContext": {"topic": "home loans", "lastIntent": "eligibility_check"},
            "activeSessionId": "session_123",
            "updatedAt": ANY_ISO,
            "isActive": True,
        },
    }

    await api.flush()
    doc = await stored(firestore_client, "user_states", "user_456")
    assert doc is not None
    assert doc["language"] == "hi"
    assert doc["conversationContext"] == {"topic": "home loans", "lastIntent": "eligibility_check"}
    assert doc["isActive"] is True
    assert isinstance(doc["updatedAt"], datetime)


@pytest.mark.firestore
async def test_history_keeps_the_last_100_messages_in_the_profile_and_in_firestore(
    api: Api, firestore_client: AsyncClient
) -> None:
    for i in range(105):
        role = "user" if i % 2 == 0 else "assistant"
        body = await api.ok(
            "POST", "/api/session/u1/history", json={"role": role, "content": f"m{i}"}
        )
        assert body == {
            "success": True,
            "message": "Message appended to history",
            "userId": "u1",
            "messageId": body["messageId"],
            "timestamp": ANY_ISO,
        }
    await api.ok(
        "POST",
        "/api/session/u1/history",
        json={"role": "system", "content": "m105", "sessionId": "s1"},
    )

    profile = (await api.ok("GET", "/api/session/u1/profile"))["profile"]
    assert set(profile) == {
        "userId",
        "conversationHistory",
        "preferences",
        "historyLength",
        "createdAt",
        "lastUpdated",
    }
    history = profile["conversationHistory"]
    assert profile["historyLength"] == len(history) == 100
    assert [m["content"] for m in history] == [f"m{i}" for i in range(6, 106)]
    assert set(history[0]) == {"id", "role", "content", "timestamp"}
    assert history[-1] == {
        "id": history[-1]["id"],
        "role": "system",
        "content": "m105",
        "timestamp": ANY_ISO,
        "sessionId": "s1",
    }
    assert profile["createdAt"] == ANY_ISO and profile["lastUpdated"] == ANY_ISO

    await api.flush()
    doc = await stored(firestore_client, "user_profiles", "u1")
    assert doc is not None
    assert doc["historyLength"] == len(doc["conversationHistory"]) == 100
    assert [m["content"] for m in doc["conversationHistory"]] == [f"m{i}" for i in range(6, 106)]
    assert doc["conversationHistory"][-1]["sessionId"] == "s1"


@pytest.mark.firestore
async def test_sessions_are_created_with_the_device_id_read_ended_and_stored(
    api: Api, firestore_client: AsyncClient
) -> None:
    body = await api.ok(
        "POST",
        "/api/session/create",
        json={
            "sessionId": "session_123",
            "userId": "user_456",
            "language": "en",
            "metadata": {"platform": "web"},
        },
        headers={"X-Device-ID": "device_789"},
    )
    assert {k: v for k, v in body.items() if k != "session"} == {
        "success": True,
        "message": "Session created/updated successfully",
        "sessionId": "session_123",
        "userId": "user_456",
    }
    # A second create merges metadata key by key and keeps the language.
    await api.ok(
        "POST",
        "/api/session/create",
        json={"sessionId": "session_123", "userId": "user_456", "metadata": {"app": "2.1"}},
    )

    session = (await api.ok("GET", "/api/session/session_123"))["session"]
    assert session == {
        "id": "session_123",
        "userId": "user_456",
        "language": "en",
        "metadata": {"platform": "web", "deviceId": "device_789", "app": "2.1"},
        "isActive": True,
        "status": "active",
        "createdAt": ANY_ISO,
        "lastActivity": ANY_ISO,
        "endedAt": None,
        "expireAt": ANY_ISO,
    }

    active = await api.ok("GET", "/api/session/user/user_456/active")
    assert active["userId"] == "user_456" and active["count"] == 1
    assert [s["id"] for s in active["sessions"]] == ["session_123"]
    assert set(active["sessions"][0]) == SESSION_KEYS

    body = await api.ok("PUT", "/api/session/session_123/end")
    assert body == {
        "success": True,
        "message": "Session ended successfully",
        "sessionId": "session_123",
    }
    session = (await api.ok("GET", "/api/session/session_123"))["session"]
    assert session["status"] == "ended" and session["isActive"] is False
    assert session["endedAt"] == ANY_ISO
    assert (await api.ok("GET", "/api/session/user/user_456/active"))["count"] == 0

    await api.flush()
    doc = await stored(firestore_client, "sessions", "session_123")
    assert doc is not None
    assert doc["userId"] == "user_456" and doc["language"] == "en"
    assert doc["metadata"] == {"platform": "web", "deviceId": "device_789", "app": "2.1"}
    assert doc["status"] == "ended" and doc["isActive"] is False
    retention = doc["expireAt"] - doc["lastActivity"]
    assert retention == timedelta(days=30)


@pytest.mark.firestore
async def test_a_session_of_another_user_is_a_conflict_and_stays_as_it_was(
    api: Api, firestore_client: AsyncClient
) -> None:
    await api.ok("POST", "/api/session/create", json={"sessionId": "s1", "userId": "alice"})
    await api.flush()
    response = await api.http.post(
        "/api/session/create", json={"sessionId": "s1", "userId": "mallory", "language": "xx"}
    )
    assert response.status_code == 409
    assert response.json() == {
        "success": False,
        "error": "session s1 belongs to another user",
        "code": "conflict",
    }
    response = await api.http.post(
        "/api/session/mallory/history", json={"role": "user", "content": "hi", "sessionId": "s1"}
    )
    assert response.status_code == 409
    await api.flush()
    doc = await stored(firestore_client, "sessions", "s1")
    assert doc is not None and doc["userId"] == "alice" and doc["language"] is None
    assert await stored(firestore_client, "user_profiles", "mallory") is None


@pytest.mark.firestore
async def test_refresh_clears_firestore_and_memory_pending_writes_included(
    api: Api, firestore_client: AsyncClient
) -> None:
    await api.ok("POST", "/api/session/u1/state", json={"language": "en"})
    await api.ok("POST", "/api/session/u1/history", json={"role": "user", "content": "hello"})
    await api.ok("POST", "/api/session/create", json={"sessionId": "sA", "userId": "u1"})
    await api.ok("POST", "/api/session/create", json={"sessionId": "keep", "userId": "u2"})
    await api.ok("POST", "/api/session/u2/state", json={"language": "hi"})
    await api.flush()
    # More writes that are still pending when the refresh comes in.
    await api.ok("POST", "/api/session/create", json={"sessionId": "sB", "userId": "u1"})
    await api.ok("POST", "/api/session/u1/history", json={"role": "assistant", "content": "hi"})
    await api.ok("PUT", "/api/session/u1/preferences", json={"voice": "slow"})
    stack = api.server.services.interruptions
    for session_id in ("sA", "sA", "sB"):
        stack.push(interruption(session_id, "u1"))
    stack.push(interruption("keep", "u2"))

    body = await api.ok("POST", "/api/session/refresh", json={"userId": "u1"})
    assert body == {
        "success": True,
        "message": "User data cleared successfully",
        "userId": "u1",
        "cleared": {"userState": True, "userProfile": True, "sessions": 2, "interruptions": 3},
    }

    for path in ("/api/session/u1/state", "/api/session/u1/profile", "/api/session/sA"):
        assert (await api.http.get(path)).status_code == 404
    listing = await api.ok("GET", "/api/session/user/u1/sessions")
    assert listing["sessions"] == [] and listing["count"] == 0
    assert stack.count("keep") == 1

    await api.flush()
    assert await stored(firestore_client, "user_states", "u1") is None
    assert await stored(firestore_client, "user_profiles", "u1") is None
    assert await stored_sessions(firestore_client, "u1") == {}
    assert set(await stored_sessions(firestore_client, "u2")) == {"keep"}
    assert await stored(firestore_client, "user_states", "u2") is not None

    again = await api.ok("POST", "/api/session/refresh", json={"userId": "u1"})
    assert again["cleared"] == {
        "userState": False,
        "userProfile": False,
        "sessions": 0,
        "interruptions": 0,
    }


@pytest.mark.firestore
async def test_deleting_a_session_clears_it_and_its_interruptions(
    api: Api, firestore_client: AsyncClient
) -> None:
    await api.ok("POST", "/api/session/create", json={"sessionId": "s1", "userId": "u1"})
    await api.ok("POST", "/api/session/create", json={"sessionId": "s2", "userId": "u1"})
    await api.flush()
    api.server.services.interruptions.push(interruption("s1", "u1"))
    api.server.services.interruptions.push(interruption("s1", "u1"))

    body = await api.ok("DELETE", "/api/session/s1")
    assert body == {
        "success": True,
        "message": "Session cleared successfully",
        "sessionId": "s1",
        "cleared": {"session": True, "interruptions": 2},
    }
    for method in ("GET", "DELETE"):
        response = await api.http.request(method, "/api/session/s1")
        assert response.status_code == 404
        assert response.json() == {
            "success": False,
            "error": "Session not found",
            "code": "not_found",
        }
    response = await api.http.put("/api/session/s1/end")
    assert response.status_code == 404

    await api.flush()
    assert set(await stored_sessions(firestore_client, "u1")) == {"s2"}


@pytest.mark.firestore
async def test_stats_count_what_firestore_holds_plus_the_live_interruptions(api: Api) -> None:
    for user in ("u1", "u2"):
        await api.ok("POST", f"/api/session/{user}/state", json={"language": "en"})
        await api.ok("POST", f"/api/session/{user}/history", json={"role": "user", "content": "x"})
    for session_id in ("s1", "s2", "s3"):
        await api.ok("POST", "/api/session/create", json={"sessionId": session_id, "userId": "u1"})
    await api.ok("PUT", "/api/session/s3/end")
    for _ in range(4):
        api.server.services.interruptions.push(interruption("s1", "u1"))
    await api.flush()

    stats = (await api.ok("GET", "/api/session/stats"))["stats"]
    assert {k: stats[k] for k in ("activeUsers", "activeSessions", "totalProfiles")} == {
        "activeUsers": 2,
        "activeSessions": 2,
        "totalProfiles": 2,
    }
    assert stats["totalInterruptions"] == 4
    assert stats["liveInterruptions"] == 4 and stats["persistedInterruptions"] == 0
    assert stats["source"] == "firestore" and stats["mode"] == "firestore"
    assert stats["pendingWrites"] == 0
    assert stats["modeSince"] == ANY_ISO


@pytest.mark.firestore
async def test_stats_count_logged_interruptions_once(
    firestore_emulator: str, firestore_project: str
) -> None:
    settings = firestore_settings(firestore_emulator, firestore_project, persist_interruptions=True)
    async with serve(settings) as api:
        svc = api.server.services
        for _ in range(3):
            item = interruption("s1", "u1")
            svc.interruptions.push(item)
            svc.persistence.record_interruption(item)
        before_flush = (await api.ok("GET", "/api/session/stats"))["stats"]
        await api.flush()
        after_flush = (await api.ok("GET", "/api/session/stats"))["stats"]
    assert before_flush["totalInterruptions"] == 3
    assert after_flush["totalInterruptions"] == 3
    assert after_flush["persistedInterruptions"] == 3


# -- additions ---------------------------------------------------------------------


@pytest.mark.firestore
async def test_recent_history_and_preferences(api: Api, firestore_client: AsyncClient) -> None:
    empty = await api.ok("GET", "/api/session/nobody/history")
    assert empty == {
        "success": True,
        "userId": "nobody",
        "count": 0,
        "historyLength": 0,
        "messages": [],
    }
    for i in range(5):
        await api.ok("POST", "/api/session/u1/history", json={"role": "user", "content": f"m{i}"})
    body = await api.ok("GET", "/api/session/u1/history", params={"limit": 2})
    assert body["count"] == 2 and body["historyLength"] == 5
    assert [m["content"] for m in body["messages"]] == ["m3", "m4"]
    assert (await api.ok("GET", "/api/session/u1/history"))["count"] == 5

    body = await api.ok(
        "PUT", "/api/session/u1/preferences", json={"language": "en", "voiceSpeed": 1.0}
    )
    assert body == {
        "success": True,
        "message": "Preferences saved successfully",
        "userId": "u1",
        "preferences": {"language": "en", "voiceSpeed": 1.0},
    }
    body = await api.ok("PUT", "/api/session/u1/preferences", json={"language": "hi"})
    assert body["preferences"] == {"language": "hi", "voiceSpeed": 1.0}
    profile = (await api.ok("GET", "/api/session/u1/profile"))["profile"]
    assert profile["preferences"] == {"language": "hi", "voiceSpeed": 1.0}

    await api.flush()
    doc = await stored(firestore_client, "user_profiles", "u1")
    assert doc is not None and doc["preferences"] == {"language": "hi", "voiceSpeed": 1.0}
    assert len(doc["conversationHistory"]) == 5


async def _sessions(api: Api, user: str, **params: Any) -> tuple[list[str], str | None]:
    body = await api.ok("GET", f"/api/session/user/{user}/sessions", params=params)
    assert body["count"] == len(body["sessions"])
    return [s["id"] for s in body["sessions"]], body["nextCursor"]


@pytest.mark.firestore
async def test_idle_sessions_are_abandoned_on_read_then_swept(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    clock = ManualClock(T0)
    settings = firestore_settings(firestore_emulator, firestore_project, session_idle_timeout=600)
    async with serve(settings, clock) as api:
        for i in range(5):
            await api.ok("POST", "/api/session/create", json={"sessionId": f"s{i}", "userId": "u"})
            clock.advance(60)
        await api.ok("PUT", "/api/session/s1/end")
        # Now T0+300; idle from T0+730 on are those older than T0+130: s0 and s2.
        clock.advance(430)
        await api.flush()

        session = (await api.ok("GET", "/api/session/s0"))["session"]
        assert session["status"] == "abandoned" and session["isActive"] is False
        assert await _sessions(api, "u", status="abandoned") == (["s2", "s0"], None)
        assert await _sessions(api, "u", status="active") == (["s4", "s3"], None)
        assert await _sessions(api, "u", status="ended") == (["s1"], None)
        active = await api.ok("GET", "/api/session/user/u/active")
        assert [s["id"] for s in active["sessions"]] == ["s4", "s3"]

        # Paging the abandoned ones, one at a time.
        page, cursor = await _sessions(api, "u", status="abandoned", limit=1)
        assert page == ["s2"] and cursor is not None
        assert await _sessions(api, "u", status="abandoned", limit=1, cursor=cursor) == (
            ["s0"],
            None,
        )

        # The sweep marks them in Firestore; what clients see does not change.
        assert await api.server.services.persistence.sweep_idle_sessions() == 2
        await api.flush()
        stored_docs = await stored_sessions(firestore_client, "u")
        assert {sid for sid, d in stored_docs.items() if d["status"] == "abandoned"} == {"s0", "s2"}
        assert await _sessions(api, "u", status="abandoned") == (["s2", "s0"], None)

        # A create re-activates an abandoned session.
        await api.ok("POST", "/api/session/create", json={"sessionId": "s0", "userId": "u"})
        assert (await api.ok("GET", "/api/session/s0"))["session"]["status"] == "active"


@pytest.mark.firestore
async def test_session_listing_pages_with_a_cursor(
    firestore_emulator: str, firestore_project: str
) -> None:
    clock = ManualClock(T0)
    async with serve(firestore_settings(firestore_emulator, firestore_project), clock) as api:
        for i in range(5):
            await api.ok("POST", "/api/session/create", json={"sessionId": f"s{i}", "userId": "u"})
            clock.advance(1)
        await api.flush()
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            page, cursor = await _sessions(api, "u", **params)
            seen += page
            pages += 1
            if cursor is None:
                break
    assert seen == ["s4", "s3", "s2", "s1", "s0"]
    assert pages == 3


# -- routing and description (memory store) --------------------------------------------


async def test_reserved_words_are_routes_never_session_ids(memory_api: Api) -> None:
    http = memory_api.http
    assert (await http.get("/api/session/stats")).json()["success"] is True
    for word in ("stats", "create", "refresh", "user"):
        for method, path in (
            ("GET", f"/api/session/{word}"),
            ("DELETE", f"/api/session/{word}"),
            ("PUT", f"/api/session/{word}/end"),
        ):
            if (method, word) == ("GET", "stats"):
                continue
            response = await http.request(method, path)
            assert response.status_code == 400, (method, path)
            assert response.json() == {
                "success": False,
                "error": f"sessionId must not be the reserved word {word!r}",
                "code": "invalid_field",
            }
        response = await http.post("/api/session/create", json={"sessionId": word, "userId": "u1"})
        assert response.status_code == 400
        assert "reserved word" in response.json()["error"]
    # A user id may be any of these words: the paths cannot collide.
    await memory_api.ok("POST", "/api/session/user/state", json={"a": 1})
    assert (await memory_api.ok("GET", "/api/session/user/state"))["state"]["a"] == 1


async def test_a_method_a_path_does_not_take_is_405_with_allow(memory_api: Api) -> None:
    response = await memory_api.http.patch("/api/session/u1/state")
    assert response.status_code == 405
    assert response.json() == {
        "success": False,
        "error": "Method not allowed",
        "code": "method_not_allowed",
    }
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    response = await memory_api.http.post("/api/session/stats")
    assert response.status_code == 405


async def test_memory_store_stats_say_memory(memory_api: Api) -> None:
    stats = (await memory_api.ok("GET", "/api/session/stats"))["stats"]
    assert stats["source"] == "memory"
    assert stats["backend"] == "memory"


async def test_openapi_describes_every_route_of_the_app(memory_api: Api) -> None:
    response = await memory_api.http.get("/openapi.json")
    assert response.status_code == 200
    served = response.json()
    assert served["openapi"].startswith("3.1")
    app = create_app(Settings(store="memory"))
    described: dict[str, Any] = served["paths"]
    for route in app.routes:
        if type(route) is not Route:
            continue
        assert route.path in described, route.path
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        assert methods <= set(described[route.path]), route.path
    routed = {r.path for r in app.routes if type(r) is Route}
    assert {p for p in described if p.startswith("/api/")} <= routed
    assert served == document()


def test_stored_values_of_other_writers_render_as_plain_json() -> None:
    value = {"at": T0, "n": float("nan"), "raw": b"\x00\x01", "ref": object, "list": (1, 2.5)}
    assert jsonable(value) == {
        "at": "2025-01-10T17:00:00.000Z",
        "n": None,
        "raw": "AAE=",
        "ref": str(object),
        "list": [1, 2.5],
    }


async def test_a_state_read_again_after_each_save_shows_that_save(memory_api: Api) -> None:
    # GET state serves a view encoded once per state: each save makes a new one.
    path = "/api/session/reread/state"
    for step in range(3):
        await memory_api.ok("POST", path, json={"step": step, "topic": f"t{step}"})
        for _ in range(2):
            body = await memory_api.ok("GET", path)
            assert body["state"] == {
                "step": step,
                "topic": f"t{step}",
                "updatedAt": ANY_ISO,
                "isActive": True,
            }
