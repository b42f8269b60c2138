"""Operations: liveness and readiness, CORS for browser clients, request ids,
and structured logs that carry ids but never conversation content."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from samvad.client import SamvadClient
from samvad.config import Settings
from samvad.logs import ContextFilter, JsonFormatter, bind_log_context, request_id_var
from samvad.models import Mode
from samvad.web.app import create_app
from tests.support.faultproxy import FaultProxy
from tests.support.serve import start_serve
from tests.support.server import live_server, outage_settings

ORIGIN = "https://app.example"

# -- health and readiness -------------------------------------------------------------------


async def test_healthz_is_alive_and_readyz_is_ready_with_the_mode() -> None:
    async with (
        live_server(create_app(Settings(store="memory"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "mode": "memory"}


async def test_readyz_is_503_before_start_up_and_after_shutdown() -> None:
    app = create_app(Settings(store="memory"))
    # ASGITransport runs no lifespan: the app has not started.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as http:
        before = await http.get("/readyz")
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        during = await http.get("/readyz")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as http:
        after = await http.get("/readyz")
    assert (before.status_code, before.json()) == (503, {"ready": False})
    assert during.status_code == 200
    assert (after.status_code, after.json()) == (503, {"ready": False})


@pytest.mark.firestore
async def test_memory_only_mode_is_still_ready(
    fault_proxy: FaultProxy, firestore_project: str
) -> None:
    settings = outage_settings(fault_proxy.host_port, firestore_project)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        assert (await http.get("/readyz")).json()["ready"] is True
        fault_proxy.cut()
        await http.get("/api/session/someone/state")  # a cache miss meets the outage
        assert server.services.persistence.mode is Mode.MEMORY
        ready = await http.get("/readyz")
        fault_proxy.restore()
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "mode": "memory"}


# -- CORS -----------------------------------------------------------------------------------


def _preflight(origin: str, headers: str = "authorization,content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers,
    }


async def test_cors_preflight_allows_configured_origins_only() -> None:
    app = create_app(Settings(store="memory", cors_origins=(ORIGIN,)))
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        path = "/api/session/u1/state"
        allowed = await http.options(path, headers=_preflight(ORIGIN))
        disallowed = await http.options(path, headers=_preflight("https://evil.example"))
        service_key = await http.options(path, headers=_preflight(ORIGIN, "x-api-key"))
        simple = await http.get(path, headers={"Origin": ORIGIN})
        foreign = await http.get(path, headers={"Origin": "https://evil.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert len(allowed.headers["x-request-id"]) == 32, "a preflight is a request too"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    assert disallowed.status_code == 400
    assert "access-control-allow-origin" not in disallowed.headers
    assert service_key.status_code == 400, "service keys are not for browsers"
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in foreign.headers


async def test_no_origin_is_allowed_by_default() -> None:
    async with (
        live_server(create_app(Settings(store="memory"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        preflight = await http.options("/api/session/u1/state", headers=_preflight(ORIGIN))
        simple = await http.get("/api/session/u1/state", headers={"Origin": ORIGIN})
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers


def test_cors_origins_come_from_the_environment() -> None:
    settings = Settings.from_env({"SAMVAD_CORS_ORIGINS": f"{ORIGIN}, https://other.example"})
    assert settings.cors_origins == (ORIGIN, "https://other.example")


# -- request ids ------------------------------------------------------------------------------


async def test_every_response_carries_a_request_id_echoing_a_sane_client_one() -> None:
    async with (
        live_server(create_app(Settings(store="memory"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        given = await http.get("/healthz", headers={"X-Request-ID": "trace-42.a_b:c"})
        made = await http.get("/healthz")
        odd = await http.get("/healthz", headers={"X-Request-ID": "two words"})
        long = await http.get("/healthz", headers={"X-Request-ID": "x" * 65})
        error = await http.get("/api/session/nobody/state")
    assert given.headers["x-request-id"] == "trace-42.a_b:c"
    for response in (made, odd, long, error):
        generated = response.headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0


# -- logs ---------------------------------------------------------------------------------------


def test_json_log_lines_carry_the_ids_of_the_request_being_served() -> None:
    record = logging.LogRecord("samvad.test", logging.INFO, __file__, 1, "did %s", ("x",), None)
    token = request_id_var.set("req-1")
    try:
        bind_log_context(user_id="u1", session_id="s1")
        ContextFilter().filter(record)
    finally:
        request_id_var.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "did x"
    assert (entry["request_id"], entry["user_id"], entry["session_id"]) == ("req-1", "u1", "s1")


async def test_serve_logs_json_with_ids_and_never_message_content(tmp_path: Path) -> None:
    secret = "the launch code is 4711"
    served = start_serve(
        tmp_path,
        SAMVAD_STORE="memory",
        SAMVAD_LOG_FORMAT="json",
        SAMVAD_ACCESS_LOG="true",
        SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS="0",
    )
    try:
        async with httpx.AsyncClient(base_url=served.url) as http:
            saved = await http.post(
                "/api/session/u-log/state",
                json={"note": secret},
                headers={"X-Request-ID": "req-state-1"},
            )
            assert saved.status_code == 200
        async with await SamvadClient.connect(
            served.ws_url,
            user_id="u-log",
            session_id="s-log",
            heartbeat=None,
            additional_headers={"X-Request-ID": "req-ws-1"},
        ) as client:
            assert (await client.ask(secret)).reply.complete
    finally:
        assert served.stop() == 0
    output = served.output()
    lines = [line for line in output.splitlines() if line.strip()]
    entries: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line is JSON
    assert "4711" not in output, "message content is never logged"
    access = [e for e in entries if e.get("request_id") == "req-state-1"]
    assert access, lines
    assert access[0]["logger"] == "samvad.access"
    assert access[0]["route"] == "/api/session/{userId}/state"
    assert access[0]["status"] == 200
    assert access[0]["user_id"] == "u-log"
    on_socket = [e for e in entries if e.get("request_id") == "req-ws-1"]
    assert any(e.get("user_id") == "u-log" and e.get("session_id") == "s-log" for e in on_socket), (
        lines
    )
    assert all(isinstance(e["time"], str) and e["level"] for e in entries)
