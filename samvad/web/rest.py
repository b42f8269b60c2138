"""The REST session API, wire-compatible with the original backend.

The original's eleven endpoints keep their paths, methods, field names and
``message`` strings; what is added (status lifecycle, paginated listings,
recent history, preferences, device id) is additive. ``docs/api.md`` is the
reference, ``/openapi.json`` the machine-readable description.

Handlers only translate: they identify the caller, parse and validate the
request, call the use case (:class:`samvad.service.SessionService`, where the
rules live: who may act for whom, whose a session is, what ending and erasing
do) and shape its result as the original's JSON. Every handler validates the
whole request before the use case writes anything, so a rejected request
changes nothing stored; errors are raised as :class:`samvad.errors.SamvadError`
and rendered by ``samvad.web.http_errors``.

With authentication on (``SAMVAD_AUTH=firebase``, see ``samvad.web.auth``) a
caller acting for another user is refused (403) before the request body is
even parsed; the use case checks it again as its own rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from samvad.clock import to_iso
from samvad.errors import (
    BadRequest,
    InvalidField,
)
from samvad.logs import bind_log_context
from samvad.models import Role, SessionStatus
from samvad.principal import Principal
from samvad.service import SessionService
from samvad.stores.base import SessionCursor
from samvad.validation import check_id, check_object, check_session_id
from samvad.web import openapi
from samvad.web.auth import authenticate
from samvad.web.requests_json import read_json_object
from samvad.web.services import services
from samvad.web.wire import (
    jsonable,
    message_json,
    profile_json,
    session_json,
    state_json,
    status_fields,
)

PREFIX = "/api/session"
DEVICE_HEADER = "x-device-id"
MAX_LANGUAGE_LENGTH = 64
MAX_CURSOR_LENGTH = 1024
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
DEFAULT_HISTORY_LIMIT = 20


def ok(**fields: Any) -> JSONResponse:
    """A success response: ``{"success": true, ...fields}``."""
    return JSONResponse({"success": True, **fields})


# -- request parts -------------------------------------------------------------------


def _user_id(request: Request) -> str:
    return check_id(request.path_params["userId"], "userId")


def _session_id(request: Request) -> str:
    session_id = check_session_id(request.path_params["sessionId"], "sessionId")
    bind_log_context(session_id=session_id)
    return session_id


async def _caller(request: Request) -> Principal:
    """Who is calling (everyone may act for anyone while authentication is off)."""
    svc = services(request)
    return await authenticate(svc.settings, svc.verify_token, request.headers)


def _use_cases(request: Request) -> SessionService:
    return services(request).service


async def _body(request: Request) -> dict[str, Any]:
    return await read_json_object(request, limit=services(request).settings.max_body_bytes)


def _int_query(request: Request, name: str, *, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    raw = raw.strip()
    # Bounded before int(): Python refuses to parse thousands of digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and lo <= int(raw) <= hi):
        raise InvalidField(name, f"must be an integer between {lo} and {hi}")
    return int(raw)


def _required(body: Mapping[str, Any], name: str) -> Any:
    value = body.get(name)
    if value is None:
        raise InvalidField(name, "is required")
    return value


def _language(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField("language", "must be a string")
    if not value or len(value) > MAX_LANGUAGE_LENGTH or not value.isprintable():
        raise InvalidField("language", f"must be 1 to {MAX_LANGUAGE_LENGTH} printable characters")
    return value


# -- the original's endpoints --------------------------------------------------------


async def save_state(request: Request) -> JSONResponse:
    """``POST /api/session/{userId}/state``: merge the body into the user's state."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    body = check_object(await _body(request), "state")
    await _use_cases(request).save_state(principal, user_id, body)
    return ok(message="User state saved successfully", userId=user_id)


async def get_state(request: Request) -> JSONResponse:
    """``GET /api/session/{userId}/state``."""
    principal = await _caller(request)
    user_id = _user_id(request)
    state = await _use_cases(request).get_state(principal, user_id)
    return ok(userId=user_id, state=state_json(state))


async def get_profile(request: Request) -> JSONResponse:
    """``GET /api/session/{userId}/profile``: the profile with its bounded history."""
    principal = await _caller(request)
    user_id = _user_id(request)
    profile = await _use_cases(request).get_profile(principal, user_id)
    return ok(userId=user_id, profile=profile_json(profile))


async def append_history(request: Request) -> JSONResponse:
    """``POST /api/session/{userId}/history``: append one message."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    body = await _body(request)
    role_raw = _required(body, "role")
    if not isinstance(role_raw, str):
        raise InvalidField("role", "must be a string")
    try:
        role = Role(role_raw)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise InvalidField("role", f"must be one of {allowed}") from None
    content = _required(body, "content")
    if not isinstance(content, str):
        raise InvalidField("content", "must be a string")
    if not content:
        raise InvalidField("content", "must not be empty")
    session_id = body.get("sessionId")
    if session_id is not None:
        session_id = check_session_id(session_id)
    message = await _use_cases(request).append_message(
        principal, user_id, role=role, content=content, session_id=session_id
    )
    return ok(
        message="Message appended to history",
        userId=user_id,
        messageId=message.id,
        timestamp=to_iso(message.timestamp),
    )


async def create_session(request: Request) -> JSONResponse:
    """``POST /api/session/create``: create a session, or update and re-activate it."""
    principal = await _caller(request)
    body = await _body(request)
    session_id = check_session_id(_required(body, "sessionId"))
    user_id = check_id(_required(body, "userId"), "userId")
    principal.require_user(user_id)
    bind_log_context(user_id=user_id, session_id=session_id)
    language = _language(body.get("language"))
    raw_metadata = body.get("metadata")
    metadata = check_object(raw_metadata, "metadata") if raw_metadata is not None else {}
    device = request.headers.get(DEVICE_HEADER)
    if device is not None:
        metadata["deviceId"] = check_id(device, "X-Device-ID")
    session = await _use_cases(request).create_session(
        principal, session_id=session_id, user_id=user_id, language=language, metadata=metadata
    )
    return ok(
        message="Session created/updated successfully",
        sessionId=session_id,
        userId=user_id,
        session=session_json(session, session.status),
    )


async def get_session(request: Request) -> JSONResponse:
    """``GET /api/session/{sessionId}``."""
    principal = await _caller(request)
    session_id = _session_id(request)
    session, status = await _use_cases(request).get_session(principal, session_id)
    return ok(session=session_json(session, status))


async def end_session(request: Request) -> JSONResponse:
    """``PUT /api/session/{sessionId}/end``: ends the live side too, as ``end`` does."""
    principal = await _caller(request)
    session_id = _session_id(request)
    await _use_cases(request).end_session(principal, session_id)
    return ok(message="Session ended successfully", sessionId=session_id)


async def active_sessions(request: Request) -> JSONResponse:
    """``GET /api/session/user/{userId}/active``: active sessions, newest first."""
    principal = await _caller(request)
    user_id = _user_id(request)
    sessions = await _use_cases(request).active_sessions(principal, user_id)
    return ok(
        userId=user_id,
        count=len(sessions),
        sessions=[session_json(s, SessionStatus.ACTIVE) for s in sessions],
    )


async def refresh_user(request: Request) -> JSONResponse:
    """``POST /api/session/refresh``: erase everything of a user, live sessions included."""
    principal = await _caller(request)
    body = await _body(request)
    user_id = check_id(_required(body, "userId"), "userId")
    erased = await _use_cases(request).refresh_user(principal, user_id)
    return ok(
        message="User data cleared successfully",
        userId=user_id,
        cleared={
            "userState": erased.user_state,
            "userProfile": erased.user_profile,
            "sessions": erased.sessions,
            "interruptions": erased.interruptions,
        },
    )


async def delete_session(request: Request) -> JSONResponse:
    """``DELETE /api/session/{sessionId}``: the session, its interruptions and live channel."""
    principal = await _caller(request)
    session_id = _session_id(request)
    erased = await _use_cases(request).delete_session(principal, session_id)
    return ok(
        message="Session cleared successfully",
        sessionId=session_id,
        cleared={"session": erased.session, "interruptions": erased.interruptions},
    )


async def stats(request: Request) -> JSONResponse:
    """``GET /api/session/stats``: count aggregations plus the persistence status.

    Global figures: with authentication on, for the service key only.
    """
    figures = await _use_cases(request).stats(await _caller(request))
    return ok(
        stats={
            "activeUsers": figures.active_users,
            "activeSessions": figures.active_sessions,
            "totalProfiles": figures.total_profiles,
            "totalInterruptions": figures.total_interruptions,
            "persistedInterruptions": figures.persisted_interruptions,
            "liveInterruptions": figures.live_interruptions,
            "source": figures.source,
            **status_fields(figures.persistence),
        }
    )


# -- additions -----------------------------------------------------------------------


async def list_sessions(request: Request) -> JSONResponse:
    """``GET /api/session/user/{userId}/sessions?status=&limit=&cursor=``."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    status: SessionStatus | None = None
    raw_status = request.query_params.get("status")
    if raw_status is not None:
        try:
            status = SessionStatus(raw_status)
        except ValueError:
            allowed = ", ".join(s.value for s in SessionStatus)
            raise InvalidField("status", f"must be one of {allowed}") from None
    limit = _int_query(request, "limit", default=DEFAULT_PAGE_SIZE, lo=1, hi=MAX_PAGE_SIZE)
    cursor = None
    raw_cursor = request.query_params.get("cursor")
    if raw_cursor is not None:
        if not raw_cursor or len(raw_cursor) > MAX_CURSOR_LENGTH:
            raise BadRequest("cursor is not a cursor this server issued")
        cursor = SessionCursor.decode(raw_cursor)
        try:
            check_id(cursor.session_id, "cursor")
        except InvalidField:
            raise BadRequest("cursor is not a cursor this server issued") from None
    sessions, next_cursor = await _use_cases(request).list_sessions(
        principal, user_id, status=status, limit=limit, cursor=cursor
    )
    return ok(
        userId=user_id,
        count=len(sessions),
        sessions=[session_json(s, effective) for s, effective in sessions],
        nextCursor=next_cursor,
    )


async def recent_history(request: Request) -> JSONResponse:
    """``GET /api/session/{userId}/history?limit=N``: the last N messages, oldest first."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    cap = services(request).settings.history_cap
    limit = _int_query(request, "limit", default=min(DEFAULT_HISTORY_LIMIT, cap), lo=1, hi=cap)
    messages, length = await _use_cases(request).recent_history(principal, user_id, limit)
    return ok(
        userId=user_id,
        count=len(messages),
        historyLength=length,
        messages=[message_json(m) for m in messages],
    )


async def set_preferences(request: Request) -> JSONResponse:
    """``PUT /api/session/{userId}/preferences``: merge preferences key by key."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    prefs = check_object(await _body(request), "preferences")
    if not prefs:
        raise InvalidField("preferences", "must hold at least one key")
    merged = await _use_cases(request).set_preferences(principal, user_id, prefs)
    return ok(
        message="Preferences saved successfully", userId=user_id, preferences=jsonable(merged)
    )


# One route per path, so a wrong method answers 405 with the full Allow header.


async def user_state(request: Request) -> JSONResponse:
    """``GET`` or ``POST /api/session/{userId}/state``."""
    return await (save_state if request.method == "POST" else get_state)(request)


async def history(request: Request) -> JSONResponse:
    """``GET`` or ``POST /api/session/{userId}/history``."""
    return await (append_history if request.method == "POST" else recent_history)(request)


async def session(request: Request) -> JSONResponse:
    """``GET`` or ``DELETE /api/session/{sessionId}``."""
    return await (delete_session if request.method == "DELETE" else get_session)(request)


async def openapi_document(request: Request) -> JSONResponse:
    """``GET /openapi.json``."""
    return JSONResponse(openapi.document())


async def malformed_path(request: Request) -> JSONResponse:
    """Any request :class:`_MalformedPath` caught."""
    raise BadRequest("Identifiers in the path must not be empty or contain '/' (%2F)")


class _MalformedPath(Route):
    """Catches ``/api/session/...`` paths with an encoded ``/`` or an empty segment.

    The server decodes ``%2F`` before routing, so ``a%2Fstate`` would otherwise
    reach another endpoint as two segments; these answer 400 before any route
    can be confused by them.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        text = raw.split(b"?", 1)[0].decode("latin-1")
        if not text.startswith(PREFIX + "/"):
            return Match.NONE, {}
        inner = text[len(PREFIX) + 1 :]
        if "%2f" in inner.lower() or inner.startswith("/") or "//" in inner:
            return super().matches(scope)
        return Match.NONE, {}


_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def routes() -> list[BaseRoute]:
    """The REST routes, mounted at the root of the app.

    Literal paths come before parameterised ones, and every session id is
    validated against the literal words, so ``stats``, ``create``, ``refresh``
    and ``user`` can never be taken for a session.
    """
    p = PREFIX
    return [
        _MalformedPath(f"{p}/{{rest:path}}", malformed_path, methods=_ALL_METHODS),
        Route("/openapi.json", openapi_document, methods=["GET"]),
        Route(f"{p}/stats", stats, methods=["GET"]),
        Route(f"{p}/create", create_session, methods=["POST"]),
        Route(f"{p}/refresh", refresh_user, methods=["POST"]),
        Route(f"{p}/user/{{userId}}/active", active_sessions, methods=["GET"]),
        Route(f"{p}/user/{{userId}}/sessions", list_sessions, methods=["GET"]),
        Route(f"{p}/{{userId}}/state", user_state, methods=["GET", "POST"]),
        Route(f"{p}/{{userId}}/profile", get_profile, methods=["GET"]),
        Route(f"{p}/{{userId}}/history", history, methods=["GET", "POST"]),
        Route(f"{p}/{{userId}}/preferences", set_preferences, methods=["PUT"]),
        Route(f"{p}/{{sessionId}}/end", end_session, methods=["PUT"]),
        Route(f"{p}/{{sessionId}}", session, methods=["GET", "DELETE"]),
    ]
