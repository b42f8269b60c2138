"""Erasure reaches the live side too: a refresh made over REST while a device is
connected leaves nothing for a resume to replay."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.applications import Starlette

from samvad.client import SamvadClient
from samvad.config import Settings
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
