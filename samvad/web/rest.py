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

from typing import Any, TypeVar

from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from samvad.clock import to_iso
from samvad.errors import (
    BadRequest,
    InvalidField,
)
from samvad.logs import bind_log_context
from samvad.models import SessionStatus
from samvad.principal import ANONYMOUS, Principal
from samvad.service import SessionService
from samvad.stores.base import SessionCursor
from samvad.validation import (
    check_id,
    check_language,
    check_message_text,
    check_object,
    check_session_id,
    decode_path_segment,
)
from samvad.web.auth import authenticate
from samvad.web.idempotency import claim_key, idempotent
from samvad.web.requests_json import decode_body, read_json_object
from samvad.web.schemas import (
    ActiveSessions,
    CreateSessionBody,
    HistoryBody,
    MessageAppended,
    PreferencesSaved,
    ProfileFound,
    RecentHistory,
    RefreshBody,
    SessionCleared,
    SessionDeleted,
    SessionEnded,
    SessionFound,
    SessionPage,
    SessionSaved,
    StateFound,
    StateSaved,
    StatsFound,
    UserCleared,
    UserRefreshed,
    WireResponse,
    history_messages,
    plain_json,
    profile_view,
    session_view,
    state_view_json,
    stats_view,
)
from samvad.web.services import services

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "DEFAULT_PAGE_SIZE",
    "DEVICE_HEADER",
    "MAX_CURSOR_LENGTH",
    "MAX_PAGE_SIZE",
    "PREFIX",
    "active_sessions",
    "append_history",
    "create_session",
    "delete_session",
    "end_session",
    "get_profile",
    "get_session",
    "get_state",
    "history",
    "is_path_guard",
    "list_sessions",
    "malformed_path",
    "ok",
    "recent_history",
    "refresh_user",
    "routes",
    "save_state",
    "session",
    "set_preferences",
    "stats",
    "user_state",
]

PREFIX = "/api/session"
DEVICE_HEADER = "x-device-id"
MAX_CURSOR_LENGTH = 1024
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
DEFAULT_HISTORY_LIMIT = 20


_B = TypeVar("_B", bound=Struct)


def ok(shape: Struct) -> Response:
    """A success response: one of the ``{"success": true, ...}`` shapes of ``schemas``."""
    return WireResponse(shape)


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
    if svc.settings.auth == "off":
        return ANONYMOUS  # without building the request's headers
    return await authenticate(svc.settings, svc.verify_token, request.headers)


def _use_cases(request: Request) -> SessionService:
    return services(request).service


async def _body(request: Request) -> dict[str, Any]:
    return await read_json_object(request, limit=services(request).settings.max_body_bytes)


async def _typed_body(request: Request, shape: type[_B]) -> _B:
    return await decode_body(request, shape, limit=services(request).settings.max_body_bytes)


def _int_query(request: Request, name: str, *, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    raw = raw.strip()
    # Bounded before int(): Python refuses to parse thousands of digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and lo <= int(raw) <= hi):
        raise InvalidField(name, f"must be an integer between {lo} and {hi}")
    return int(raw)


# -- the original's endpoints --------------------------------------------------------


@idempotent("state")
async def save_state(request: Request) -> Response:
    """``POST /api/session/{userId}/state``: merge the body into the user's state."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    body = check_object(await _body(request), "state")
    await claim_key(request, user_id, body)
    await _use_cases(request).save_state(principal, user_id, body)
    return ok(StateSaved(user_id=user_id))


async def get_state(request: Request) -> Response:
    """``GET /api/session/{userId}/state``."""
    principal = await _caller(request)
    user_id = _user_id(request)
    state = await _use_cases(request).get_state(principal, user_id)
    return ok(StateFound(user_id=user_id, state=state_view_json(state)))


async def get_profile(request: Request) -> Response:
    """``GET /api/session/{userId}/profile``: the profile with its bounded history."""
    principal = await _caller(request)
    user_id = _user_id(request)
    profile = await _use_cases(request).get_profile(principal, user_id)
    return ok(ProfileFound(user_id=user_id, profile=profile_view(profile)))


@idempotent("history")
async def append_history(request: Request) -> Response:
    """``POST /api/session/{userId}/history``: append one message."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    body = await _typed_body(request, HistoryBody)
    check_message_text(body.content, "content")
    session_id = body.session_id
    if session_id is not None:
        session_id = check_session_id(session_id)
    await claim_key(request, user_id, body)
    message = await _use_cases(request).append_message(
        principal, user_id, role=body.role, content=body.content, session_id=session_id
    )
    return ok(
        MessageAppended(user_id=user_id, message_id=message.id, timestamp=to_iso(message.timestamp))
    )


@idempotent("create")
async def create_session(request: Request) -> Response:
    """``POST /api/session/create``: create a session, or update and re-activate it."""
    principal = await _caller(request)
    body = await _typed_body(request, CreateSessionBody)
    session_id = check_session_id(body.session_id)
    user_id = check_id(body.user_id, "userId")
    principal.require_user(user_id)
    bind_log_context(user_id=user_id, session_id=session_id)
    language = check_language(body.language)
    # Stored as the map field ``metadata`` of the session: one level below its root.
    raw_metadata = body.metadata
    metadata = check_object(raw_metadata, "metadata", depth=1) if raw_metadata is not None else {}
    device = request.headers.get(DEVICE_HEADER)
    if device is not None:
        metadata["deviceId"] = check_id(device, "X-Device-ID")
    await claim_key(request, user_id, body, metadata)
    session = await _use_cases(request).create_session(
        principal, session_id=session_id, user_id=user_id, language=language, metadata=metadata
    )
    return ok(
        SessionSaved(
            session_id=session_id,
            user_id=user_id,
            session=session_view(session, session.status),
        )
    )


async def get_session(request: Request) -> Response:
    """``GET /api/session/{sessionId}``."""
    principal = await _caller(request)
    session_id = _session_id(request)
    session, status = await _use_cases(request).get_session(principal, session_id)
    return ok(SessionFound(session=session_view(session, status)))


async def end_session(request: Request) -> Response:
    """``PUT /api/session/{sessionId}/end``: ends the live side too, as ``end`` does."""
    principal = await _caller(request)
    session_id = _session_id(request)
    await _use_cases(request).end_session(principal, session_id)
    return ok(SessionEnded(session_id=session_id))


async def active_sessions(request: Request) -> Response:
    """``GET /api/session/user/{userId}/active``: active sessions, newest first."""
    principal = await _caller(request)
    user_id = _user_id(request)
    sessions = await _use_cases(request).active_sessions(principal, user_id)
    return ok(
        ActiveSessions(
            user_id=user_id,
            count=len(sessions),
            sessions=[session_view(s, SessionStatus.ACTIVE) for s in sessions],
        )
    )


async def refresh_user(request: Request) -> Response:
    """``POST /api/session/refresh``: erase everything of a user, live sessions included."""
    principal = await _caller(request)
    body = await _typed_body(request, RefreshBody)
    user_id = check_id(body.user_id, "userId")
    erased = await _use_cases(request).refresh_user(principal, user_id)
    return ok(
        UserRefreshed(
            user_id=user_id,
            cleared=UserCleared(
                user_state=erased.user_state,
                user_profile=erased.user_profile,
                sessions=erased.sessions,
                interruptions=erased.interruptions,
            ),
        )
    )


async def delete_session(request: Request) -> Response:
    """``DELETE /api/session/{sessionId}``: the session, its interruptions and live channel."""
    principal = await _caller(request)
    session_id = _session_id(request)
    erased = await _use_cases(request).delete_session(principal, session_id)
    return ok(
        SessionDeleted(
            session_id=session_id,
            cleared=SessionCleared(session=erased.session, interruptions=erased.interruptions),
        )
    )


async def stats(request: Request) -> Response:
    """``GET /api/session/stats``: count aggregations plus the persistence status.

    Global figures: with authentication on, for the service key only.
    """
    figures = await _use_cases(request).stats(await _caller(request))
    return ok(
        StatsFound(
            stats=stats_view(
                active_users=figures.active_users,
                active_sessions=figures.active_sessions,
                total_profiles=figures.total_profiles,
                total_interruptions=figures.total_interruptions,
                persisted_interruptions=figures.persisted_interruptions,
                live_interruptions=figures.live_interruptions,
                source=figures.source,
                status=figures.persistence,
            )
        )
    )


# -- additions -----------------------------------------------------------------------


async def list_sessions(request: Request) -> Response:
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
        SessionPage(
            user_id=user_id,
            count=len(sessions),
            sessions=[session_view(s, effective) for s, effective in sessions],
            next_cursor=next_cursor,
        )
    )


async def recent_history(request: Request) -> Response:
    """``GET /api/session/{userId}/history?limit=N``: the last N messages, oldest first."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    cap = services(request).settings.history_cap
    limit = _int_query(request, "limit", default=min(DEFAULT_HISTORY_LIMIT, cap), lo=1, hi=cap)
    messages, length = await _use_cases(request).recent_history(principal, user_id, limit)
    return ok(
        RecentHistory(
            user_id=user_id,
            count=len(messages),
            history_length=length,
            messages=history_messages(messages),
        )
    )


async def set_preferences(request: Request) -> Response:
    """``PUT /api/session/{userId}/preferences``: merge preferences key by key."""
    principal = await _caller(request)
    user_id = _user_id(request)
    principal.require_user(user_id)
    # Stored as the map field ``preferences`` of the profile: one level below its root.
    prefs = check_object(await _body(request), "preferences", depth=1)
    if not prefs:
        raise InvalidField("preferences", "must hold at least one key")
    merged = await _use_cases(request).set_preferences(principal, user_id, prefs)
    return ok(PreferencesSaved(user_id=user_id, preferences=plain_json(merged)))


# One route per path, so a wrong method answers 405 with the full Allow header.


async def user_state(request: Request) -> Response:
    """``GET`` or ``POST /api/session/{userId}/state``."""
    return await (save_state if request.method == "POST" else get_state)(request)


async def history(request: Request) -> Response:
    """``GET`` or ``POST /api/session/{userId}/history``."""
    return await (append_history if request.method == "POST" else recent_history)(request)


async def session(request: Request) -> Response:
    """``GET`` or ``DELETE /api/session/{sessionId}``."""
    return await (delete_session if request.method == "DELETE" else get_session)(request)


async def malformed_path(request: Request) -> Response:
    """Any request :class:`_MalformedPath` caught."""
    segments = _raw_segments(request.scope)
    for index, segment in enumerate(segments):
        # Refused on the raw bytes: the server's own decoding turns bytes that
        # are not UTF-8 into U+FFFD, so a%FFb and a%FEb would be one document.
        decode_path_segment(segment, _path_field(segments, index))
    raise BadRequest("Identifiers in the path must not be empty or contain '/' (%2F)")


def _raw_segments(scope: Scope) -> list[bytes]:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    return raw.split(b"?", 1)[0][len(PREFIX) + 1 :].split(b"/")


def _path_field(segments: list[bytes], index: int) -> str:
    """Which id a path segment is (for the error message)."""
    if segments[0] == b"user":
        return "userId" if index == 1 else "path"
    if index == 0:
        user_paths = (b"state", b"profile", b"history", b"preferences")
        return "userId" if len(segments) > 1 and segments[1] in user_paths else "sessionId"
    return "path"


def _is_utf8(segment: bytes) -> bool:
    try:
        decode_path_segment(segment, "path")
    except InvalidField:
        return False
    return True


class _MalformedPath(Route):
    """Catches ``/api/session/...`` paths with an encoded ``/``, an empty segment or
    percent-encoded bytes that are not UTF-8.

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
        if "%" in inner and not all(_is_utf8(seg) for seg in _raw_segments(scope)):
            return super().matches(scope)
        return Match.NONE, {}


_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def is_path_guard(route: BaseRoute) -> bool:
    """Whether ``route`` catches malformed ``/api/session/...`` paths (of any shape):
    a router must ask it before any route after it."""
    return isinstance(route, _MalformedPath)


def routes() -> list[BaseRoute]:
    """The REST routes, mounted at the root of the app.

    Literal paths come before parameterised ones, and every session id is
    validated against the literal words, so ``stats``, ``create``, ``refresh``
    and ``user`` can never be taken for a session.
    """
    p = PREFIX
    return [
        _MalformedPath(f"{p}/{{rest:path}}", malformed_path, methods=_ALL_METHODS),
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
