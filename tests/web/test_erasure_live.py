"""Erasure reaches the live side too: deleting a session or refreshing a user over
REST closes the devices attached (4410), cancels the reply in flight and leaves
nothing for a resume to replay; the id is then free, and empty. And one
ownership rule: a live session of another user is refused with ``conflict``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from samvad.client import SamvadClient, ServerError
from samvad.config import Settings
from samvad.models import SessionStatus
from samvad.responder import EchoResponder
from samvad.web.app import create_app
from tests.support.server import LiveServer, live_server


def make_app() -> Starlette:
    return create_app(Settings(store="memory", ws_reply_chunk_delay=0.0))


async def open_client(server: LiveServer, user_id: str, **options: Any) -> SamvadClient:
    options.setdefault("heartbeat", None)
    return await SamvadClient.connect(f"{server.ws_url}/ws", user_id=user_id, **options)


def replayed(client: SamvadClient) -> list[str]:
    started = client.started
    assert started is not None and started.resume is not None
    return [m["content"] for m in started.resume.get("messages", [])]


async def test_refresh_clears_what_a_live_session_would_replay() -> None:
    async with live_server(make_app()) as server, httpx.AsyncClient(base_url=server.url) as http:
        phone = await open_client(server, "u1", session_id="s1")
        await phone.ask("my account number is 1234")
        response = await http.post("/api/session/refresh", json={"userId": "u1"})
        assert response.status_code == 200
        desktop = await open_client(server, "u1", session_id="s1", resume_from=0)
        assert "my account number is 1234" not in replayed(desktop)
        assert all("1234" not in text for text in replayed(desktop))
        await desktop.close()
        await phone.close()


class Gate:
    """A responder sleep that holds every chunk after the first until ``open``."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await self.opened.wait()


async def closed_code(client: SamvadClient) -> int | None:
    """Read until the server closes; the close code it sent."""
    async with asyncio.timeout(10):
        try:
            while True:
                await client.connection.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


async def frames_until_pong(client: SamvadClient) -> list[dict[str, Any]]:
    """Every frame ``client`` receives up to the answer of a ping (a round trip)."""
    await client.ping("probe")
    seen: list[dict[str, Any]] = []
    while True:
        frame = await client.recv(within=5)
        if frame["type"] == "pong" and frame["ts"] == "probe":
            return seen
        seen.append(frame)


async def test_deleting_a_live_session_closes_its_devices_and_frees_the_id() -> None:
    async with live_server(make_app()) as server, httpx.AsyncClient(base_url=server.url) as http:
        phone = await open_client(server, "victim", session_id="s-del")
        tablet = await open_client(server, "victim", session_id="s-del")
        await phone.ask("my pin is 4321")
        response = await http.delete("/api/session/s-del")
        assert response.status_code == 200
        assert await closed_code(phone) == 4410
        assert await closed_code(tablet) == 4410
        thief = await open_client(server, "thief", session_id="s-del", resume_from=0)
        assert thief.started is not None
        assert (thief.started.last_seq, thief.started.history) == (0, [])
        assert thief.started.resume == {
            "type": "resume",
            "recovered": True,
            "lastSeq": 0,
            "messages": [],
            "inFlight": None,
        }
        exchange = await thief.ask("anything here?")
        assert exchange.ack["seq"] == 1
        await thief.close()
        victim = await server.services.persistence.get_profile("victim")
        assert victim is not None
        assert all(m.content != "anything here?" for m in victim.history)
        session = await server.services.persistence.get_session("s-del")
        assert session is not None and session.user_id == "thief"


async def test_the_owner_reusing_a_deleted_session_id_gets_an_empty_session() -> None:
    async with live_server(make_app()) as server, httpx.AsyncClient(base_url=server.url) as http:
        phone = await open_client(server, "u-again", session_id="s-again")
        await phone.ask("first life")
        assert (await http.delete("/api/session/s-again")).status_code == 200
        assert await closed_code(phone) == 4410
        again = await open_client(server, "u-again", session_id="s-again", resume_from=0)
        assert again.started is not None
        # The history keeps the messages (a delete erases the session, not the
        # history), but they are not the new session's: nothing to replay.
        assert again.started.history[0]["content"] == "first life"
        assert again.started.last_seq == 0
        assert replayed(again) == []
        assert (await again.ask("second life")).ack["seq"] == 1
        await again.close()


async def test_refresh_cancels_the_reply_in_flight_and_stores_nothing_of_it() -> None:
    gate = Gate()
    async with live_server(make_app()) as server, httpx.AsyncClient(base_url=server.url) as http:
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        phone = await open_client(server, "u-cut", session_id="s-cut")
        await phone.message("a long answer please")
        await phone.wait_for("reply.chunk")
        response = await http.post("/api/session/refresh", json={"userId": "u-cut"})
        assert response.status_code == 200
        assert await closed_code(phone) == 4410
        gate.opened.set()
        # A round trip on a new connection: the hub has let go of the old one.
        other = await open_client(server, "u-other")
        await other.ping()
        await other.wait_for("pong")
        await other.close()
        assert server.services.hub.engine.owner("s-cut") is None
        assert await server.services.persistence.get_profile("u-cut") is None
        assert server.services.interruptions.count("s-cut") == 0


async def test_rest_end_ends_the_live_session_like_the_end_frame() -> None:
    async with live_server(make_app()) as server, httpx.AsyncClient(base_url=server.url) as http:
        phone = await open_client(server, "u-end", session_id="s-end")
        await phone.ask("hello")
        response = await http.put("/api/session/s-end/end")
        assert response.status_code == 200
        ended = await phone.wait_for("ended")
        assert ended["sessionId"] == "s-end"
        assert await closed_code(phone) == 1000
        session = await server.services.persistence.get_session("s-end")
        assert session is not None and session.status is SessionStatus.ENDED


async def test_a_live_session_of_another_user_is_refused_and_leaks_nothing() -> None:
    async with live_server(make_app()) as server:
        victim = await open_client(server, "victim", session_id="s-live")
        await victim.ask("private words")
        for resume in (None, 0):
            with pytest.raises(ServerError, match="conflict"):
                await open_client(server, "thief", session_id="s-live", resume_from=resume)
        async with connect(f"{server.ws_url}/ws") as ws:
            await ws.send(json.dumps({"type": "start", "userId": "thief", "sessionId": "s-live"}))
            refused = json.loads(await ws.recv())
            assert refused["type"] == "error" and refused["code"] == "conflict"
            # The connection stays usable for a session of its own.
            await ws.send(json.dumps({"type": "start", "userId": "thief", "sessionId": "s-own"}))
            started = json.loads(await ws.recv())
            assert (started["type"], started["history"]) == ("started", [])
        # The victim saw nothing of the attempts, and its session goes on.
        assert await frames_until_pong(victim) == []
        assert (await victim.ask("still mine")).ack["seq"] == 3
        await victim.close()
        thief = await server.services.persistence.get_profile("thief")
        assert thief is None or all("private" not in m.content for m in thief.history)
