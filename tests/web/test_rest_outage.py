"""The API with Firestore cut off: every endpoint keeps answering from memory
(or 503 where memory cannot know: tests/web/test_unknown_reads.py), and what
was written during the outage reaches Firestore once it is back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from google.cloud.firestore import AsyncClient
from google.cloud.firestore_v1.base_query import FieldFilter

from samvad.models import Mode
from samvad.web.app import create_app
from tests.support.faultproxy import FaultProxy
from tests.support.server import LiveServer, live_server, outage_settings

pytestmark = pytest.mark.firestore

#: Every answer must come within this, Firestore or not. It catches waiting on
#: the client library's own retries (40-50 s for a write, minutes for a read,
#: with Firestore gone), not speed: the 0.5 s deadline of outage_settings is
#: the most any answer may wait, and a loaded CI machine needs a wide margin.
ANSWER_WITHIN = 10.0


async def _flush(server: LiveServer) -> None:
    async with asyncio.timeout(30):
        await server.services.persistence.writes.flush()
        # Views that writes warm in the background are loaded too: a cut
        # right after must meet the next write, not a late warm-up read.
        await server.services.persistence.settle()


class Client:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def request(
        self, method: str, path: str, *, status: int = 200, **kwargs: Any
    ) -> dict[str, Any]:
        started = time.monotonic()
        response = await self.http.request(method, path, **kwargs)
        assert time.monotonic() - started < ANSWER_WITHIN, f"{method} {path} was slow"
        assert response.status_code == status, (method, path, response.text)
        body: dict[str, Any] = response.json()
        return body


async def _doc(client: AsyncClient, collection: str, doc_id: str) -> dict[str, Any] | None:
    snapshot = await client.collection(collection).document(doc_id).get()
    return snapshot.to_dict() if snapshot.exists else None


async def test_the_api_answers_from_memory_during_an_outage_and_catches_up(
    fault_proxy: FaultProxy, firestore_project: str, firestore_client: AsyncClient
) -> None:
    settings = outage_settings(fault_proxy.host_port, firestore_project)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        api = Client(http)
        persistence = server.services.persistence
        # Before the outage: a user who will be refreshed during it.
        await api.request("POST", "/api/session/gone/state", json={"language": "en"})
        await api.request("POST", "/api/session/create", json={"sessionId": "g1", "userId": "gone"})
        await _flush(server)
        await api.request("GET", "/api/session/gone/state")  # now in this server's memory

        fault_proxy.cut()
        # A cache miss finds Firestore gone (within its deadline): memory mode,
        # and no answer about a user this server does not hold.
        await api.request("GET", "/api/session/stranger/state", status=503)
        assert persistence.mode is Mode.MEMORY

        await api.request("POST", "/api/session/u1/state", json={"language": "hi", "step": 2})
        for i in range(3):
            await api.request(
                "POST",
                "/api/session/u1/history",
                json={"role": "user", "content": f"m{i}", "sessionId": "s1"},
            )
        # Its answer is the merged preferences, which memory does not hold.
        await api.request("PUT", "/api/session/u1/preferences", json={"voice": "slow"}, status=503)
        await api.request(
            "POST",
            "/api/session/create",
            json={"sessionId": "s1", "userId": "u1", "language": "hi"},
            headers={"X-Device-ID": "phone-1"},
        )
        await api.request("POST", "/api/session/create", json={"sessionId": "s2", "userId": "u1"})
        await api.request("PUT", "/api/session/s2/end")
        await api.request("POST", "/api/session/create", json={"sessionId": "s3", "userId": "u1"})
        await api.request("DELETE", "/api/session/s3")
        cleared = await api.request("POST", "/api/session/refresh", json={"userId": "gone"})
        assert cleared["cleared"]["userState"] is True
        assert cleared["cleared"]["sessions"] == 1

        # u1's state and history were not in memory before the cut: what
        # memory holds of them is only part, so it is not served as the whole.
        await api.request("GET", "/api/session/u1/state", status=503)
        await api.request("GET", "/api/session/u1/profile", status=503)
        await api.request("GET", "/api/session/u1/history", params={"limit": 2}, status=503)
        await api.request("GET", "/api/session/user/u1/active", status=503)
        # A session created during the outage is known whole.
        session = await api.request("GET", "/api/session/s1")
        assert session["session"]["metadata"] == {"deviceId": "phone-1"}
        await api.request("GET", "/api/session/s3", status=404)
        await api.request("GET", "/api/session/gone/state", status=404)
        stats = (await api.request("GET", "/api/session/stats"))["stats"]
        assert stats["mode"] == "memory" and stats["source"] == "memory"
        assert stats["pendingWrites"] > 0
        await api.request("GET", "/openapi.json")

        # Firestore comes back: the prober notices and the backlog is replayed.
        fault_proxy.restore()
        await _flush(server)
        assert persistence.mode is Mode.FIRESTORE
        stats = (await api.request("GET", "/api/session/stats"))["stats"]
        assert stats["mode"] == "firestore" and stats["source"] == "firestore"
        assert stats["pendingWrites"] == 0
        state = await api.request("GET", "/api/session/u1/state")
        assert state["state"]["language"] == "hi" and state["state"]["step"] == 2
        recent = await api.request("GET", "/api/session/u1/history", params={"limit": 2})
        assert [m["content"] for m in recent["messages"]] == ["m1", "m2"]
        active = await api.request("GET", "/api/session/user/u1/active")
        assert [s["id"] for s in active["sessions"]] == ["s1"]
        ended = await api.request(
            "GET", "/api/session/user/u1/sessions", params={"status": "ended"}
        )
        assert [s["id"] for s in ended["sessions"]] == ["s2"]

    state_doc = await _doc(firestore_client, "user_states", "u1")
    assert state_doc is not None and state_doc["language"] == "hi" and state_doc["step"] == 2
    profile_doc = await _doc(firestore_client, "user_profiles", "u1")
    assert profile_doc is not None
    assert [m["content"] for m in profile_doc["conversationHistory"]] == ["m0", "m1", "m2"]
    assert profile_doc.get("preferences", {}) == {}
    s1 = await _doc(firestore_client, "sessions", "s1")
    assert s1 is not None and s1["status"] == "active" and s1["metadata"] == {"deviceId": "phone-1"}
    s2 = await _doc(firestore_client, "sessions", "s2")
    assert s2 is not None and s2["status"] == "ended"
    assert await _doc(firestore_client, "sessions", "s3") is None
    assert await _doc(firestore_client, "user_states", "gone") is None
    gone_sessions = (
        await firestore_client.collection("sessions")
        .where(filter=FieldFilter("userId", "==", "gone"))
        .get()
    )
    assert gone_sessions == []
