"""The security matrix: every endpoint and the WebSocket, tried with every kind
of credential, against a live server with authentication on.

Users and their ID tokens come from the Firebase Auth emulator (a real
``firebase emulators:start --only auth``); expired and forged tokens are
crafted with the emulator's token shape. A second matrix runs without the
emulator, through firebase-admin's production path (RS256 signatures checked
against a local stand-in for Google's keys), to show that a forged signature
is refused everywhere.

The routes come from the app itself: an endpoint added without an entry in
:data:`EXPECTED` fails :func:`test_the_matrix_covers_every_route_of_the_app`.
``docs/deploy.md`` shows the same matrix; :func:`test_the_documented_matrix_is_the_tested_one`
keeps the two in step.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from firebase_admin import _token_gen
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from samvad.config import Settings
from samvad.web.app import create_app
from tests.support.auth_emulator import (
    AuthEmulator,
    GoogleKeys,
    id_token_claims,
    unsigned_token,
)
from tests.support.server import LiveServer, live_server

KEY = "matrix-service-key-0123456789"
WRONG_KEY = "wrong-service-key-0123456789"
DEPLOY_DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"

#: Credential kinds, in the order of the documented table.
CREDENTIALS = (
    "none",
    "garbage",
    "forged",
    "expired",
    "wrong-key",
    "other-user",
    "own",
    "service-key",
    "service-bearer",
)

_USER_SCOPED = {
    "none": 401,
    "garbage": 401,
    "forged": 401,
    "expired": 401,
    "wrong-key": 401,
    "other-user": 403,
    "own": 200,
    "service-key": 200,
    "service-bearer": 200,
}
_SERVICE_ONLY = {**_USER_SCOPED, "own": 403}
_OPEN = dict.fromkeys(CREDENTIALS, 200)

#: (method, route template) -> credential kind -> status.
EXPECTED: dict[tuple[str, str], dict[str, int]] = {
    ("GET", "/api/session/stats"): _SERVICE_ONLY,
    ("POST", "/api/session/create"): _USER_SCOPED,
    ("POST", "/api/session/refresh"): _USER_SCOPED,
    ("GET", "/api/session/user/{userId}/active"): _USER_SCOPED,
    ("GET", "/api/session/user/{userId}/sessions"): _USER_SCOPED,
    ("GET", "/api/session/{userId}/state"): _USER_SCOPED,
    ("POST", "/api/session/{userId}/state"): _USER_SCOPED,
    ("GET", "/api/session/{userId}/profile"): _USER_SCOPED,
    ("GET", "/api/session/{userId}/history"): _USER_SCOPED,
    ("POST", "/api/session/{userId}/history"): _USER_SCOPED,
    ("PUT", "/api/session/{userId}/preferences"): _USER_SCOPED,
    ("PUT", "/api/session/{sessionId}/end"): _USER_SCOPED,
    ("GET", "/api/session/{sessionId}"): _USER_SCOPED,
    ("DELETE", "/api/session/{sessionId}"): _USER_SCOPED,
    ("GET", "/healthz"): _OPEN,
    ("GET", "/readyz"): _OPEN,
    ("GET", "/metrics"): _OPEN,
    ("GET", "/openapi.json"): _OPEN,
    ("GET", "/asyncapi.json"): _OPEN,
}

#: The WebSocket: credential kind -> the answer to ``start`` (a close code, or "started").
WS_CREDENTIALS = (*CREDENTIALS, "service-key-header", "wrong-key-header")
WS_EXPECTED: dict[str, int | str] = {
    "none": 4401,
    "garbage": 4401,
    "forged": 4401,
    "expired": 4401,
    "wrong-key": 4401,
    "other-user": 4403,
    "own": "started",
    "service-key": "started",
    "service-bearer": "started",
    "service-key-header": "started",
    "wrong-key-header": 4401,
}


@dataclass(frozen=True)
class Caller:
    """Credentials to try, for the owner of the data being addressed."""

    owner: str
    tokens: dict[str, str]

    def headers(self, credential: str) -> dict[str, str]:
        if credential == "none":
            return {}
        if credential in ("wrong-key", "wrong-key-header"):
            return {"X-API-Key": WRONG_KEY}
        if credential in ("service-key", "service-key-header"):
            return {"X-API-Key": KEY}
        if credential == "service-bearer":
            return {"Authorization": f"Bearer {KEY}"}
        return {"Authorization": f"Bearer {self.tokens[credential]}"}

    def start_token(self, credential: str) -> str | None:
        """The ``token`` of the start frame (header-borne credentials send none)."""
        if credential in ("none", "service-key-header", "wrong-key-header"):
            return None
        if credential == "wrong-key":
            return WRONG_KEY
        if credential in ("service-key", "service-bearer"):
            return KEY
        return self.tokens[credential]

    def start_headers(self, credential: str) -> dict[str, str]:
        return self.headers(credential) if credential.endswith("-header") else {}


def _emulator_caller(emulator: AuthEmulator) -> Caller:
    owner, other = emulator.sign_up(), emulator.sign_up()
    project = emulator.project
    hour_ago = time.time() - 3600
    return Caller(
        owner=owner.uid,
        tokens={
            "garbage": "not-a-token",
            # Unsigned, as the emulator's: the claims are what is forged here.
            "forged": unsigned_token(id_token_claims(owner.uid, "someone-elses-project")),
            "expired": unsigned_token(
                id_token_claims(owner.uid, project, issued_at=hour_ago - 60, lifetime=60)
            ),
            "other-user": other.id_token,
            "own": owner.id_token,
        },
    )


@pytest.fixture
async def emulator_server(auth_emulator_env: AuthEmulator) -> AsyncIterator[LiveServer]:
    settings = Settings(
        store="memory",
        auth="firebase",
        auth_project=auth_emulator_env.project,
        api_keys=(KEY,),
        ws_reply_chunk_delay=0.0,
    )
    async with live_server(create_app(settings)) as server:
        yield server


async def _seed(http: httpx.AsyncClient, owner: str) -> str:
    """Fresh data of ``owner`` (as the service): state, history, a session; its id."""
    service = {"X-API-Key": KEY}
    session_id = "s-" + uuid.uuid4().hex[:10]
    for method, path, body in (
        ("POST", f"/api/session/{owner}/state", {"language": "en"}),
        ("POST", f"/api/session/{owner}/history", {"role": "user", "content": "hello"}),
        ("POST", "/api/session/create", {"sessionId": session_id, "userId": owner}),
    ):
        response = await http.request(method, path, json=body, headers=service)
        assert response.status_code == 200, response.text
    return session_id


def _request(method: str, route: str, owner: str, session_id: str) -> dict[str, Any]:
    path = route.replace("{userId}", owner).replace("{sessionId}", session_id)
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/api/session/create"): {"sessionId": session_id + "-new", "userId": owner},
        ("POST", "/api/session/refresh"): {"userId": owner},
        ("POST", "/api/session/{userId}/state"): {"language": "hi"},
        ("POST", "/api/session/{userId}/history"): {"role": "user", "content": "again"},
        ("PUT", "/api/session/{userId}/preferences"): {"voice": "slow"},
    }
    request: dict[str, Any] = {"method": method, "url": path}
    if (method, route) in bodies:
        request["json"] = bodies[(method, route)]
    return request


async def _rest_row(
    server: LiveServer, caller: Caller, method: str, route: str, credentials: tuple[str, ...]
) -> dict[str, int]:
    row: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for credential in credentials:
            session_id = await _seed(http, caller.owner)
            request = _request(method, route, caller.owner, session_id)
            response = await http.request(**request, headers=caller.headers(credential))
            row[credential] = response.status_code
            if response.status_code >= 400 and response.headers["content-type"].startswith(
                "application/json"
            ):
                assert response.json()["success"] is False
    return row


def _diff(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    return ", ".join(
        f"{name}: expected {expected[name]}, got {actual.get(name)}"
        for name in expected
        if expected[name] != actual.get(name)
    )


# -- the matrix with the Auth emulator ---------------------------------------------------------


@pytest.mark.parametrize(("method", "route"), list(EXPECTED), ids=lambda v: str(v))
async def test_rest_endpoint_answers_each_credential_as_expected(
    emulator_server: LiveServer, auth_emulator_env: AuthEmulator, method: str, route: str
) -> None:
    caller = _emulator_caller(auth_emulator_env)
    expected = EXPECTED[(method, route)]
    actual = await _rest_row(emulator_server, caller, method, route, CREDENTIALS)
    assert actual == expected, f"{method} {route}: {_diff(expected, actual)}"


async def _start(server: LiveServer, caller: Caller, credential: str, **fields: Any) -> Any:
    """Send ``start``; "started", an error code (connection open), or the close code."""
    async with connect(
        f"{server.ws_url}/ws", additional_headers=caller.start_headers(credential)
    ) as ws:
        frame: dict[str, Any] = {"type": "start", "userId": caller.owner, **fields}
        token = caller.start_token(credential)
        if token is not None:
            frame["token"] = token
        await ws.send(json.dumps(frame))
        answer = json.loads(await ws.recv())
        if answer["type"] == "started":
            return "started"
        assert answer["type"] == "error"
        if answer["code"] not in ("unauthorized", "forbidden"):
            return answer["code"]  # the connection stays open
        try:
            await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code
        return answer["code"]


async def test_websocket_start_answers_each_credential_as_expected(
    emulator_server: LiveServer, auth_emulator_env: AuthEmulator
) -> None:
    caller = _emulator_caller(auth_emulator_env)
    actual = {c: await _start(emulator_server, caller, c) for c in WS_CREDENTIALS}
    assert actual == WS_EXPECTED, _diff(WS_EXPECTED, actual)


async def test_a_users_own_token_cannot_take_over_another_users_session(
    emulator_server: LiveServer, auth_emulator_env: AuthEmulator
) -> None:
    caller = _emulator_caller(auth_emulator_env)
    async with httpx.AsyncClient(base_url=emulator_server.url) as http:
        theirs = await _seed(http, "someone-else")
    assert await _start(emulator_server, caller, "own", sessionId=theirs) == "conflict"


async def test_unknown_sessions_are_404_for_every_valid_caller(
    emulator_server: LiveServer, auth_emulator_env: AuthEmulator
) -> None:
    caller = _emulator_caller(auth_emulator_env)
    async with httpx.AsyncClient(base_url=emulator_server.url) as http:
        for credential in ("own", "other-user", "service-key"):
            for method, path in (
                ("GET", "/api/session/no-such-session"),
                ("PUT", "/api/session/no-such-session/end"),
                ("DELETE", "/api/session/no-such-session"),
            ):
                response = await http.request(method, path, headers=caller.headers(credential))
                assert response.status_code == 404, (credential, method, path)


async def test_a_user_reaches_their_data_only_with_their_own_token(
    emulator_server: LiveServer, auth_emulator_env: AuthEmulator
) -> None:
    caller = _emulator_caller(auth_emulator_env)
    own, other = caller.headers("own"), caller.headers("other-user")
    async with httpx.AsyncClient(base_url=emulator_server.url) as http:
        await _seed(http, caller.owner)
        profile = await http.get(f"/api/session/{caller.owner}/profile", headers=own)
        assert profile.json()["profile"]["conversationHistory"][0]["content"] == "hello"
        refused = await http.get(f"/api/session/{caller.owner}/profile", headers=other)
        assert refused.status_code == 403
        assert "hello" not in refused.text


# -- the matrix through the production path: signatures checked ---------------------------


SIGNED_CREDENTIALS = ("forged-signature", "signed-other-user", "signed-own")


@pytest.fixture
def google_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[GoogleKeys]:
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    keys = GoogleKeys()
    with keys.serve() as url:
        monkeypatch.setattr(_token_gen, "ID_TOKEN_CERT_URI", url)
        yield keys


@pytest.fixture
async def signed_server(google_keys: GoogleKeys) -> AsyncIterator[tuple[LiveServer, Caller]]:
    project = "demo-samvad-signed"
    settings = Settings(store="memory", auth="firebase", auth_project=project, api_keys=(KEY,))
    owner = "owner-" + uuid.uuid4().hex[:8]
    caller = Caller(
        owner=owner,
        tokens={
            "forged-signature": google_keys.sign(id_token_claims(owner, project), forge=True),
            "signed-other-user": google_keys.sign(id_token_claims("someone-else", project)),
            "signed-own": google_keys.sign(id_token_claims(owner, project)),
        },
    )
    async with live_server(create_app(settings)) as server:
        yield server, caller


@pytest.mark.parametrize(
    ("method", "route"),
    [key for key, row in EXPECTED.items() if row is _USER_SCOPED or row is _SERVICE_ONLY],
    ids=lambda v: str(v),
)
async def test_a_forged_signature_is_refused_by_every_endpoint(
    signed_server: tuple[LiveServer, Caller], method: str, route: str
) -> None:
    server, caller = signed_server
    row = EXPECTED[(method, route)]
    expected = {
        "forged-signature": 401,
        "signed-other-user": row["other-user"],
        "signed-own": row["own"],
    }
    actual = await _rest_row(server, caller, method, route, SIGNED_CREDENTIALS)
    assert actual == expected, f"{method} {route}: {_diff(expected, actual)}"


async def test_a_forged_signature_is_refused_by_the_websocket(
    signed_server: tuple[LiveServer, Caller],
) -> None:
    server, caller = signed_server
    actual = {c: await _start(server, caller, c) for c in SIGNED_CREDENTIALS}
    assert actual == {"forged-signature": 4401, "signed-other-user": 4403, "signed-own": "started"}


# -- completeness ---------------------------------------------------------------------------


def test_the_matrix_covers_every_route_of_the_app() -> None:
    app = create_app(Settings(store="memory"))
    routed: set[tuple[str, str]] = set()
    for route in app.routes:
        if type(route) is Route:
            routed |= {(m, route.path) for m in route.methods or () if m != "HEAD"}
        elif isinstance(route, WebSocketRoute):
            routed.add(("WS", route.path))
    assert routed == {*EXPECTED, ("WS", "/ws")}


def _documented_matrix() -> tuple[list[str], dict[str, list[str]]]:
    text = DEPLOY_DOC.read_text()
    section = text.split("<!-- security-matrix -->")[1].lstrip("\n")
    rows: list[str] = []
    for line in section.splitlines():
        if not line.startswith("|"):
            break  # the table ends at its first other line
        rows.append(line)
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table: dict[str, list[str]] = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0].strip("`")] = cells[1:]
    return header[1:], table


def test_the_documented_matrix_is_the_tested_one() -> None:
    header, table = _documented_matrix()
    assert header == [f"`{c}`" for c in CREDENTIALS]
    expected = {
        f"{method} {route}": [str(row[c]) for c in CREDENTIALS]
        for (method, route), row in EXPECTED.items()
    }
    expected["WS /ws (start)"] = [
        "started" if WS_EXPECTED[c] == "started" else str(WS_EXPECTED[c]) for c in CREDENTIALS
    ]
    documented = {
        name: [re.sub(r"[*`]", "", cell) for cell in cells] for name, cells in table.items()
    }
    assert documented == expected
