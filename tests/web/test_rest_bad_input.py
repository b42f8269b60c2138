"""Bad input, endpoint by endpoint: each request is refused with the right status
and a message naming what was wrong, always in the JSON error shape, and
nothing stored (in Firestore or in the server's memory) changes."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio
from google.cloud.firestore import AsyncClient

from samvad.config import Settings
from samvad.errors import BadRequest
from samvad.interruptions import Interruption
from samvad.web.app import create_app
from samvad.web.requests_json import parse_object
from tests.support.firestore import close_client, make_emulator_client
from tests.support.server import LiveServer, live_server

# One server and one seeded Firestore project for the whole matrix: every case
# checks against the same snapshot, so a case that wrote anything would show.
module_loop = pytest.mark.asyncio(loop_scope="module")

COLLECTIONS = ("user_states", "user_profiles", "sessions", "interruptions")
BODY_LIMIT = 64 * 1024
MERGE_LIMIT = 4096


@dataclass(frozen=True)
class Case:
    """One bad request and the answer it must get."""

    id: str
    method: str
    path: str
    status: int
    error: str  # exact message, or a prefix when it ends with "..."
    json_body: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": self.headers, "params": self.params}
        if self.content is not None:
            kwargs["content"] = self.content
            kwargs["headers"] = {"Content-Type": "application/json", **self.headers}
        elif self.json_body is not None:
            kwargs["json"] = self.json_body
        return kwargs


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


def _forged_cursor(session_id: str) -> str:
    raw = json.dumps({"t": "2025-01-10T17:00:00.000Z", "id": session_id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CREATE = "/api/session/create"
HISTORY = "/api/session/alice/history"
STATE = "/api/session/alice/state"
OK_MESSAGE = {"role": "user", "content": "hi"}

CASES = [
    # -- malformed bodies ------------------------------------------------------------
    Case("create-truncated-json", "POST", CREATE, 400, "Malformed JSON: ...", content=b'{"ses'),
    Case("state-not-json", "POST", STATE, 400, "Malformed JSON: ...", content=b"{bad}"),
    Case(
        "state-nan",
        "POST",
        STATE,
        400,
        "Malformed JSON: NaN is not valid JSON",
        content=b'{"x": NaN}',
    ),
    Case(
        "history-infinity",
        "POST",
        HISTORY,
        400,
        "Malformed JSON: Infinity is not valid JSON",
        content=b'{"role": "user", "content": "x", "n": Infinity}',
    ),
    Case(
        "state-float-overflow",
        "POST",
        STATE,
        400,
        "Malformed JSON: the number 1e400 is out of range",
        content=b'{"x": 1e400}',
    ),
    Case(
        "refresh-duplicate-key",
        "POST",
        "/api/session/refresh",
        400,
        "Malformed JSON: the key 'userId' appears twice in one object",
        content=b'{"userId": "alice", "userId": "bob"}',
    ),
    Case(
        "state-array-body",
        "POST",
        STATE,
        400,
        "Request body must be a JSON object, not an array",
        content=b"[1, 2]",
    ),
    Case(
        "create-empty-body",
        "POST",
        CREATE,
        400,
        "Request body must be a JSON object; it is empty",
        content=b"",
    ),
    Case(
        "history-invalid-utf8",
        "POST",
        HISTORY,
        400,
        "Request body is not valid UTF-8",
        content=b'{"role": "user", "content": "\xff\xfe"}',
    ),
    Case(
        "state-lone-surrogate",
        "POST",
        STATE,
        400,
        "x contains a lone surrogate (not valid Unicode)",
        content=b'{"x": "\\ud800"}',
    ),
    Case(
        "create-text-plain",
        "POST",
        CREATE,
        400,
        "Content-Type must be application/json",
        content=b'{"sessionId": "s9", "userId": "alice"}',
        headers={"Content-Type": "text/plain"},
    ),
    Case(
        "state-over-body-limit",
        "POST",
        STATE,
        413,
        f"Request body is larger than {BODY_LIMIT} bytes",
        json_body={"blob": "x" * BODY_LIMIT},
    ),
    Case(
        "state-merge-over-limit",
        "POST",
        STATE,
        413,
        "state would grow to ...",
        json_body={"more": "y" * 3000},
    ),
    # -- create ----------------------------------------------------------------------
    Case("create-no-session-id", "POST", CREATE, 400, "sessionId is required", {"userId": "a"}),
    Case("create-no-user-id", "POST", CREATE, 400, "userId is required", {"sessionId": "s9"}),
    Case(
        "create-session-id-number",
        "POST",
        CREATE,
        400,
        "sessionId must be a string",
        {"sessionId": 7, "userId": "alice"},
    ),
    Case(
        "create-user-id-empty",
        "POST",
        CREATE,
        400,
        "userId must not be empty",
        {"sessionId": "s9", "userId": ""},
    ),
    Case(
        "create-session-id-too-long",
        "POST",
        CREATE,
        400,
        "sessionId must be at most 128 characters",
        {"sessionId": "s" * 129, "userId": "alice"},
    ),
    Case(
        "create-session-id-slash",
        "POST",
        CREATE,
        400,
        "sessionId must not contain '/' or control characters",
        {"sessionId": "a/b", "userId": "alice"},
    ),
    Case(
        "create-user-id-dotdot",
        "POST",
        CREATE,
        400,
        "userId must not be '.' or '..'",
        {"sessionId": "s9", "userId": ".."},
    ),
    Case(
        "create-user-id-dunder",
        "POST",
        CREATE,
        400,
        "userId must not look like __name__ (reserved by Firestore)",
        {"sessionId": "s9", "userId": "__name__"},
    ),
    Case(
        "create-reserved-session-id",
        "POST",
        CREATE,
        400,
        "sessionId must not be the reserved word 'stats'",
        {"sessionId": "stats", "userId": "alice"},
    ),
    Case(
        "create-metadata-array",
        "POST",
        CREATE,
        400,
        "metadata must be an object",
        {"sessionId": "s9", "userId": "alice", "metadata": [1]},
    ),
    Case(
        "create-metadata-nested-array",
        "POST",
        CREATE,
        400,
        "metadata.tags[0] contains an array directly inside an array",
        {"sessionId": "s9", "userId": "alice", "metadata": {"tags": [[1]]}},
    ),
    Case(
        "create-metadata-reserved-key",
        "POST",
        CREATE,
        400,
        "metadata.__x__ is a reserved name (__name__ form)",
        {"sessionId": "s9", "userId": "alice", "metadata": {"__x__": 1}},
    ),
    Case(
        "create-language-number",
        "POST",
        CREATE,
        400,
        "language must be a string",
        {"sessionId": "s9", "userId": "alice", "language": 5},
    ),
    Case(
        "create-device-id-slash",
        "POST",
        CREATE,
        400,
        "X-Device-ID must not contain '/' or control characters",
        {"sessionId": "s9", "userId": "alice"},
        headers={"X-Device-ID": "dev/1"},
    ),
    Case(
        "create-device-id-empty",
        "POST",
        CREATE,
        400,
        "X-Device-ID must not be empty",
        {"sessionId": "s9", "userId": "alice"},
        headers={"X-Device-ID": ""},
    ),
    Case(
        "create-other-users-session",
        "POST",
        CREATE,
        409,
        "session s-bob belongs to another user",
        {"sessionId": "s-bob", "userId": "alice", "language": "xx"},
    ),
    # -- history ---------------------------------------------------------------------
    Case("history-no-role", "POST", HISTORY, 400, "role is required", {"content": "hi"}),
    Case(
        "history-unknown-role",
        "POST",
        HISTORY,
        400,
        "role must be one of user, assistant, system",
        {"role": "robot", "content": "hi"},
    ),
    Case(
        "history-content-number",
        "POST",
        HISTORY,
        400,
        "content must be a string",
        {"role": "user", "content": 42},
    ),
    Case(
        "history-content-empty",
        "POST",
        HISTORY,
        400,
        "content must not be empty",
        {"role": "user", "content": ""},
    ),
    Case(
        "history-content-only-white-space",
        "POST",
        HISTORY,
        400,
        "content must not be empty",
        {"role": "assistant", "content": " \u3000\t\n"},
    ),
    Case(
        "history-reserved-session-id",
        "POST",
        HISTORY,
        400,
        "sessionId must not be the reserved word 'create'",
        {**OK_MESSAGE, "sessionId": "create"},
    ),
    Case(
        "history-other-users-session",
        "POST",
        HISTORY,
        409,
        "session s-bob belongs to another user",
        {**OK_MESSAGE, "sessionId": "s-bob"},
    ),
    # -- state and preferences -------------------------------------------------------
    Case(
        "state-int-beyond-64-bits",
        "POST",
        STATE,
        400,
        "state.big is an integer outside the 64-bit range",
        {"big": 2**64},
    ),
    Case(
        "state-too-deep",
        "POST",
        STATE,
        400,
        # state.deep is level 1: the map at .n * 20 is level 21, one past Firestore's limit
        "state.deep" + ".n" * 20 + " nests deeper than 20 levels",
        {"deep": _nested(25)},
    ),
    Case(
        "preferences-empty",
        "PUT",
        "/api/session/alice/preferences",
        400,
        "preferences must hold at least one key",
        {},
    ),
    Case(
        "preferences-reserved-key",
        "PUT",
        "/api/session/alice/preferences",
        400,
        "preferences.__name__ is a reserved name (__name__ form)",
        {"__name__": "x"},
    ),
    # -- refresh ---------------------------------------------------------------------
    Case("refresh-no-user-id", "POST", "/api/session/refresh", 400, "userId is required", {}),
    Case(
        "refresh-user-id-object",
        "POST",
        "/api/session/refresh",
        400,
        "userId must be a string",
        {"userId": {"id": "alice"}},
    ),
    # -- ids in the path -------------------------------------------------------------
    Case(
        "path-user-id-dotdot",
        "GET",
        "/api/session/%2E%2E/state",
        400,
        "userId must not be '.' or '..'",
    ),
    Case(
        "path-user-id-dunder",
        "POST",
        "/api/session/__name__/history",
        400,
        "userId must not look like __name__ (reserved by Firestore)",
        OK_MESSAGE,
    ),
    Case(
        "path-user-id-too-long",
        "GET",
        f"/api/session/{'u' * 129}/profile",
        400,
        "userId must be at most 128 characters",
    ),
    Case(
        "path-encoded-slash",
        "GET",
        "/api/session/alice%2Fx/state",
        400,
        "Identifiers in the path must not be empty or contain '/' (%2F)",
    ),
    Case(
        "path-empty-segment",
        "POST",
        "/api/session//history",
        400,
        "Identifiers in the path must not be empty or contain '/' (%2F)",
        OK_MESSAGE,
    ),
    Case(
        "path-user-id-invalid-utf8",
        "GET",
        "/api/session/a%FFb/state",
        400,
        "userId is not valid UTF-8 once percent-decoded",
    ),
    Case(
        "path-session-id-invalid-utf8",
        "DELETE",
        "/api/session/s-alice%FE",
        400,
        "sessionId is not valid UTF-8 once percent-decoded",
    ),
    Case(
        "path-lists-user-id-invalid-utf8",
        "GET",
        "/api/session/user/%C0%AFalice/sessions",
        400,
        "userId is not valid UTF-8 once percent-decoded",
    ),
    Case(
        "preferences-too-deep-for-the-profile",
        "PUT",
        "/api/session/alice/preferences",
        400,
        # preferences is a map field of the profile: 20 levels inside it are 21 in Firestore
        "preferences.deep" + ".n" * 19 + " nests deeper than 20 levels",
        {"deep": _nested(19)},
    ),
    Case(
        "create-metadata-too-deep-for-the-session",
        "POST",
        CREATE,
        400,
        "metadata.deep" + ".n" * 19 + " nests deeper than 20 levels",
        {"sessionId": "s9", "userId": "alice", "metadata": {"deep": _nested(19)}},
    ),
    Case(
        "history-null-session-id-is-none",
        "POST",
        HISTORY,
        400,
        "content must not be empty",
        {"role": "user", "content": "", "sessionId": None},
    ),
    Case(
        "state-duplicate-key",
        "POST",
        STATE,
        400,
        "Malformed JSON: the key 'language' appears twice in one object",
        content=b'{"language": "hi", "language": "xx"}',
    ),
    Case(
        "path-session-id-white-space",
        "DELETE",
        "/api/session/%20s-alice",
        400,
        "sessionId must not start or end with white space",
    ),
    Case(
        "path-reserved-session-id",
        "PUT",
        "/api/session/refresh/end",
        400,
        "sessionId must not be the reserved word 'refresh'",
    ),
    # -- query parameters ------------------------------------------------------------
    Case(
        "sessions-unknown-status",
        "GET",
        "/api/session/user/alice/sessions",
        400,
        "status must be one of active, ended, abandoned",
        params={"status": "paused"},
    ),
    Case(
        "sessions-limit-zero",
        "GET",
        "/api/session/user/alice/sessions",
        400,
        "limit must be an integer between 1 and 100",
        params={"limit": "0"},
    ),
    Case(
        "sessions-limit-not-a-number",
        "GET",
        "/api/session/user/alice/sessions",
        400,
        "limit must be an integer between 1 and 100",
        params={"limit": "ten"},
    ),
    Case(
        "sessions-garbage-cursor",
        "GET",
        "/api/session/user/alice/sessions",
        400,
        "cursor is not a cursor this server issued",
        params={"cursor": "not-a-cursor"},
    ),
    Case(
        "sessions-forged-cursor",
        "GET",
        "/api/session/user/alice/sessions",
        400,
        "cursor is not a cursor this server issued",
        params={"cursor": _forged_cursor("a/b")},
    ),
    Case(
        "history-limit-thousands-of-digits",
        "GET",
        HISTORY,
        400,
        "limit must be an integer between 1 and 100",
        params={"limit": "9" * 5000},
    ),
    Case(
        "history-limit-negative",
        "GET",
        HISTORY,
        400,
        "limit must be an integer between 1 and 100",
        params={"limit": "-1"},
    ),
    # -- unknown things --------------------------------------------------------------
    Case("get-unknown-session", "GET", "/api/session/nope", 404, "Session not found"),
    Case("end-unknown-session", "PUT", "/api/session/nope/end", 404, "Session not found"),
    Case("delete-unknown-session", "DELETE", "/api/session/nope", 404, "Session not found"),
    Case("unknown-user-state", "GET", "/api/session/nobody/state", 404, "User state not found"),
    Case(
        "unknown-user-profile", "GET", "/api/session/nobody/profile", 404, "User profile not found"
    ),
    Case("unknown-path", "GET", "/api/session/a/b/c", 404, "Not found"),
    Case("wrong-method", "PATCH", "/api/session/s-alice", 405, "Method not allowed"),
]


@dataclass
class Seeded:
    server: LiveServer
    http: httpx.AsyncClient
    firestore: AsyncClient
    snapshot: dict[str, dict[str, Any]]
    views: dict[str, Any]
    writes_issued: int


async def _snapshot(client: AsyncClient) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in COLLECTIONS:
        for doc in await client.collection(name).get():
            out[f"{name}/{doc.id}"] = doc.to_dict() or {}
    return out


VIEW_PATHS = (
    "/api/session/alice/state",
    "/api/session/alice/profile",
    "/api/session/s-alice",
    "/api/session/s-bob",
    "/api/session/user/alice/sessions",
    "/api/session/user/bob/active",
)


async def _views(http: httpx.AsyncClient) -> dict[str, Any]:
    return {path: (await http.get(path)).json() for path in VIEW_PATHS}


async def _flush(server: LiveServer) -> None:
    async with asyncio.timeout(15):
        await server.services.persistence.writes.flush()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seeded(firestore_emulator: str) -> AsyncIterator[Seeded]:
    project = "bad-input-" + uuid.uuid4().hex[:10]
    settings = Settings(
        store="firestore",
        emulator_host=firestore_emulator,
        project=project,
        flush_linger=0.0,
        max_merged_object_bytes=MERGE_LIMIT,
    )
    assert settings.max_body_bytes == BODY_LIMIT  # the default is what is tested
    firestore = make_emulator_client(firestore_emulator, project)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        for method, path, body in (
            ("POST", "/api/session/alice/state", {"language": "en", "pad": "p" * 1500}),
            ("POST", CREATE, {"sessionId": "s-alice", "userId": "alice", "metadata": {"a": 1}}),
            ("POST", CREATE, {"sessionId": "s-bob", "userId": "bob"}),
            ("POST", HISTORY, {**OK_MESSAGE, "sessionId": "s-alice"}),
            ("PUT", "/api/session/alice/preferences", {"voice": "slow"}),
        ):
            response = await http.request(method, path, json=body)
            assert response.status_code == 200, response.text
        server.services.interruptions.push(_interruption())
        await _flush(server)
        yield Seeded(
            server=server,
            http=http,
            firestore=firestore,
            snapshot=await _snapshot(firestore),
            views=await _views(http),
            writes_issued=server.services.persistence.status().writes_issued,
        )
    await close_client(firestore)


def _interruption() -> Interruption:
    return Interruption(
        session_id="s-alice",
        user_id="alice",
        at=datetime(2025, 1, 10, tzinfo=UTC),
        reason="barge-in",
        heard="a",
        cut="b",
    )


def test_the_matrix_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
@pytest.mark.firestore
@module_loop
async def test_bad_input_is_refused_and_changes_nothing(seeded: Seeded, case: Case) -> None:
    response = await seeded.http.request(case.method, case.path, **case.kwargs())

    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"success", "error", "code"}
    assert body["success"] is False
    if case.error.endswith("..."):
        assert body["error"].startswith(case.error[:-3]), body["error"]
    else:
        assert body["error"] == case.error

    await _flush(seeded.server)
    persistence = seeded.server.services.persistence
    assert persistence.status().writes_issued == seeded.writes_issued
    assert persistence.status().pending_documents == 0
    assert await _snapshot(seeded.firestore) == seeded.snapshot
    assert await _views(seeded.http) == seeded.views
    assert seeded.server.services.interruptions.count("s-alice") == 1


@pytest.mark.firestore
@module_loop
async def test_an_oversized_chunked_body_is_refused_without_a_length(seeded: Seeded) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"role": "user", "content": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    response = await seeded.http.post(
        HISTORY, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json() == {
        "success": False,
        "error": f"Request body is larger than {BODY_LIMIT} bytes",
        "code": "payload_too_large",
    }
    await _flush(seeded.server)
    assert await _snapshot(seeded.firestore) == seeded.snapshot


# -- the parser on its own ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"  ", "Request body must be a JSON object; it is empty"),
        (b'"text"', "Request body must be a JSON object, not a string"),
        (b"null", "Request body must be a JSON object, not null"),
        (b"1" * 5000, "Malformed JSON: a number is too large"),
        (b"[" * 100_000, "Malformed JSON: nested too deeply"),
        (b'{"a": -Infinity}', "Malformed JSON: -Infinity is not valid JSON"),
        (b'{"\\udc00": 1}', "body has a key with a lone surrogate"),
    ],
)
def test_parse_object_refuses_what_is_not_one_json_object(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_object(raw)
    assert info.value.message == message


def test_parse_object_accepts_a_bom_and_unicode() -> None:
    assert parse_object('\ufeff{"नमस्ते": "🙂"}'.encode()) == {"नमस्ते": "🙂"}


# -- never a 500 ------------------------------------------------------------------------


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null", "big", "unicode"]
    if depth < 4:
        kinds += ["list", "dict", "dict"]
    kind = rng.choice(kinds)
    if kind == "str":
        return rng.choice(["", "user", "assistant", "stats", "..", "__x__", "a/b", "x" * 200])
    if kind == "unicode":
        return "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(1, 8)))
    if kind == "int":
        return rng.randrange(-(2**70), 2**70)
    if kind == "float":
        return rng.uniform(-1e300, 1e300)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "big":
        return "b" * rng.randrange(1000, 70_000)
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["sessionId", "userId", "role", "content", "language", "metadata", "__name__", "k"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


SEGMENTS = [
    *("u1", "s1", "stats", "create", "refresh", "user", "end", "state", "history"),
    *("%2E%2E", "%2F", "a%2Fb", "%00", "__a__", "x" * 129, "%20pad", "", "%F0%9F%99%82"),
]


def _random_segment(rng: random.Random) -> str:
    return rng.choice(SEGMENTS)


async def test_random_requests_never_get_a_500() -> None:
    rng = random.Random(20250110)
    templates = [
        "/api/session/{a}/state",
        "/api/session/{a}/profile",
        "/api/session/{a}/history",
        "/api/session/{a}/preferences",
        "/api/session/{a}",
        "/api/session/{a}/end",
        "/api/session/user/{a}/active",
        "/api/session/user/{a}/sessions",
        "/api/session/{a}/{b}",
        "/api/session/create",
        "/api/session/refresh",
        "/api/session/stats",
    ]
    settings = Settings(store="memory", max_merged_object_bytes=MERGE_LIMIT)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        for _ in range(400):
            path = rng.choice(templates).format(a=_random_segment(rng), b=_random_segment(rng))
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
            params = {}
            if rng.random() < 0.3:
                params = {rng.choice(["limit", "status", "cursor"]): _random_segment(rng)}
            headers = {"Content-Type": "application/json"}
            if rng.random() < 0.2:
                headers["X-Device-ID"] = rng.choice(["dev-1", "", "a/b", "x" * 300])
            if rng.random() < 0.2:
                content = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            else:
                content = json.dumps(_random_value(rng)).encode()
            response = await http.request(
                method, path, content=content, headers=headers, params=params
            )
            assert response.status_code < 500, (method, path, response.text)
            if response.is_redirect:
                # A trailing slash (an empty last segment): Starlette redirects
                # to the path without it.
                assert response.status_code == 307 and path.endswith("/")
                continue
            body = response.json()
            if response.status_code >= 400:
                assert set(body) == {"success", "error", "code"} and body["success"] is False
