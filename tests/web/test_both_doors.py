"""One table of bad inputs through both doors: the same verdict on each.

Every row is sent as a REST request and as a WebSocket frame to one live server
on the Firestore emulator. The REST answer is a 400 whose body carries the
error code; the WebSocket answer is an ``error`` frame with the same code, and
the connection stays usable. Nothing is stored, and good writes of the same
user sent afterwards through either door reach Firestore.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets
from google.cloud.firestore import AsyncClient

from samvad.config import Settings
from samvad.web.app import create_app
from tests.support.firestore import close_client, make_emulator_client
from tests.support.server import LiveServer, live_server

pytestmark = pytest.mark.firestore
module_loop = pytest.mark.asyncio(loop_scope="module")

USER = "door-user"
SESSION = "door-session"
COLLECTIONS = ("user_states", "user_profiles", "sessions", "interruptions")
MAX_KEYS = 20
MAX_FIELDS = 60


def _nested(levels: int) -> Any:
    value: Any = {}
    for _ in range(levels):
        value = {"n": value}
    return value


@dataclass(frozen=True)
class Row:
    """One bad input: a REST request and a WebSocket frame meaning the same."""

    id: str
    code: str
    method: str
    path: str
    body: str  # raw JSON text of the REST body
    frame: str  # raw JSON text of the WebSocket frame
    same_message: bool = True  # the two answers name the field alike


def _state_row(id: str, code: str, state_json: str, same_message: bool = True) -> Row:
    return Row(
        id,
        code,
        "POST",
        f"/api/session/{USER}/state",
        state_json,
        f'{{"type": "state", "state": {state_json}}}',
        same_message,
    )


_DEEP = json.dumps({"f": _nested(20)})  # a map at level 21 of user_states/{u}
_MANY_KEYS = json.dumps({f"k{i}": i for i in range(MAX_KEYS + 1)})
_MANY_FIELDS = json.dumps({f"k{i}": {"a": 1, "b": 2, "c": 3} for i in range(MAX_FIELDS // 4 + 1)})

ROWS = [
    Row(
        "not-json",
        "bad_json",
        "POST",
        f"/api/session/{USER}/history",
        "{oops",
        "{oops",
    ),
    Row(
        "duplicate-key",
        "bad_json",
        "POST",
        f"/api/session/{USER}/history",
        '{"role": "user", "role": "system", "content": "hi"}',
        '{"type": "ping", "type": "message", "text": "stored?"}',
        same_message=False,  # role / type
    ),
    Row(
        "lone-surrogate-in-text",
        "invalid_field",
        "POST",
        f"/api/session/{USER}/history",
        '{"role": "user", "content": "\\ud800"}',
        '{"type": "message", "text": "\\ud800"}',
        same_message=False,  # content / text
    ),
    Row(
        "text-not-a-string",
        "invalid_field",
        "POST",
        f"/api/session/{USER}/history",
        '{"role": "user", "content": 42}',
        '{"type": "message", "text": 42}',
        same_message=False,  # content / text
    ),
    Row(
        "text-empty",
        "invalid_field",
        "POST",
        f"/api/session/{USER}/history",
        '{"role": "user", "content": ""}',
        '{"type": "message", "text": ""}',
        same_message=False,
    ),
    Row(
        "text-only-white-space",
        "invalid_field",
        "POST",
        f"/api/session/{USER}/history",
        '{"role": "user", "content": " \\t\\n "}',
        '{"type": "message", "text": " \\t\\n "}',
        same_message=False,  # content / text
    ),
    _state_row("lone-surrogate-in-state", "invalid_field", '{"k": ["ok", "\\udc00"]}', False),
    _state_row("lone-surrogate-key", "invalid_field", '{"\\ud83d": 1}', False),
    _state_row("nan", "bad_json", '{"x": NaN}'),
    _state_row("number-overflow", "bad_json", '{"x": 1e400}'),
    _state_row("integer-beyond-64-bits", "invalid_field", '{"big": 18446744073709551616}'),
    _state_row("too-deep", "invalid_field", _DEEP),
    _state_row("array-in-array", "invalid_field", '{"m": [[1]]}'),
    _state_row("reserved-key", "invalid_field", '{"__name__": 1}'),
    _state_row("empty-key", "invalid_field", '{"": 1}'),
    _state_row("too-many-top-level-keys", "invalid_field", _MANY_KEYS),
    _state_row("too-many-fields", "invalid_field", _MANY_FIELDS),
    Row(
        "metadata-too-deep",
        "invalid_field",
        "POST",
        "/api/session/create",
        json.dumps({"sessionId": SESSION, "userId": USER, "metadata": {"d": _nested(19)}}),
        json.dumps(
            {"type": "start", "userId": USER, "sessionId": SESSION, "metadata": {"d": _nested(19)}}
        ),
    ),
    Row(
        "reserved-session-id",
        "invalid_field",
        "POST",
        "/api/session/create",
        json.dumps({"sessionId": "stats", "userId": USER}),
        json.dumps({"type": "start", "userId": USER, "sessionId": "stats"}),
    ),
    Row(
        "user-id-with-a-slash",
        "invalid_field",
        "POST",
        "/api/session/create",
        json.dumps({"sessionId": SESSION, "userId": "a/b"}),
        json.dumps({"type": "start", "userId": "a/b"}),
    ),
    Row(
        "session-id-lone-surrogate",
        "invalid_field",
        "POST",
        "/api/session/create",
        '{"sessionId": "s\\udfff", "userId": "door-user"}',
        '{"type": "start", "userId": "door-user", "sessionId": "s\\udfff"}',
    ),
    Row(
        "session-id-not-a-string",
        "invalid_field",
        "POST",
        "/api/session/create",
        '{"sessionId": 7, "userId": "door-user"}',
        '{"type": "start", "userId": "door-user", "sessionId": 7}',
    ),
]


@dataclass
class Doors:
    server: LiveServer
    http: httpx.AsyncClient
    ws: Any
    firestore: AsyncClient
    baseline: dict[str, dict[str, Any]]


async def _flush(server: LiveServer) -> None:
    async with asyncio.timeout(30):
        await server.services.persistence.writes.flush()


async def _snapshot(client: AsyncClient) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in COLLECTIONS:
        for doc in await client.collection(name).get():
            out[f"{name}/{doc.id}"] = doc.to_dict() or {}
    return out


async def _next_frame(ws: Any, *skip: str) -> dict[str, Any]:
    """The next frame whose type is not in ``skip`` (e.g. reply frames)."""
    while True:
        async with asyncio.timeout(10):
            frame: dict[str, Any] = json.loads(await ws.recv())
        if frame["type"] not in skip:
            return frame


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def doors(firestore_emulator: str) -> AsyncIterator[Doors]:
    project = "doors-" + uuid.uuid4().hex[:10]
    settings = Settings(
        store="firestore",
        emulator_host=firestore_emulator,
        project=project,
        flush_linger=0.0,
        ws_reply_chunk_delay=0.0,
        max_object_keys=MAX_KEYS,
        max_object_fields=MAX_FIELDS,
        ws_rate_per_second=1000.0,
        ws_rate_burst=1000,
    )
    firestore = make_emulator_client(firestore_emulator, project)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        websockets.connect(f"{server.ws_url}/ws") as ws,
    ):
        response = await http.post(f"/api/session/{USER}/state", json={"language": "en"})
        assert response.status_code == 200, response.text
        await ws.send(json.dumps({"type": "start", "userId": USER, "sessionId": SESSION}))
        assert (await _next_frame(ws))["type"] == "started"
        assert (await _next_frame(ws))["type"] == "durable"  # follows started on Firestore
        await _flush(server)
        yield Doors(server, http, ws, firestore, await _snapshot(firestore))
    await close_client(firestore)


def test_the_table_is_large_and_its_ids_unique() -> None:
    assert len(ROWS) >= 20
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
@module_loop
async def test_both_doors_give_the_same_verdict_and_store_nothing(doors: Doors, row: Row) -> None:
    response = await doors.http.request(
        row.method,
        row.path,
        content=row.body.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    rest = response.json()
    assert rest["success"] is False
    assert rest["code"] == row.code, rest

    await doors.ws.send(row.frame)
    frame = await _next_frame(doors.ws)
    assert frame["type"] == "error", frame
    assert frame["code"] == row.code, frame
    if row.same_message:
        assert frame["message"] == rest["error"]

    # The connection stays usable.
    await doors.ws.send('{"type": "ping", "ts": 1}')
    pong = await _next_frame(doors.ws)
    assert (pong["type"], pong["ts"]) == ("pong", 1)

    await _flush(doors.server)
    assert await _snapshot(doors.firestore) == doors.baseline


@module_loop
async def test_good_writes_after_the_bad_ones_reach_firestore(doors: Doors) -> None:
    response = await doors.http.post(
        f"/api/session/{USER}/history", json={"role": "user", "content": "through REST"}
    )
    assert response.status_code == 200, response.text
    await doors.ws.send('{"type": "state", "state": {"topic": "loans"}}')
    assert (await _next_frame(doors.ws))["type"] == "state"
    await doors.ws.send('{"type": "message", "text": "through the socket", "clientId": "c1"}')
    ack = await _next_frame(doors.ws, "message")
    assert ack["type"] == "ack" and ack["clientId"] == "c1"
    await _next_frame(doors.ws, "reply.start", "reply.chunk")  # reply.end: the reply is stored
    await _flush(doors.server)

    profile = (
        await doors.firestore.collection("user_profiles").document(USER).get()
    ).to_dict() or {}
    contents = [m["content"] for m in profile["conversationHistory"]]
    assert contents[:2] == ["through REST", "through the socket"]
    assert len(contents) == 3  # and the assistant's reply
    state = (await doors.firestore.collection("user_states").document(USER).get()).to_dict()
    assert state is not None
    assert state["topic"] == "loans" and state["language"] == "en"
