"""The API documents, generated from ``samvad.web.schemas``: OpenAPI 3.1 for the
REST API (``/openapi.json``) and AsyncAPI 3.0 for the WebSocket (``/asyncapi.json``).

The shapes come from the structs that also decode requests and encode
responses, so the documents cannot drift from what the server does; the
tables below add only what a type cannot say (paths, summaries, status codes).
``tests/web/test_schemathesis.py`` checks real responses against the OpenAPI
document, ``tests/web/test_apidocs.py`` real frames against the AsyncAPI one.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import Struct, UnsetType
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from samvad import __version__
from samvad.models import SessionStatus
from samvad.web import schemas as s
from samvad.web.protocol import PROTOCOL_VERSION

__all__ = ["asyncapi_document", "openapi_document", "routes"]

Schema = dict[str, Any]
_OPENAPI_REF = "#/components/schemas/{name}"


@dataclass(frozen=True, slots=True)
class _Op:
    """One REST operation: what a type cannot say about it."""

    method: str
    path: str
    summary: str
    response: type[Struct] | None
    errors: tuple[int, ...] = ()
    body: Any = None
    example: Any = None
    description: str | None = None
    query: tuple[tuple[str, Schema, str], ...] = ()
    headers: tuple[tuple[str, Schema, str], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


_IDEMPOTENCY = (
    (
        "Idempotency-Key",
        msgspec.json.schema(s.IdempotencyKey),
        "Makes a retry of this write safe (see docs/api.md).",
    ),
)
_LIMIT = {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
_API = "/api/session"

_OPS: tuple[_Op, ...] = (
    _Op(
        "post",
        f"{_API}/{{userId}}/state",
        "Save (merge) a user's session state",
        s.StateSaved,
        (413, 422, 503),
        body=s.JsonObject,
        example={"language": "en", "conversationContext": {"topic": "home loans"}},
        description="Each top-level field replaces the stored one; updatedAt and isActive "
        "are set by the server. The merged state is bounded in top-level keys, fields and "
        "bytes (SAMVAD_MAX_OBJECT_KEYS, SAMVAD_MAX_OBJECT_FIELDS, "
        "SAMVAD_MAX_MERGED_OBJECT_BYTES).",
        headers=_IDEMPOTENCY,
    ),
    _Op("get", f"{_API}/{{userId}}/state", "Get a user's session state", s.StateFound, (404,)),
    _Op(
        "get",
        f"{_API}/{{userId}}/profile",
        "Get a user's profile with the last 100 messages",
        s.ProfileFound,
        (404,),
    ),
    _Op(
        "post",
        f"{_API}/{{userId}}/history",
        "Append a message to a user's history",
        s.MessageAppended,
        (409, 413, 422, 503),
        body=s.HistoryBody,
        example={"role": "user", "content": "What documents do I need?"},
        description="A sessionId of null is the same as none.",
        headers=_IDEMPOTENCY,
    ),
    _Op(
        "get",
        f"{_API}/{{userId}}/history",
        "The last N messages of a user's history, oldest first",
        s.RecentHistory,
        query=(("limit", _LIMIT, "How many messages (at most the history cap)."),),
    ),
    _Op(
        "put",
        f"{_API}/{{userId}}/preferences",
        "Merge preferences into a user's profile (key by key)",
        s.PreferencesSaved,
        (413, 503),
        body=s.JsonObject,
        example={"language": "hi", "voiceSpeed": 1.2},
        extra={"minProperties": 1},
    ),
    _Op(
        "post",
        f"{_API}/create",
        "Create a session, or update and re-activate it",
        s.SessionSaved,
        (409, 413, 422, 503),
        body=s.CreateSessionBody,
        example={"sessionId": "session_123", "userId": "user_456", "language": "en"},
        headers=(
            ("X-Device-ID", msgspec.json.schema(s.Id), "Recorded as metadata.deviceId."),
            *_IDEMPOTENCY,
        ),
    ),
    _Op("get", f"{_API}/{{sessionId}}", "Get a session", s.SessionFound, (404,)),
    _Op(
        "delete",
        f"{_API}/{{sessionId}}",
        "Delete a session and its interruptions",
        s.SessionDeleted,
        (404, 429, 503),
    ),
    _Op("put", f"{_API}/{{sessionId}}/end", "End a session", s.SessionEnded, (404, 503)),
    _Op(
        "get",
        f"{_API}/user/{{userId}}/active",
        "A user's active sessions, most recent first (at most 100)",
        s.ActiveSessions,
    ),
    _Op(
        "get",
        f"{_API}/user/{{userId}}/sessions",
        "A page of a user's sessions, most recent activity first",
        s.SessionPage,
        query=(
            (
                "status",
                msgspec.json.schema(SessionStatus),
                "Only sessions of this status (abandoned includes active sessions idle "
                "past the time-out).",
            ),
            ("limit", _LIMIT, "Page size."),
            ("cursor", {"type": "string"}, "nextCursor of the previous page."),
        ),
    ),
    _Op(
        "post",
        f"{_API}/refresh",
        "Erase a user's state, profile, sessions and interruptions",
        s.UserRefreshed,
        (413, 429, 503),
        body=s.RefreshBody,
        example={"userId": "user_456"},
        description="In Firestore and in memory, pending writes included.",
    ),
    _Op(
        "get",
        f"{_API}/stats",
        "Counts (Firestore count aggregations) and the persistence status",
        s.StatsFound,
    ),
)

_ERRORS = {
    400: "Malformed JSON (also NaN, duplicate keys), a wrong or missing field, an invalid id "
    "(in the path: also percent-encoded bytes that are not UTF-8)",
    401: "Credentials missing or invalid (authentication on)",
    403: "The credentials do not give access to this user's data (or, for stats, are not a "
    "service key)",
    404: "Not found",
    409: "The session belongs to another user",
    413: "Body larger than the limit (64 KiB by default), or a merge past the byte bound",
    422: "The Idempotency-Key was already used with a different request",
    429: "Too many requests for this user; see the Retry-After header",
    503: "Too many writes wait for Firestore, or credentials cannot be checked right now, or "
    "Firestore is unreachable and the answer needs data this server does not hold in memory "
    "(data_unavailable); retry shortly (see the Retry-After header)",
}

_SECURITY_SCHEMES: dict[str, Schema] = {
    "firebaseIdToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A Firebase ID token of the user whose data is addressed "
        "(only with SAMVAD_AUTH=firebase).",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "A service key of SAMVAD_API_KEYS: may act for any user. "
        "Also accepted as 'Authorization: Bearer <key>'.",
    },
}
# With SAMVAD_AUTH=off (the default) no credentials are needed.
_API_SECURITY: list[dict[str, list[str]]] = [{"firebaseIdToken": []}, {"apiKey": []}, {}]


def _is_optional(annotation: Any) -> bool:
    return UnsetType in s.type_candidates(annotation)


def _components(types: list[Any], ref_template: str) -> tuple[list[Schema], dict[str, Schema]]:
    """JSON Schemas of ``types`` and their components; every field of a shape the
    server writes is marked required unless it may be left out (``UNSET``)."""
    refs, components = msgspec.json.schema_components(types, ref_template=ref_template)
    for shape in s.OUTPUT_TYPES:
        schema = components.get(shape.__name__)
        if schema is None:
            continue
        fields = msgspec.structs.fields(shape)
        names = {f.encode_name for f in fields}
        tag = [name for name in schema.get("required", []) if name not in names]  # "type"
        schema["required"] = tag + [f.encode_name for f in fields if not _is_optional(f.type)]
    return list(refs), components


def _json(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_response(code: int) -> dict[str, Any]:
    return {
        "description": _ERRORS[code],
        "content": _json({"$ref": "#/components/schemas/ErrorBody"}),
    }


def _path_parameters(path: str, id_schema: Schema, session_schema: Schema) -> list[Schema]:
    params = []
    if "{userId}" in path:
        params.append({"name": "userId", "in": "path", "required": True, "schema": id_schema})
    if "{sessionId}" in path:
        params.append(
            {"name": "sessionId", "in": "path", "required": True, "schema": session_schema}
        )
    return params


@functools.cache
def _openapi() -> dict[str, Any]:
    bodies = [op.body for op in _OPS if op.body is not None]
    responses = [op.response for op in _OPS if op.response is not None]
    extra_types = [s.ErrorBody, s.Health, s.Ready, s.NotReady]
    types = [*responses, *bodies, *extra_types, s.Id, s.SessionId]
    refs, components = _components(types, _OPENAPI_REF)
    ref_of = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in _OPS:
        assert op.response is not None
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path}",
            "security": copy.deepcopy(_API_SECURITY),
            "parameters": _path_parameters(op.path, ref_of[s.Id], ref_of[s.SessionId]),
            "responses": {
                "200": {"description": "Success", "content": _json(ref_of[op.response])},
                **{
                    str(code): _error_response(code)
                    for code in sorted({400, 401, 403, 503, *op.errors})
                },
            },
        }
        if op.description:
            operation["description"] = op.description
        if _IDEMPOTENCY[0] in op.headers:
            operation["responses"]["200"]["headers"] = {
                "Idempotent-Replayed": {
                    "description": "true when this is the recorded answer to an "
                    "Idempotency-Key used before (nothing was written)",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            }
        for name, schema, text in op.query:
            operation["parameters"].append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": schema,
                    "description": text,
                }
            )
        for name, schema, text in op.headers:
            operation["parameters"].append(
                {
                    "name": name,
                    "in": "header",
                    "required": False,
                    "schema": schema,
                    "description": text,
                }
            )
        if op.body is not None:
            schema = {"allOf": [ref_of[op.body]], **op.extra} if op.extra else ref_of[op.body]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema, "example": op.example}},
            }
        paths.setdefault(op.path, {})[op.method] = operation
    plain: dict[str, Any] = {"security": []}
    paths["/healthz"] = {
        "get": {
            **plain,
            "summary": "Liveness, with the persistence mode and write backlog",
            "responses": {"200": {"description": "Alive", "content": _json(ref_of[s.Health])}},
        }
    }
    paths["/readyz"] = {
        "get": {
            **plain,
            "summary": "Readiness: 200 once started and until shutdown begins, else 503",
            "responses": {
                "200": {
                    "description": "Ready (also in memory-only mode, which still serves)",
                    "content": _json(ref_of[s.Ready]),
                },
                "503": {
                    "description": "Starting or shutting down",
                    "content": _json(ref_of[s.NotReady]),
                },
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            **plain,
            "summary": "Prometheus metrics (text exposition format); keep it internal",
            "responses": {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    for doc_path, what in (("/openapi.json", "OpenAPI 3.1"), ("/asyncapi.json", "AsyncAPI 3.0")):
        paths[doc_path] = {
            "get": {
                **plain,
                "summary": f"This API's {what} document",
                "responses": {"200": {"description": what, "content": _json({"type": "object"})}},
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Samvad session API",
            "version": __version__,
            "description": "Wire-compatible with the original backend's REST API. Every error "
            "is {success: false, error: message, code}. Authentication is off by default; with "
            "SAMVAD_AUTH=firebase every /api/session endpoint needs a Firebase ID token or a "
            "service API key (docs/deploy.md). The WebSocket protocol is described by "
            "/asyncapi.json.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": _SECURITY_SCHEMES},
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy each time)."""
    return copy.deepcopy(_openapi())


def _tag(frame: type[Struct]) -> str:
    tag = frame.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


@functools.cache
def _asyncapi() -> dict[str, Any]:
    frames = [*s.CLIENT_FRAMES, *s.SERVER_FRAMES]
    _, schemas = _components(frames, "#/components/schemas/{name}")
    messages = {
        frame.__name__: {
            "name": _tag(frame),
            "title": f"{_tag(frame)} ({'client' if frame in s.CLIENT_FRAMES else 'server'})",
            "summary": (frame.__doc__ or _tag(frame)).strip().splitlines()[0],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{frame.__name__}"},
        }
        for frame in frames
    }
    channel_messages = {name: {"$ref": f"#/components/messages/{name}"} for name in messages}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Samvad real-time protocol",
            "version": __version__,
            "description": f"Protocol version {PROTOCOL_VERSION}. One WebSocket, JSON text "
            "frames tagged by type; see docs/protocol.md for the conversation, error codes "
            "and close codes.",
        },
        "defaultContentType": "application/json",
        "channels": {
            "session": {
                "address": "/ws",
                "title": "One conversation connection",
                "messages": channel_messages,
            }
        },
        "operations": {
            "receiveClientFrames": {
                "action": "receive",
                "channel": {"$ref": "#/channels/session"},
                "summary": "Frames a client sends (start first; ping allowed before it)",
                "messages": [
                    {"$ref": f"#/channels/session/messages/{f.__name__}"} for f in s.CLIENT_FRAMES
                ],
            },
            "sendServerFrames": {
                "action": "send",
                "channel": {"$ref": "#/channels/session"},
                "summary": "Frames the server sends",
                "messages": [
                    {"$ref": f"#/channels/session/messages/{f.__name__}"} for f in s.SERVER_FRAMES
                ],
            },
        },
        "components": {"schemas": schemas, "messages": messages},
    }


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``/ws`` (a fresh copy each time)."""
    return copy.deepcopy(_asyncapi())


async def _openapi_endpoint(request: Request) -> JSONResponse:
    """``GET /openapi.json``."""
    return JSONResponse(_openapi())


async def _asyncapi_endpoint(request: Request) -> JSONResponse:
    """``GET /asyncapi.json``."""
    return JSONResponse(_asyncapi())


def routes() -> list[BaseRoute]:
    """The routes serving both documents."""
    return [
        Route("/openapi.json", _openapi_endpoint, methods=["GET"]),
        Route("/asyncapi.json", _asyncapi_endpoint, methods=["GET"]),
    ]
