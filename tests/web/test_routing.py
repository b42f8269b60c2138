"""The indexed router picks exactly the route Starlette's one-by-one loop picks."""

from __future__ import annotations

import itertools
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from starlette.routing import Match, Route

from samvad.config import Settings
from samvad.web.app import create_app
from samvad.web.routing import IndexedRouter
from tests.support.server import live_server

SEGMENTS = ["u1", "user", "stats", "create", "state", "history", "profile", "end", "active", ""]
ODD = ["a%2Fb", "%FF", "caf%C3%A9", "x%20y"]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]


def _paths() -> list[str]:
    paths = ["/healthz", "/metrics", "/readyz", "/openapi.json", "/healthz/", "/nowhere", "/"]
    words = SEGMENTS + ODD
    for length in (1, 2, 3):
        for combo in itertools.product(words, repeat=length):
            paths.append("/api/session/" + "/".join(combo))
    return paths


def _scope(raw: str, method: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": unquote(raw),
        "raw_path": raw.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }


def _starlette_full_match(router: IndexedRouter, scope: dict[str, Any]) -> Any:
    for route in router.routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            return route, child.get("path_params")
    return None  # no full match: a 405 (partial), a redirect or a 404


def test_the_index_answers_only_what_starlette_would_answer_the_same() -> None:
    app = create_app(Settings(store="memory"))
    router = app.router
    assert isinstance(router, IndexedRouter)
    answered = 0
    for raw in _paths():
        for method in METHODS:
            scope = _scope(raw, method)
            found = router.lookup(scope)
            if found is None:
                continue
            answered += 1
            expected = _starlette_full_match(router, scope)
            assert expected is not None, f"{method} {raw}: Starlette would not match it fully"
            route, params = found
            assert (route, params) == expected, f"{method} {raw}"
    assert answered > 100


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("GET", "/api/session/u1/state", "/api/session/{userId}/state"),
        ("POST", "/api/session/u1/state", "/api/session/{userId}/state"),
        ("POST", "/api/session/u1/history", "/api/session/{userId}/history"),
        ("GET", "/api/session/user/state", "/api/session/{userId}/state"),
        ("GET", "/api/session/stats", "/api/session/stats"),
        ("GET", "/healthz", "/healthz"),
    ],
)
def test_the_hot_routes_are_found_by_the_index(method: str, path: str, template: str) -> None:
    router = create_app(Settings(store="memory")).router
    assert isinstance(router, IndexedRouter)
    found = router.lookup(_scope(path, method))
    assert found is not None
    route, _ = found
    assert isinstance(route, Route) and route.path == template


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/api/session/u1/state"),  # 405: Starlette's loop
        ("GET", "/api/session/a%2Fb/state"),  # the malformed-path guard
        ("GET", "/api/session//state"),
        ("GET", "/api/session/s1"),  # after routes of the same shape
        ("GET", "/api/session/u1/state/"),  # the trailing-slash redirect
    ],
)
def test_everything_else_is_left_to_starlette(method: str, path: str) -> None:
    router = create_app(Settings(store="memory")).router
    assert isinstance(router, IndexedRouter)
    assert router.lookup(_scope(path, method)) is None


def test_a_root_path_is_left_to_starlette() -> None:
    router = create_app(Settings(store="memory")).router
    assert isinstance(router, IndexedRouter)
    scope = _scope("/prefix/api/session/u1/state", "GET") | {"root_path": "/prefix"}
    assert router.lookup(scope) is None


async def test_answers_through_the_index_and_around_it_keep_their_shapes() -> None:
    async with (
        live_server(create_app(Settings(store="memory"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        saved = await http.post("/api/session/u1/state", json={"language": "en"})
        read = await http.get("/api/session/u1/state")
        wrong = await http.put("/api/session/u1/state", json={})
        slashed = await http.get("/api/session/a%2Fb/state")
        missing = await http.get("/api/session/u1/nothing/here")
    assert saved.status_code == 200 and saved.json()["success"] is True
    assert read.json()["state"]["language"] == "en"
    assert wrong.status_code == 405 and wrong.headers["allow"]
    assert wrong.json()["success"] is False
    assert slashed.status_code == 400 and slashed.json()["success"] is False
    assert missing.status_code == 404 and missing.json()["success"] is False
