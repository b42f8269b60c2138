"""``Idempotency-Key`` on the REST writes, over real HTTP with the Firestore
emulator behind: a retry answers the first response and writes nothing, a
reuse is a 422, keys are per user and operation, bad keys are a 400, expired
and erased keys are forgotten; and, with real ``samvad serve`` processes, the
promise survives ``kill -9`` and holds across two instances."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud.firestore import AsyncClient
from google.cloud.firestore_v1.base_query import FieldFilter

from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.documents import IDEMPOTENCY_KEYS, PROFILES, SESSIONS, STATES
from samvad.idempotency import record_id
from samvad.web.apidocs import openapi_document
from samvad.web.app import create_app
from tests.support.serve import ServeProcess, serve_on_firestore
from tests.support.server import live_server

pytestmark = pytest.mark.firestore

HISTORY = "/api/session/{}/history"
KEY = "Idempotency-Key"


class Api:
    def __init__(self, url: str, http: httpx.AsyncClient, flush: Any = None) -> None:
        self.url = url
        self.http = http
        self._flush = flush

    async def flush(self) -> None:
        async with asyncio.timeout(15):
            await self._flush()

    async def append(self, user: str, content: str, key: str | None = None) -> httpx.Response:
        headers = {KEY: key} if key is not None else {}
        return await self.http.post(
            HISTORY.format(user), json={"role": "user", "content": content}, headers=headers
        )


def settings_for(host: str, project: str, **changes: object) -> Settings:
    # Writes wait for a flush the test asks for: what it reads before is memory.
    base = Settings(store="firestore", emulator_host=host, project=project, flush_linger=30.0)
    return base.replace(**changes)


@contextlib.asynccontextmanager
async def serving(settings: Settings, clock: ManualClock | None = None) -> AsyncIterator[Api]:
    app = create_app(settings, clock=clock)
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        yield Api(server.url, http, server.services.persistence.writes.flush)


@pytest.fixture
async def api(firestore_emulator: str, firestore_project: str) -> AsyncIterator[Api]:
    async with serving(settings_for(firestore_emulator, firestore_project)) as running:
        yield running


async def history(client: AsyncClient, user: str) -> list[str]:
    snapshot = await client.collection(PROFILES).document(user).get()
    doc = snapshot.to_dict() or {}
    return [m["content"] for m in doc.get("conversationHistory", [])]


async def records(client: AsyncClient, user: str) -> list[dict[str, Any]]:
    query = client.collection(IDEMPOTENCY_KEYS).where(filter=FieldFilter("userId", "==", user))
    return [s.to_dict() or {} for s in await query.get()]


def assert_replay(first: httpx.Response, again: httpx.Response) -> None:
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    assert (again.status_code, again.content) == (first.status_code, first.content)
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["Idempotent-Replayed"] == "true"


# -- in one process -------------------------------------------------------------------


async def test_the_same_key_twice_answers_the_first_response_and_writes_once(
    api: Api, firestore_client: AsyncClient
) -> None:
    first = await api.append("u1", "hello", key="k-1")
    again = await api.append("u1", "hello", key="k-1")
    assert_replay(first, again)
    # Key order and white space are not part of the request.
    spaced = await api.http.post(
        HISTORY.format("u1"),
        content=b'{ "content" : "hello",\n "role": "user" }',
        headers={KEY: "k-1", "content-type": "application/json"},
    )
    assert_replay(first, spaced)
    await api.flush()
    assert await history(firestore_client, "u1") == ["hello"]
    [record] = await records(firestore_client, "u1")
    assert record["route"] == "history"
    assert record["status"] == 200
    assert record["body"].encode() == first.content
    assert record["expireAt"] > record["createdAt"]
    doc_id = record_id("u1", "history", "k-1")
    assert (await firestore_client.collection(IDEMPOTENCY_KEYS).document(doc_id).get()).exists


async def test_without_a_key_every_request_writes(api: Api, firestore_client: AsyncClient) -> None:
    for _ in range(2):
        assert (await api.append("u1", "hello")).status_code == 200
    await api.flush()
    assert await history(firestore_client, "u1") == ["hello", "hello"]
    assert await records(firestore_client, "u1") == []


async def test_the_same_key_with_another_body_is_a_422_and_writes_nothing(
    api: Api, firestore_client: AsyncClient
) -> None:
    first = await api.append("u1", "hello", key="k-1")
    assert first.status_code == 200
    reused = await api.append("u1", "something else", key="k-1")
    assert reused.status_code == 422
    body = reused.json()
    assert body["success"] is False
    assert body["code"] == "idempotency_key_reused"
    assert "Idempotency-Key" in body["error"]
    # The key still answers its own request.
    assert_replay(first, await api.append("u1", "hello", key="k-1"))
    await api.flush()
    assert await history(firestore_client, "u1") == ["hello"]


async def test_a_replayed_state_write_does_not_undo_a_later_one(
    api: Api, firestore_client: AsyncClient
) -> None:
    path = "/api/session/u1/state"
    first = await api.http.post(path, json={"step": 1}, headers={KEY: "s"})
    assert (await api.http.post(path, json={"step": 2})).status_code == 200
    assert_replay(first, await api.http.post(path, json={"step": 1}, headers={KEY: "s"}))
    assert (await api.http.get(path)).json()["state"]["step"] == 2
    await api.flush()
    doc = (await firestore_client.collection(STATES).document("u1").get()).to_dict() or {}
    assert doc["step"] == 2


async def test_a_replayed_create_does_not_reactivate_an_ended_session(
    api: Api, firestore_client: AsyncClient
) -> None:
    body = {"sessionId": "s1", "userId": "u1", "language": "en"}
    headers = {KEY: "c", "X-Device-ID": "phone"}
    first = await api.http.post("/api/session/create", json=body, headers=headers)
    assert (await api.http.put("/api/session/s1/end")).status_code == 200
    assert_replay(first, await api.http.post("/api/session/create", json=body, headers=headers))
    assert (await api.http.get("/api/session/s1")).json()["session"]["isActive"] is False
    # The device header is part of the request: another device is another request.
    other = await api.http.post(
        "/api/session/create", json=body, headers={KEY: "c", "X-Device-ID": "laptop"}
    )
    assert other.status_code == 422
    await api.flush()
    doc = (await firestore_client.collection(SESSIONS).document("s1").get()).to_dict() or {}
    assert doc["isActive"] is False
    assert doc["metadata"] == {"deviceId": "phone"}


async def test_keys_are_per_user_and_per_operation(api: Api, firestore_client: AsyncClient) -> None:
    a = await api.append("alice", "from alice", key="shared")
    b = await api.append("bob", "from bob", key="shared")
    assert a.status_code == b.status_code == 200
    assert "Idempotent-Replayed" not in b.headers
    assert b.json()["userId"] == "bob"
    # Bob's body differs from Alice's: no 422, and nothing of Alice's shows.
    assert b.json()["messageId"] != a.json()["messageId"]
    state = await api.http.post("/api/session/alice/state", json={"x": 1}, headers={KEY: "shared"})
    assert state.status_code == 200
    assert "Idempotent-Replayed" not in state.headers
    await api.flush()
    assert await history(firestore_client, "alice") == ["from alice"]
    assert await history(firestore_client, "bob") == ["from bob"]
    assert len(await records(firestore_client, "alice")) == 2
    assert len(await records(firestore_client, "bob")) == 1


async def test_concurrent_requests_with_one_key_write_once_and_get_one_answer(
    api: Api, firestore_client: AsyncClient
) -> None:
    answers = await asyncio.gather(*(api.append("u1", "hello", key="burst") for _ in range(20)))
    assert {(r.status_code, r.content) for r in answers} == {(200, answers[0].content)}
    assert sum("Idempotent-Replayed" not in r.headers for r in answers) == 1
    await api.flush()
    assert await history(firestore_client, "u1") == ["hello"]


async def raw_post(url: str, path: str, key: bytes, body: bytes) -> tuple[int, bytes]:
    """A POST written byte by byte: HTTP clients refuse to send some of these values."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Idempotency-Key: " + key + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, payload


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"", "empty"),
        (b"   ", "only white space"),
        (b"k" * 256, "too long"),
        (b"caf\xc3\xa9", "UTF-8, not ASCII"),
        (b"caf\xe9", "latin-1, not ASCII"),
        (b"a\tb", "a control character"),
    ],
)
async def test_a_bad_key_is_a_400_and_writes_nothing(
    api: Api, firestore_client: AsyncClient, value: bytes, why: str
) -> None:
    status, body = await raw_post(
        api.url, HISTORY.format("u1"), value, b'{"role": "user", "content": "hi"}'
    )
    assert status == 400, why
    error = json.loads(body)
    assert error["code"] == "invalid_field"
    assert "Idempotency-Key" in error["error"]
    await api.flush()
    assert await history(firestore_client, "u1") == []


async def test_a_key_the_http_parser_refuses_writes_nothing(
    api: Api, firestore_client: AsyncClient
) -> None:
    # DEL in a header value: uvicorn's parser answers 400 before the app.
    status, _ = await raw_post(
        api.url, HISTORY.format("u1"), b"a\x7fb", b'{"role": "user", "content": "hi"}'
    )
    assert status == 400
    assert (await api.append("u1", "after", key="fine")).status_code == 200
    await api.flush()
    assert await history(firestore_client, "u1") == ["after"]


async def test_two_keys_in_one_request_are_a_400(api: Api) -> None:
    response = await api.http.post(
        HISTORY.format("u1"),
        json={"role": "user", "content": "hi"},
        headers=[(KEY, "a"), (KEY, "b")],
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_field"


async def test_a_key_of_255_printable_characters_is_accepted(api: Api) -> None:
    key = "".join(chr(32 + i % 95) for i in range(255)).strip()
    key = "k" + key[1:-1] + "k"
    first = await api.append("u1", "hi", key=key)
    assert_replay(first, await api.append("u1", "hi", key=key))


async def test_a_refresh_forgets_the_users_keys(api: Api, firestore_client: AsyncClient) -> None:
    body = {"sessionId": "s1", "userId": "u1", "metadata": {"topic": "loans"}}
    first = await api.http.post("/api/session/create", json=body, headers={KEY: "c"})
    await api.append("u1", "hello", key="h")
    await api.append("u2", "other user", key="h")
    await api.flush()
    assert len(await records(firestore_client, "u1")) == 2
    assert (await api.http.post("/api/session/refresh", json={"userId": "u1"})).status_code == 200
    # Nothing of the erased user is served again: the key makes a new session.
    again = await api.http.post("/api/session/create", json=body, headers={KEY: "c"})
    assert again.status_code == 200
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["session"]["createdAt"] >= first.json()["session"]["createdAt"]
    await api.flush()
    assert [r["route"] for r in await records(firestore_client, "u1")] == ["create"]
    assert len(await records(firestore_client, "u2")) == 1
    # The other user's key still answers.
    replay = await api.append("u2", "other user", key="h")
    assert replay.headers["Idempotent-Replayed"] == "true"


async def test_an_expired_key_is_forgotten(firestore_emulator: str, firestore_project: str) -> None:
    clock = ManualClock()
    settings = settings_for(firestore_emulator, firestore_project, idempotency_ttl=60.0)
    async with serving(settings, clock) as api:
        first = await api.append("u1", "hello", key="k")
        clock.advance(59)
        assert_replay(first, await api.append("u1", "hello", key="k"))
        clock.advance(2)
        later = await api.append("u1", "hello", key="k")
        assert later.status_code == 200
        assert "Idempotent-Replayed" not in later.headers
        assert later.json()["messageId"] != first.json()["messageId"]


async def test_a_key_evicted_from_memory_is_read_from_firestore(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    # No memory for records at all: every answer is read through.
    settings = settings_for(firestore_emulator, firestore_project, idempotency_cache_bytes=0)
    async with serving(settings) as api:
        first = await api.append("u1", "hello", key="k")
        # Still queued: the write-behind's pending record answers.
        assert_replay(first, await api.append("u1", "hello", key="k"))
        await api.flush()
        # Flushed: Firestore answers.
        assert_replay(first, await api.append("u1", "hello", key="k"))
        await api.flush()
    assert await history(firestore_client, "u1") == ["hello"]


# -- real processes -----------------------------------------------------------------


serve = serve_on_firestore


async def stop(server: ServeProcess, sig: signal.Signals = signal.SIGTERM) -> None:
    await asyncio.to_thread(server.stop, sig)


async def drained(url: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client, asyncio.timeout(60):
        while True:
            health = (await client.get(url + "/healthz")).json()["persistence"]
            if health["mode"] == "firestore" and health["pendingWrites"] == 0:
                return
            await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_after_kill_9_and_a_restart_the_key_answers_the_first_response(
    tmp_path: Path, firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    # Nothing reaches Firestore before the kill: only the journal has the
    # message and the key's record.
    env = {"SAMVAD_DATA_DIR": str(tmp_path / "data"), "SAMVAD_FLUSH_LINGER_SECONDS": "600"}
    first_server = await serve(tmp_path, "first", firestore_emulator, firestore_project, **env)
    try:
        async with httpx.AsyncClient(base_url=first_server.url) as http:
            first = await Api(first_server.url, http).append("u1", "hello", key="k")
            assert first.status_code == 200
    finally:
        await stop(first_server, signal.SIGKILL)
    assert await history(firestore_client, "u1") == []
    env["SAMVAD_FLUSH_LINGER_SECONDS"] = "0"
    second_server = await serve(tmp_path, "second", firestore_emulator, firestore_project, **env)
    try:
        async with httpx.AsyncClient(base_url=second_server.url) as http:
            assert_replay(first, await Api(second_server.url, http).append("u1", "hello", key="k"))
        await drained(second_server.url)
    finally:
        await stop(second_server)
    assert await history(firestore_client, "u1") == ["hello"]
    assert len(await records(firestore_client, "u1")) == 1


@pytest.mark.timeout(180)
async def test_a_key_used_on_one_instance_answers_on_another(
    tmp_path: Path, firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    a, b = await asyncio.gather(
        serve(tmp_path, "a", firestore_emulator, firestore_project),
        serve(tmp_path, "b", firestore_emulator, firestore_project),
    )
    try:
        async with httpx.AsyncClient() as http:
            first = await Api(a.url, http).http.post(
                a.url + HISTORY.format("u1"),
                json={"role": "user", "content": "hello"},
                headers={KEY: "k"},
            )
            assert first.status_code == 200
            # Instance a has written the record to Firestore.
            await drained(a.url)
            again = await http.post(
                b.url + HISTORY.format("u1"),
                json={"role": "user", "content": "hello"},
                headers={KEY: "k"},
            )
            assert_replay(first, again)
            reused = await http.post(
                b.url + HISTORY.format("u1"),
                json={"role": "user", "content": "changed"},
                headers={KEY: "k"},
            )
            assert reused.status_code == 422
            await drained(b.url)
    finally:
        await asyncio.gather(stop(a), stop(b))
    assert await history(firestore_client, "u1") == ["hello"]


def test_the_openapi_document_describes_the_header_on_the_three_writes_only() -> None:
    paths = openapi_document()["paths"]
    described = set()
    for path, operations in paths.items():
        for method, operation in operations.items():
            params = {p["name"]: p for p in operation.get("parameters", [])}
            if KEY in params:
                described.add((method, path))
                schema = params[KEY]["schema"]
                assert (schema["minLength"], schema["maxLength"]) == (1, 255)
                assert "422" in operation["responses"]
                assert "Idempotent-Replayed" in operation["responses"]["200"]["headers"]
    assert described == {
        ("post", "/api/session/{userId}/state"),
        ("post", "/api/session/{userId}/history"),
        ("post", "/api/session/create"),
    }


async def test_a_caller_who_may_not_write_hears_401_before_any_word_on_the_key(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    settings = settings_for(
        firestore_emulator, firestore_project, auth="firebase", api_keys=("k" * 32,)
    )
    async with serving(settings) as api:
        anonymous = await api.http.post(
            HISTORY.format("u1"), json={"role": "user", "content": "hi"}, headers={KEY: b"caf\xe9"}
        )
        assert anonymous.status_code == 401
        service = await api.http.post(
            HISTORY.format("u1"),
            json={"role": "user", "content": "hi"},
            headers={KEY: b"caf\xe9", "X-API-Key": "k" * 32},
        )
        assert service.status_code == 400
        assert service.json()["code"] == "invalid_field"
        await api.flush()
    assert await history(firestore_client, "u1") == []
