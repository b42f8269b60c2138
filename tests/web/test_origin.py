"""The Origin check on ``/ws``: browser pages of other origins are refused with
403 before the WebSocket is accepted; listed origins, the server's own origin and
clients without an ``Origin`` header get through. Real handshakes on a live server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from samvad.config import Settings
from samvad.web.app import create_app
from samvad.web.middleware import WebSocketOriginMiddleware
from tests.support.metrics import scrape
from tests.support.server import LiveServer, live_server

LISTED_CORS = "https://app.example.com"
LISTED_WS = "https://voice.example.org:8443"


@pytest.fixture
async def server() -> AsyncIterator[LiveServer]:
    settings = Settings(
        store="memory",
        ws_reply_chunk_delay=0.0,
        cors_origins=(LISTED_CORS,),
        ws_origins=(LISTED_WS,),
    )
    async with live_server(create_app(settings)) as running:
        yield running


async def _start(server: LiveServer, *, host: str = "127.0.0.1", **options: Any) -> dict[str, Any]:
    """Open ``/ws`` as ``host`` (the Host header) with ``options``; the ``started`` frame."""
    url = f"ws://{host}:{server.port}/ws"
    # The TCP connection always goes to 127.0.0.1; only the Host header varies.
    async with connect(url, open_timeout=10, host="127.0.0.1", port=server.port, **options) as ws:
        await ws.send(json.dumps({"type": "start", "userId": "origin-user"}))
        frame: dict[str, Any] = json.loads(await ws.recv())
        return frame


async def _refused(server: LiveServer, **options: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as refused:
        await _start(server, **options)
    return refused.value


async def test_a_client_without_origin_keeps_working(server: LiveServer) -> None:
    assert (await _start(server))["type"] == "started"


async def test_the_servers_own_origin_is_allowed(server: LiveServer) -> None:
    frame = await _start(server, origin=f"http://127.0.0.1:{server.port}")
    assert frame["type"] == "started"


@pytest.mark.parametrize("origin", [LISTED_CORS, LISTED_WS, "HTTPS://App.Example.com"])
async def test_listed_origins_are_allowed(server: LiveServer, origin: str) -> None:
    assert (await _start(server, origin=origin))["type"] == "started"


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.net",
        "null",
        # Look-alikes of allowed origins: prefix, suffix, scheme and port tricks.
        "https://app.example.com.evil.net",
        "http://app.example.com",
        "https://app.example.com:444",
        "https://voice.example.org",
        "http://127.0.0.1",
        "ws://127.0.0.1",
    ],
)
async def test_other_origins_are_refused_with_403_before_accept(
    server: LiveServer, origin: str
) -> None:
    refused = await _refused(server, origin=origin)
    assert refused.response.status_code == 403
    # Nothing was accepted: no WebSocket was ever opened.
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await scrape(http)).total("samvad_websocket_connections_opened_total") == 0


async def test_the_same_host_rule_uses_the_host_the_handshake_went_to(server: LiveServer) -> None:
    # A page on another port of the same machine is another origin.
    refused = await _refused(server, origin=f"http://127.0.0.1:{server.port + 1}")
    assert refused.response.status_code == 403
    allowed = await _start(server, host="localhost", origin=f"http://localhost:{server.port}")
    assert allowed["type"] == "started"


async def test_the_same_host_rule_compares_with_the_host_header(server: LiveServer) -> None:
    refused = await _refused(server, origin=f"http://localhost:{server.port}")
    assert refused.response.status_code == 403


async def test_a_wildcard_allows_every_origin() -> None:
    settings = Settings(store="memory", ws_origins=("*",))
    async with live_server(create_app(settings)) as server:
        assert (await _start(server, origin="https://anywhere.example"))["type"] == "started"


async def test_rest_requests_are_not_affected(server: LiveServer) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{server.url}/healthz", headers={"Origin": "https://evil.example.net"}
        )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://localhost:8080", "localhost:8080", True),
        ("http://localhost:8080/", "LOCALHOST:8080", True),
        ("https://localhost:8080", "localhost:8080", True),
        ("http://localhost:8080", None, False),
        ("http://localhost:8081", "localhost:8080", False),
        ("http://localhost", "localhost:8080", False),
        ("file://", "localhost:8080", False),
        ("", "localhost:8080", False),
        ("localhost:8080", "localhost:8080", False),
    ],
)
def test_allows(origin: str, host: str | None, allowed: bool) -> None:
    check = WebSocketOriginMiddleware(lambda scope, receive, send: None, allowed_origins=())  # type: ignore[arg-type,return-value]
    assert check.allows(origin, host) is allowed
