"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

Written by hand as data: the handlers read untyped JSON, so there is nothing to
generate it from, and a test checks that every route of the app is described.
"""

from __future__ import annotations

import copy
from typing import Any

from samvad import __version__

Schema = dict[str, Any]

_TIMESTAMP: Schema = {
    "type": "string",
    "format": "date-time",
    "description": "ISO-8601 UTC with milliseconds, e.g. 2025-01-10T17:00:00.000Z",
    "examples": ["2025-01-10T17:00:00.000Z"],
}
_ID: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "description": "No '/', no control characters, not '.' or '..', not of the form __name__.",
}
_SESSION_ID: Schema = {
    **_ID,
    "not": {"enum": ["stats", "create", "refresh", "user"]},
    "description": _ID["description"] + " Not one of stats, create, refresh, user.",
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"oneOf": [schema, {"type": "null"}]}


def _obj(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


def _success(**properties: Schema) -> Schema:
    return _obj(
        ["success", *properties],
        success={"const": True},
        **properties,
    )


def _message(text: str) -> Schema:
    return {"const": text}


_SCHEMAS: dict[str, Schema] = {
    "Error": _obj(
        ["success", "error"],
        success={"const": False},
        error={"type": "string", "description": "What was wrong, naming the field."},
    ),
    "JsonObject": {
        "type": "object",
        "description": "Any JSON object Firestore can store: no arrays directly inside "
        "arrays, no keys of the form __name__, integers within 64 bits, finite numbers, "
        "at most 20 levels deep.",
        "additionalProperties": True,
    },
    "Message": _obj(
        ["id", "role", "content", "timestamp"],
        id={"type": "string"},
        role={"enum": ["user", "assistant", "system"]},
        content={"type": "string"},
        timestamp=_TIMESTAMP,
        sessionId={"type": "string"},
        interrupted={"type": "boolean"},
        seq={"type": "integer"},
    ),
    "UserState": {
        "type": "object",
        "description": "The fields the client saved, plus updatedAt and isActive.",
        "required": ["updatedAt", "isActive"],
        "properties": {"updatedAt": _nullable(_TIMESTAMP), "isActive": {"type": "boolean"}},
        "additionalProperties": True,
    },
    "Profile": _obj(
        [
            "userId",
            "conversationHistory",
            "preferences",
            "historyLength",
            "createdAt",
            "lastUpdated",
        ],
        userId={"type": "string"},
        conversationHistory={
            "type": "array",
            "maxItems": 100,
            "items": _ref("Message"),
            "description": "Oldest first; only the last 100 messages are kept.",
        },
        preferences=_ref("JsonObject"),
        historyLength={"type": "integer"},
        createdAt=_nullable(_TIMESTAMP),
        lastUpdated=_nullable(_TIMESTAMP),
    ),
    "Session": _obj(
        [
            "id",
            "userId",
            "language",
            "metadata",
            "isActive",
            "status",
            "createdAt",
            "lastActivity",
            "endedAt",
            "expireAt",
        ],
        id={"type": "string"},
        userId={"type": "string"},
        language=_nullable({"type": "string"}),
        metadata=_ref("JsonObject"),
        isActive={"type": "boolean"},
        status={
            "enum": ["active", "ended", "abandoned"],
            "description": "An active session idle longer than the idle time-out is "
            "reported abandoned.",
        },
        createdAt=_nullable(_TIMESTAMP),
        lastActivity=_nullable(_TIMESTAMP),
        endedAt=_nullable(_TIMESTAMP),
        expireAt=_nullable(
            {**_TIMESTAMP, "description": "When a Firestore TTL policy may delete the session."}
        ),
    ),
    "Stats": {
        **_obj(
            [
                "activeUsers",
                "activeSessions",
                "totalProfiles",
                "totalInterruptions",
                "source",
                "mode",
                "pendingWrites",
            ],
            activeUsers={"type": "integer"},
            activeSessions={"type": "integer"},
            totalProfiles={"type": "integer"},
            totalInterruptions={"type": "integer"},
            persistedInterruptions={"type": "integer"},
            liveInterruptions={"type": "integer"},
            source={"enum": ["firestore", "memory"]},
            mode={"enum": ["firestore", "memory"]},
            backend={"type": "string"},
            pendingWrites={"type": "integer"},
            pendingInFlight={"type": "integer"},
            oldestPendingAgeSeconds={"type": "number"},
            replayLagSeconds={"type": "number"},
            writesIssued={"type": "integer"},
            writeFailures={"type": "integer"},
            modeSince=_TIMESTAMP,
            lastError=_nullable({"type": "string"}),
        ),
        "additionalProperties": True,
    },
}

_ERRORS = {
    "400": "Malformed JSON, a wrong or missing field, or an invalid id",
    "404": "Not found",
    "405": "Method not allowed",
    "409": "The session belongs to another user",
    "413": "Body larger than the limit (64 KiB by default)",
    "503": "Too many writes wait for Firestore; retry shortly",
}


def _responses(ok: Schema, *errors: str, description: str = "Success") -> dict[str, Any]:
    out: dict[str, Any] = {
        "200": {"description": description, "content": {"application/json": {"schema": ok}}}
    }
    for code in ("400", *errors):
        out[code] = {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    return out


def _path_param(name: str, schema: Schema) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _body(schema: Schema, example: Any) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": schema, "example": example}},
    }


_USER = _path_param("userId", _ID)
_SESSION = _path_param("sessionId", _SESSION_ID)

_PATHS: dict[str, Any] = {
    "/api/session/{userId}/state": {
        "parameters": [_USER],
        "post": {
            "summary": "Save (merge) a user's session state",
            "description": "Each top-level field replaces the stored one; updatedAt and "
            "isActive are set by the server.",
            "requestBody": _body(
                _ref("JsonObject"),
                {"language": "en", "conversationContext": {"topic": "home loans"}},
            ),
            "responses": _responses(
                _success(
                    message=_message("User state saved successfully"),
                    userId={"type": "string"},
                ),
                "413",
                "503",
            ),
        },
        "get": {
            "summary": "Get a user's session state",
            "responses": _responses(
                _success(userId={"type": "string"}, state=_ref("UserState")), "404"
            ),
        },
    },
    "/api/session/{userId}/profile": {
        "parameters": [_USER],
        "get": {
            "summary": "Get a user's profile with the last 100 messages",
            "responses": _responses(
                _success(userId={"type": "string"}, profile=_ref("Profile")), "404"
            ),
        },
    },
    "/api/session/{userId}/history": {
        "parameters": [_USER],
        "post": {
            "summary": "Append a message to a user's history",
            "requestBody": _body(
                _obj(
                    ["role", "content"],
                    role={"enum": ["user", "assistant", "system"]},
                    content={"type": "string", "minLength": 1},
                    sessionId=_SESSION_ID,
                ),
                {"role": "user", "content": "What documents do I need?"},
            ),
            "responses": _responses(
                _success(
                    message=_message("Message appended to history"),
                    userId={"type": "string"},
                    messageId={"type": "string"},
                    timestamp=_TIMESTAMP,
                ),
                "409",
                "413",
                "503",
            ),
        },
        "get": {
            "summary": "The last N messages of a user's history, oldest first",
            "parameters": [
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    "How many messages (at most the history cap).",
                )
            ],
            "responses": _responses(
                _success(
                    userId={"type": "string"},
                    count={"type": "integer"},
                    historyLength={"type": "integer"},
                    messages={"type": "array", "items": _ref("Message")},
                )
            ),
        },
    },
    "/api/session/{userId}/preferences": {
        "parameters": [_USER],
        "put": {
            "summary": "Merge preferences into a user's profile (key by key)",
            "requestBody": _body(
                {**_ref("JsonObject"), "minProperties": 1}, {"language": "hi", "voiceSpeed": 1.2}
            ),
            "responses": _responses(
                _success(
                    message=_message("Preferences saved successfully"),
                    userId={"type": "string"},
                    preferences=_ref("JsonObject"),
                ),
                "413",
                "503",
            ),
        },
    },
    "/api/session/create": {
        "post": {
            "summary": "Create a session, or update and re-activate it",
            "parameters": [
                {
                    "name": "X-Device-ID",
                    "in": "header",
                    "required": False,
                    "schema": _ID,
                    "description": "Recorded as metadata.deviceId.",
                }
            ],
            "requestBody": _body(
                _obj(
                    ["sessionId", "userId"],
                    sessionId=_SESSION_ID,
                    userId=_ID,
                    language={"type": "string", "minLength": 1, "maxLength": 64},
                    metadata=_ref("JsonObject"),
                ),
                {"sessionId": "session_123", "userId": "user_456", "language": "en"},
            ),
            "responses": _responses(
                _success(
                    message=_message("Session created/updated successfully"),
                    sessionId={"type": "string"},
                    userId={"type": "string"},
                    session=_ref("Session"),
                ),
                "409",
                "413",
                "503",
            ),
        },
    },
    "/api/session/{sessionId}": {
        "parameters": [_SESSION],
        "get": {
            "summary": "Get a session",
            "responses": _responses(_success(session=_ref("Session")), "404"),
        },
        "delete": {
            "summary": "Delete a session and its interruptions",
            "responses": _responses(
                _success(
                    message=_message("Session cleared successfully"),
                    sessionId={"type": "string"},
                    cleared=_obj(
                        ["session", "interruptions"],
                        session={"type": "boolean"},
                        interruptions={"type": "integer"},
                    ),
                ),
                "404",
                "503",
            ),
        },
    },
    "/api/session/{sessionId}/end": {
        "parameters": [_SESSION],
        "put": {
            "summary": "End a session",
            "responses": _responses(
                _success(
                    message=_message("Session ended successfully"),
                    sessionId={"type": "string"},
                ),
                "404",
                "503",
            ),
        },
    },
    "/api/session/user/{userId}/active": {
        "parameters": [_USER],
        "get": {
            "summary": "A user's active sessions, most recent first (at most 100)",
            "responses": _responses(
                _success(
                    userId={"type": "string"},
                    count={"type": "integer"},
                    sessions={"type": "array", "items": _ref("Session")},
                )
            ),
        },
    },
    "/api/session/user/{userId}/sessions": {
        "parameters": [_USER],
        "get": {
            "summary": "A page of a user's sessions, most recent activity first",
            "parameters": [
                _query(
                    "status",
                    {"enum": ["active", "ended", "abandoned"]},
                    "Only sessions of this status (abandoned includes active sessions "
                    "idle past the time-out).",
                ),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    "Page size.",
                ),
                _query("cursor", {"type": "string"}, "nextCursor of the previous page."),
            ],
            "responses": _responses(
                _success(
                    userId={"type": "string"},
                    count={"type": "integer"},
                    sessions={"type": "array", "items": _ref("Session")},
                    nextCursor=_nullable({"type": "string"}),
                )
            ),
        },
    },
    "/api/session/refresh": {
        "post": {
            "summary": "Erase a user's state, profile, sessions and interruptions",
            "description": "In Firestore and in memory, pending writes included.",
            "requestBody": _body(_obj(["userId"], userId=_ID), {"userId": "user_456"}),
            "responses": _responses(
                _success(
                    message=_message("User data cleared successfully"),
                    userId={"type": "string"},
                    cleared=_obj(
                        ["userState", "userProfile", "sessions", "interruptions"],
                        userState={"type": "boolean"},
                        userProfile={"type": "boolean"},
                        sessions={"type": "integer"},
                        interruptions={"type": "integer"},
                    ),
                ),
                "413",
                "503",
            ),
        },
    },
    "/api/session/stats": {
        "get": {
            "summary": "Counts (Firestore count aggregations) and the persistence status",
            "responses": _responses(_success(stats=_ref("Stats"))),
        },
    },
    "/healthz": {
        "get": {
            "summary": "Liveness, with the persistence mode and write backlog",
            "responses": {
                "200": {
                    "description": "Alive",
                    "content": {
                        "application/json": {
                            "schema": _obj(
                                ["status", "version", "persistence"],
                                status={"const": "ok"},
                                version={"type": "string"},
                                persistence={"type": "object"},
                            )
                        }
                    },
                }
            },
        },
    },
    "/readyz": {
        "get": {
            "summary": "Readiness: 200 once started and until shutdown begins, else 503",
            "responses": {
                "200": {
                    "description": "Ready (also in memory-only mode, which still serves)",
                    "content": {
                        "application/json": {
                            "schema": _obj(
                                ["ready", "mode"],
                                ready={"const": True},
                                mode={"enum": ["firestore", "memory"]},
                            )
                        }
                    },
                },
                "503": {
                    "description": "Starting or shutting down",
                    "content": {
                        "application/json": {"schema": _obj(["ready"], ready={"const": False})}
                    },
                },
            },
        },
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text exposition format); keep it internal",
            "responses": {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        },
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        },
    },
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
_AUTH_ERRORS = {
    "401": "Credentials missing or invalid (authentication on)",
    "403": "The credentials do not give access to this user's data (or, for stats, "
    "are not a service key)",
}
_RATE_LIMITED = {
    "/api/session/refresh": "post",
    "/api/session/{sessionId}": "delete",
}


_METHODS = ("get", "post", "put", "delete")


def _with_security(paths: dict[str, Any]) -> dict[str, Any]:
    for path, item in paths.items():
        operations = {m: op for m, op in item.items() if m in _METHODS}
        if not path.startswith("/api/"):
            for operation in operations.values():
                operation["security"] = []
            continue
        for method, operation in operations.items():
            operation["security"] = copy.deepcopy(_API_SECURITY)
            errors = dict(_AUTH_ERRORS)
            if _RATE_LIMITED.get(path) == method:
                errors["429"] = "Too many requests for this user; see the Retry-After header"
            for code, description in errors.items():
                operation["responses"][code] = {
                    "description": description,
                    "content": {"application/json": {"schema": _ref("Error")}},
                }
    return paths


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy each time)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Samvad session API",
            "version": __version__,
            "description": "Wire-compatible with the original backend's REST API. "
            "Every error is {success: false, error: message}. Authentication is off by "
            "default; with SAMVAD_AUTH=firebase every /api/session endpoint needs a "
            "Firebase ID token or a service API key (docs/deploy.md).",
        },
        "paths": _with_security(copy.deepcopy(_PATHS)),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": copy.deepcopy(_SECURITY_SCHEMES),
        },
    }
