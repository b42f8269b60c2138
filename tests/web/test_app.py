"""The app over a real socket: start-up, health, error shape, shutdown flush."""

from __future__ import annotations

import httpx
import pytest

from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.stores.factory import build_store
from samvad.stores.firestore import FirestoreStore
from samvad.stores.memory import MemoryStore
from samvad.web.app import create_app
from tests.support.server import live_server


async def test_healthz_reports_the_persistence_mode() -> None:
    app = create_app(Settings(store="memory"))
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["persistence"]["mode"] == "memory"
    assert body["persistence"]["backend"] == "memory"
    assert body["persistence"]["pendingWrites"] == 0


async def test_unknown_routes_answer_with_the_json_error_shape() -> None:
    app = create_app(Settings(store="memory"))
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        response = await http.get("/nope")
        wrong_method = await http.delete("/healthz")
    assert response.status_code == 404
    assert response.json() == {"success": False, "error": "Not found", "code": "not_found"}
    assert wrong_method.status_code == 405
    assert wrong_method.json()["success"] is False


def test_auto_store_without_firestore_configured_is_memory() -> None:
    assert isinstance(build_store(Settings(store="auto")), MemoryStore)


def test_auto_store_with_an_emulator_configured_is_firestore() -> None:
    settings = Settings(store="auto", emulator_host="127.0.0.1:1", project="p")
    assert isinstance(build_store(settings), FirestoreStore)


def test_firestore_store_without_configuration_fails_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="GOOGLE_CLOUD_PROJECT"):
        build_store(Settings(store="firestore"))
