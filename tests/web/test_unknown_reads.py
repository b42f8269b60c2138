"""Reads never claim an absence they cannot know (issue 10, item 6).

A server restarted while Firestore is cut holds none of an existing user's
data: it must answer ``503`` with ``Retry-After`` (never ``404``) on every REST
read, and on the writes whose answer needs a read; the WebSocket ``start``
goes on in memory and says ``historyIncomplete``. With Firestore back, the
same requests answer the data, and a user who truly has none gets ``404``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets

from samvad.models import Mode
from samvad.web.app import create_app
from tests.support.faultproxy import FaultProxy
from tests.support.server import LiveServer, live_server, outage_settings

pytestmark = pytest.mark.firestore

#: Every request that depends on data of u1 or s1 (each must be 503 during the cut).
NEEDS_A_READ: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/session/u1/state", None),
    ("GET", "/api/session/u1/profile", None),
    ("GET", "/api/session/u1/history", None),
    ("PUT", "/api/session/u1/preferences", {"speed": "fast"}),
    ("GET", "/api/session/s1", None),
    ("PUT", "/api/session/s1/end", None),
    ("DELETE", "/api/session/s1", None),
    ("GET", "/api/session/user/u1/active", None),
    ("GET", "/api/session/user/u1/sessions", None),
]


async def _drained(server: LiveServer) -> None:
    async with asyncio.timeout(30):
        await server.services.persistence.writes.flush()
        await server.services.persistence.settle()


async def _started(server: LiveServer, user_id: str, session_id: str | None) -> dict[str, Any]:
    """The raw ``started`` (or ``error``) frame of a ``start`` on a new connection."""
    start: dict[str, Any] = {"type": "start", "userId": user_id}
    if session_id is not None:
        start["sessionId"] = session_id
    async with websockets.connect(f"{server.ws_url}/ws") as ws:
        await ws.send(json.dumps(start))
        async with asyncio.timeout(10):
            while True:
                frame: dict[str, Any] = json.loads(await ws.recv())
                if frame["type"] in ("started", "error"):
                    return frame


async def test_a_server_restarted_during_an_outage_answers_503_not_404_until_firestore_is_back(
    fault_proxy: FaultProxy, firestore_project: str
) -> None:
    # A cut fails at once; the longer deadline keeps a busy emulator from
    # passing for an outage while Firestore is up.
    settings = outage_settings(fault_proxy.host_port, firestore_project, firestore_deadline=5.0)
    async with live_server(create_app(settings)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            assert (await http.post("/api/session/u1/state", json={"mood": "calm"})).is_success
            created = await http.post(
                "/api/session/create", json={"sessionId": "s1", "userId": "u1"}
            )
            assert created.is_success
            appended = await http.post(
                "/api/session/u1/history",
                json={"role": "user", "content": "namaste", "sessionId": "s1"},
            )
            assert appended.is_success
            assert (
                await http.put("/api/session/u1/preferences", json={"voice": "calm"})
            ).is_success
            # Firestore up, nothing of this user: the original's 404, as before.
            absent = await http.get("/api/session/stranger/profile")
            assert absent.status_code == 404
            assert absent.json() == {
                "success": False,
                "error": "User profile not found",
                "code": "not_found",
            }
            assert (await http.get("/api/session/nope")).status_code == 404
            assert (await _started(server, "u1", "s-normal"))["historyIncomplete"] is False
        await _drained(server)

    fault_proxy.cut()
    async with live_server(create_app(settings)) as server:
        persistence = server.services.persistence
        assert persistence.mode is Mode.MEMORY
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            for method, path, body in NEEDS_A_READ:
                response = await http.request(method, path, json=body)
                assert response.status_code == 503, (method, path, response.text)
                assert response.json() == {
                    "success": False,
                    "error": "Firestore cannot be reached right now, so this cannot be read; "
                    "try again shortly.",
                    "code": "data_unavailable",
                }, (method, path)
                retry_after = int(response.headers["Retry-After"])
                assert 1 <= retry_after <= 1 + settings.probe_max_interval, (method, path)
            # A user nobody ever wrote is not "not found" either: nobody can know.
            assert (await http.get("/api/session/stranger/state")).status_code == 503
            # Writes that need no read go on in memory, as always.
            assert (await http.post("/api/session/u1/state", json={"step": 2})).is_success
            assert (await http.get("/api/session/u1/state")).status_code == 503
            stats = (await http.get("/api/session/stats")).json()["stats"]
            assert stats["source"] == "memory"  # marked as memory's figures

            # A session id the server draws itself is nobody's: it starts in memory.
            started = await _started(server, "u1", None)
            assert started["type"] == "started", started
            assert started["historyIncomplete"] is True
            assert started["mode"] == "memory"
            # A client's id this instance has not seen counts as new, on both
            # doors; u1's s1 is such an id. Taking it goes on in memory, but
            # the replay must not hand u1's session to the intruder.
            assert (await _started(server, "intruder", "s1"))["type"] == "started"
            taken = await http.post(
                "/api/session/create",
                json={"sessionId": "s1", "userId": "intruder", "metadata": {"x": 1}},
            )
            assert taken.status_code == 200, taken.text
            assert (await _started(server, "u1", "s-outage"))["type"] == "started"

            fault_proxy.restore()
            async with asyncio.timeout(30):
                await persistence.writes.reachable()
            await _drained(server)  # the intruder's writes meet u1's stored session

            state = await http.get("/api/session/u1/state")
            assert state.status_code == 200, state.text
            assert state.json()["state"]["mood"] == "calm"
            assert state.json()["state"]["step"] == 2
            profile = (await http.get("/api/session/u1/profile")).json()["profile"]
            assert [m["content"] for m in profile["conversationHistory"]] == ["namaste"]
            assert profile["preferences"] == {"voice": "calm"}
            session = (await http.get("/api/session/s1")).json()["session"]
            assert session["userId"] == "u1"
            assert "x" not in session.get("metadata", {})
            assert (await _started(server, "intruder", "s1"))["code"] == "conflict"
            assert persistence.writes.status().writes_set_aside >= 1
            active = (await http.get("/api/session/user/u1/active")).json()
            assert "s1" in [s["id"] for s in active["sessions"]]
            assert (await http.get("/api/session/stranger/state")).status_code == 404
            assert (await _started(server, "u1", "s-after"))["historyIncomplete"] is False
