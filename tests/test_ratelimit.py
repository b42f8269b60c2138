"""Rate limits: the per-key token buckets (on a manual clock), refresh and
session deletion per user over REST (429 with ``Retry-After``), and the
configurable WebSocket message rate."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.errors import RateLimited, Unauthorized
from samvad.ratelimit import RateLimiter, RateLimits
from samvad.web.app import create_app
from tests.support.metrics import scrape
from tests.support.server import live_server

KEY = "ratelimit-service-key-0123456789"


# -- the limiter ------------------------------------------------------------------------------


def test_a_key_gets_its_burst_then_waits_for_the_refill() -> None:
    clock = ManualClock()
    limiter = RateLimiter("refresh", per_minute=3, clock=clock.monotonic)
    for _ in range(3):
        limiter.hit("u1")
    with pytest.raises(RateLimited) as caught:
        limiter.hit("u1")
    assert caught.value.retry_after == pytest.approx(20.0)
    assert "refresh" in caught.value.message
    clock.advance(19.0)
    assert limiter.take("u1") == pytest.approx(1.0)
    clock.advance(1.0)
    limiter.hit("u1")
    with pytest.raises(RateLimited):
        limiter.hit("u1")


def test_keys_are_limited_independently() -> None:
    clock = ManualClock()
    limiter = RateLimiter("delete", per_minute=1, clock=clock.monotonic)
    limiter.hit("u1")
    limiter.hit("u2")
    with pytest.raises(RateLimited):
        limiter.hit("u1")


def test_an_idle_minute_refills_the_whole_burst() -> None:
    clock = ManualClock()
    limiter = RateLimiter("refresh", per_minute=5, clock=clock.monotonic)
    for _ in range(5):
        limiter.hit("u1")
    clock.advance(600.0)
    for _ in range(5):
        limiter.hit("u1")
    assert limiter.take("u1") is not None


def test_memory_is_bounded_least_recently_used_out() -> None:
    clock = ManualClock()
    limiter = RateLimiter("refresh", per_minute=1, clock=clock.monotonic, max_keys=2)
    limiter.hit("a")
    limiter.hit("b")
    limiter.hit("c")  # evicts "a", the least recently used
    assert len(limiter) == 2
    assert limiter.take("b") is not None, "b is still limited"
    assert limiter.take("a") is None, "a was forgotten: a fresh bucket"


def test_limits_come_from_the_settings() -> None:
    clock = ManualClock()
    settings = Settings.from_env(
        {"SAMVAD_REFRESH_RATE_PER_MINUTE": "2", "SAMVAD_DELETE_RATE_PER_MINUTE": "1"}
    )
    limits = RateLimits.from_settings(settings, clock.monotonic)
    limits.refresh.hit("u1")
    limits.refresh.hit("u1")
    with pytest.raises(RateLimited):
        limits.refresh.hit("u1")
    limits.delete.hit("u1")
    with pytest.raises(RateLimited):
        limits.delete.hit("u1")


# -- REST ---------------------------------------------------------------------------------------


async def test_refresh_beyond_the_limit_is_429_with_retry_after() -> None:
    settings = Settings(store="memory", refresh_rate_per_minute=2)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        for _ in range(2):
            ok = await http.post("/api/session/refresh", json={"userId": "u1"})
            assert ok.status_code == 200
        limited = await http.post("/api/session/refresh", json={"userId": "u1"})
        other = await http.post("/api/session/refresh", json={"userId": "u2"})
        metrics = await scrape(http)
    assert limited.status_code == 429
    assert limited.json()["success"] is False
    assert 1 <= int(limited.headers["retry-after"]) <= 30
    assert other.status_code == 200, "another user has their own limit"
    assert metrics.value("samvad_rate_limited_total", limit="refresh") == 1


async def test_session_deletion_beyond_the_limit_is_429_per_user() -> None:
    settings = Settings(store="memory", delete_rate_per_minute=1)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        for session_id, user_id in (("s1", "u1"), ("s2", "u1"), ("s3", "u2")):
            await http.post(
                "/api/session/create", json={"sessionId": session_id, "userId": user_id}
            )
        assert (await http.delete("/api/session/s1")).status_code == 200
        limited = await http.delete("/api/session/s2")
        assert (await http.delete("/api/session/s3")).status_code == 200
        still_there = await http.get("/api/session/s2")
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) == 60
    assert still_there.status_code == 200, "a refused delete deletes nothing"


async def test_with_auth_on_users_and_the_service_share_a_users_limit() -> None:
    async def verify(token: str) -> str:
        if token.startswith("good-"):
            return token.removeprefix("good-")
        raise Unauthorized("The ID token is not valid.")

    settings = Settings(
        store="memory",
        auth="firebase",
        auth_project="demo-p",
        api_keys=(KEY,),
        refresh_rate_per_minute=2,
    )
    async with (
        live_server(create_app(settings, verify_token=verify)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):

        async def refresh(user_id: str, headers: dict[str, str]) -> int:
            response = await http.post(
                "/api/session/refresh", json={"userId": user_id}, headers=headers
            )
            return response.status_code

        alice = {"Authorization": "Bearer good-alice"}
        service = {"X-API-Key": KEY}
        statuses = [
            await refresh("alice", alice),
            await refresh("alice", service),
            await refresh("alice", alice),
            await refresh("alice", service),
            await refresh("bob", service),
            # Refused before it counts: another user's data.
            await refresh("bob", alice),
        ]
    assert statuses == [200, 200, 429, 429, 200, 403]


# -- WebSocket ------------------------------------------------------------------------------------


async def test_the_websocket_message_rate_is_configurable_and_counted() -> None:
    settings = Settings.from_env(
        {
            "SAMVAD_STORE": "memory",
            "SAMVAD_WS_RATE_PER_SECOND": "0.01",
            "SAMVAD_WS_RATE_BURST": "3",
            "SAMVAD_WS_RATE_STRIKES": "2",
        }
    )
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        connect(f"{server.ws_url}/ws") as ws,
    ):
        await ws.send(json.dumps({"type": "start", "userId": "u-flood"}))
        started: dict[str, Any] = json.loads(await ws.recv())
        assert started["limits"]["ratePerSecond"] == 0.01
        assert started["limits"]["rateBurst"] == 3
        answers: list[dict[str, Any]] = []
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):
                await ws.send(json.dumps({"type": "ping"}))
                answers.append(json.loads(await ws.recv()))
        metrics = await scrape(http)
    assert [a["type"] for a in answers[:2]] == ["pong", "pong"]
    assert {a.get("code") for a in answers[2:]} == {"rate_limited"}
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    # Two refused frames, then the one that closes the connection.
    assert metrics.value("samvad_rate_limited_total", limit="websocket") == 3
    assert metrics.value("samvad_websocket_frames_received_total", type="rejected") == 2
    assert metrics.value("samvad_websocket_frames_received_total", type="refused") == 1
