"""Every wire shape, defined once: REST bodies and responses, WebSocket frames,
history messages and the error body.

Each shape is a :class:`msgspec.Struct` with camelCase names. From these
definitions come the decoding of REST bodies (``samvad.web.requests_json``)
and client frames (``samvad.web.protocol``), the encoding of every response and
server frame (:func:`encode`), ``/openapi.json`` and ``/asyncapi.json``
(``samvad.web.apidocs``). Field order is the order on the wire, which is
today's byte for byte (``tests/web/test_apidocs.py`` holds the proof).

Types only say what a field is; the rules no JSON Schema can express (ids,
Firestore's limits, lone surrogates) are ``samvad.validation``'s, applied by
the decoders right after the types.

Timestamps are strings in the wire format (:func:`samvad.clock.to_iso`,
``2025-01-10T17:00:00.000Z``) made by the functions at the end, which turn
domain objects into these shapes.
"""

from __future__ import annotations

import base64
import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from enum import Enum
from functools import partial
from typing import Annotated, Any, Literal, TypeVar, cast, get_args

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.responses import Response

from samvad.clock import to_iso
from samvad.errors import InvalidField
from samvad.models import (
    Message,
    Mode,
    PersistenceStatus,
    Profile,
    Role,
    Session,
    SessionStatus,
    UserState,
)
from samvad.validation import MAX_ID_LENGTH, RESERVED_SESSION_IDS

__all__ = [
    "CLIENT_FRAMES",
    "OUTPUT_TYPES",
    "SERVER_FRAMES",
    "ErrorBody",
    "HistoryMessage",
    "SessionView",
    "WireResponse",
    "decode_struct",
    "encode",
    "encode_text",
    "plain_json",
    "state_view_json",
    "type_candidates",
]

# -- field types -------------------------------------------------------------------

Timestamp = Annotated[
    str,
    Meta(
        description="ISO-8601 UTC with milliseconds, e.g. 2025-01-10T17:00:00.000Z",
        extra_json_schema={"format": "date-time", "examples": ["2025-01-10T17:00:00.000Z"]},
    ),
]
_ID_RULES = (
    "No '/', no control characters, no white space at either end, "
    "not '.' or '..', not of the form __name__."
)
# The same rules as samvad.validation.check_id, for clients and API fuzzers.
_ID_PATTERN = r"^(?!\.\.?$)(?!__.*__$)(?!\s)[^/\x00-\x1f\x7f]*(?<!\s)$"
Id = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        description=f"1 to {MAX_ID_LENGTH} characters. {_ID_RULES}",
        # Documented, and enforced by samvad.validation.check_id with a sharper message.
        extra_json_schema={"pattern": _ID_PATTERN},
    ),
]
SessionId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        description=f"An id (1 to {MAX_ID_LENGTH} characters. {_ID_RULES}) that is not one of "
        + ", ".join(sorted(RESERVED_SESSION_IDS))
        + ".",
        extra_json_schema={"pattern": _ID_PATTERN, "not": {"enum": sorted(RESERVED_SESSION_IDS)}},
    ),
]
JsonObject = Annotated[
    dict[str, Any],
    Meta(
        description="Any JSON object Firestore can store: no arrays directly inside arrays, "
        "no keys of the form __name__, integers within 64 bits, finite numbers, valid Unicode, "
        "at most 20 levels of maps and arrays counted from the document root.",
    ),
]
StateObject = Annotated[
    dict[str, Any],
    Meta(
        description="The fields the client saved, plus updatedAt and isActive.",
        extra_json_schema={
            "required": ["updatedAt", "isActive"],
            "properties": {
                "updatedAt": {
                    "anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]
                },
                "isActive": {"type": "boolean"},
            },
        },
    ),
]
IdempotencyKey = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=255,
        description="1 to 255 printable ASCII characters (a UUID is a good key). The same "
        "key with the same request answers the first response again (header "
        "Idempotent-Replayed: true) and writes nothing; with another request: 422. Keys are "
        "per user and operation, kept SAMVAD_IDEMPOTENCY_TTL_SECONDS (24 h by default).",
        # Enforced by samvad.web.idempotency.read_key (HTTP strips white space at either end).
        extra_json_schema={"pattern": r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$"},
    ),
]
Language = Annotated[str, Meta(min_length=1, max_length=64)]
ShortText = Annotated[str, Meta(max_length=128)]
Count = Annotated[int, Meta(ge=0)]
Seq = Annotated[int, Meta(ge=1)]


class _Shape(Struct, rename="camel", kw_only=True):
    """Base of every wire shape: camelCase names, keyword construction."""


# -- shared shapes -----------------------------------------------------------------------


class HistoryMessage(_Shape, kw_only=True):
    """One history message, as the original served it plus ``id`` and optional fields."""

    id: str
    role: Role
    content: str
    timestamp: Timestamp
    session_id: str | UnsetType = UNSET
    interrupted: Literal[True] | UnsetType = UNSET
    seq: int | UnsetType = UNSET


class ProfileView(_Shape, kw_only=True):
    """A user's profile with its bounded history (oldest first)."""

    user_id: str
    conversation_history: Annotated[
        list[HistoryMessage], Meta(description="Oldest first; only the last 100 are kept.")
    ]
    preferences: JsonObject
    history_length: Count
    created_at: Timestamp | None
    last_updated: Timestamp | None


class SessionView(_Shape, kw_only=True):
    """A session, with the status as served (idle past the time-out: ``abandoned``)."""

    id: str
    user_id: str
    language: str | None
    metadata: JsonObject
    is_active: bool
    status: SessionStatus
    created_at: Timestamp | None
    last_activity: Timestamp | None
    ended_at: Timestamp | None
    expire_at: Annotated[
        Timestamp | None, Meta(description="When a Firestore TTL policy may delete the session.")
    ]


class PersistenceView(_Shape, kw_only=True):
    """What the write-behind is doing (``/healthz``, and the stats)."""

    mode: Mode
    backend: str
    pending_writes: Count
    pending_in_flight: Count
    oldest_pending_age_seconds: float
    replay_lag_seconds: float
    writes_issued: Count
    write_failures: Count
    #: Changes Firestore refused for their content, kept in the dead-letter.
    writes_set_aside: Count
    mode_since: Timestamp
    last_error: str | None


class ErrorBody(_Shape, kw_only=True):
    """Every REST error: the original's ``{success: false, error}`` plus a stable ``code``
    (the same codes as the WebSocket's ``error`` frames)."""

    success: Literal[False] = False
    error: Annotated[str, Meta(description="What was wrong, naming the field.")]
    code: Annotated[str, Meta(description="A stable code, e.g. invalid_field, bad_json.")]


# -- REST request bodies -------------------------------------------------------------------


class HistoryBody(_Shape, kw_only=True):
    """``POST /api/session/{userId}/history``."""

    role: Role
    content: Annotated[
        str, Meta(min_length=1, description="The message's text: not empty or only white space.")
    ]
    session_id: SessionId | None = None


class CreateSessionBody(_Shape, kw_only=True):
    """``POST /api/session/create``."""

    session_id: SessionId
    user_id: Id
    language: Language | None = None
    metadata: JsonObject | None = None


class RefreshBody(_Shape, kw_only=True):
    """``POST /api/session/refresh``."""

    user_id: Id


# -- REST responses ------------------------------------------------------------------------


class _Ok(_Shape, kw_only=True):
    success: Literal[True] = True


class StateSaved(_Ok, kw_only=True):
    message: Literal["User state saved successfully"] = "User state saved successfully"
    user_id: str


class StateFound(_Ok, kw_only=True):
    user_id: str
    state: StateObject


class ProfileFound(_Ok, kw_only=True):
    user_id: str
    profile: ProfileView


class MessageAppended(_Ok, kw_only=True):
    message: Literal["Message appended to history"] = "Message appended to history"
    user_id: str
    message_id: str
    timestamp: Timestamp


class SessionSaved(_Ok, kw_only=True):
    message: Literal["Session created/updated successfully"] = (
        "Session created/updated successfully"
    )
    session_id: str
    user_id: str
    session: SessionView


class SessionFound(_Ok, kw_only=True):
    session: SessionView


class SessionEnded(_Ok, kw_only=True):
    message: Literal["Session ended successfully"] = "Session ended successfully"
    session_id: str


class ActiveSessions(_Ok, kw_only=True):
    user_id: str
    count: Count
    sessions: list[SessionView]


class SessionPage(_Ok, kw_only=True):
    user_id: str
    count: Count
    sessions: list[SessionView]
    next_cursor: str | None


class RecentHistory(_Ok, kw_only=True):
    user_id: str
    count: Count
    history_length: Count
    messages: list[HistoryMessage]


class PreferencesSaved(_Ok, kw_only=True):
    message: Literal["Preferences saved successfully"] = "Preferences saved successfully"
    user_id: str
    preferences: JsonObject


class UserCleared(_Shape, kw_only=True):
    user_state: bool
    user_profile: bool
    sessions: Count
    interruptions: Count


class UserRefreshed(_Ok, kw_only=True):
    message: Literal["User data cleared successfully"] = "User data cleared successfully"
    user_id: str
    cleared: UserCleared


class SessionCleared(_Shape, kw_only=True):
    session: bool
    interruptions: Count


class SessionDeleted(_Ok, kw_only=True):
    message: Literal["Session cleared successfully"] = "Session cleared successfully"
    session_id: str
    cleared: SessionCleared


class Stats(_Shape, kw_only=True):
    """The original's four counts, where they come from, and the persistence status."""

    active_users: Count
    active_sessions: Count
    total_profiles: Count
    total_interruptions: Count
    persisted_interruptions: Count
    live_interruptions: Count
    source: Annotated[
        str,
        Meta(
            description="firestore: counted by Firestore; memory: from this process's caches "
            "(Firestore unreachable, or the memory store)",
            examples=["firestore", "memory"],
        ),
    ]
    mode: Mode
    backend: str
    pending_writes: Count
    pending_in_flight: Count
    oldest_pending_age_seconds: float
    replay_lag_seconds: float
    writes_issued: Count
    write_failures: Count
    #: Changes Firestore refused for their content, kept in the dead-letter.
    writes_set_aside: Count
    mode_since: Timestamp
    last_error: str | None


class StatsFound(_Ok, kw_only=True):
    stats: Stats


class FeedView(_Shape, kw_only=True):
    """The change feed that keeps instances coherent: what went out and came in."""

    instance: str
    docs_published: int
    events_published: int
    docs_received: int
    events_received: int
    docs_deleted: int
    publish_failures: int
    events_dropped: int
    listener_restarts: int
    gaps_filled: int
    docs_filled: int
    lost: int
    listening: bool
    #: Server time of a feed document to its arrival here (recent ones).
    lag_p50_ms: int | None
    lag_p99_ms: int | None


class InstanceView(_Shape, kw_only=True):
    """Which process answered (one of several workers or instances)."""

    pid: int
    #: This instance's change feed; None when coherence is off.
    feed: FeedView | None


class Health(_Shape, kw_only=True):
    """``GET /healthz``."""

    status: Literal["ok"] = "ok"
    version: str
    persistence: PersistenceView
    instance: InstanceView


class Ready(_Shape, kw_only=True):
    """``GET /readyz`` while ready."""

    ready: Literal[True] = True
    mode: Mode


class NotReady(_Shape, kw_only=True):
    """``GET /readyz`` while starting or shutting down (503)."""

    ready: Literal[False] = False


# -- WebSocket: client frames ------------------------------------------------------------------


class _Frame(Struct, rename="camel", kw_only=True, tag_field="type"):
    """Base of every frame: a JSON object tagged by ``type``."""


class ResumeRequest(_Shape, kw_only=True):
    last_seq: Annotated[int, Meta(ge=0, description="The highest seq the client has seen.")]


class StartFrame(_Frame, tag="start", kw_only=True):
    """Open (or resume) a session for a user; must come first."""

    user_id: Id
    session_id: SessionId | None = None
    language: Language | None = None
    metadata: JsonObject | None = None
    token: Annotated[str, Meta(max_length=16 * 1024)] | None = None
    resume: ResumeRequest | None = None
    history_limit: Annotated[int, Meta(ge=0, le=100)] | None = None


class UserMessageFrame(_Frame, tag="message", kw_only=True):
    """Chat text or a speech transcript (``final: false`` is an interim one, ignored)."""

    text: Annotated[str, Meta(min_length=1, description="Not only white space.")]
    final: bool = True
    client_id: ShortText | None = None


class InterruptFrame(_Frame, tag="interrupt", kw_only=True):
    """Barge-in: how much of the reply the user heard (``heardChars`` or ``heardText``)."""

    heard_chars: Annotated[int, Meta(ge=0)] | None = None
    heard_text: str | None = None
    reason: Annotated[str, Meta(max_length=200)] | None = None
    reply_id: ShortText | None = None


class StateUpdateFrame(_Frame, tag="state", kw_only=True):
    """Merge fields into the user's state."""

    state: JsonObject


class PingFrame(_Frame, tag="ping", kw_only=True):
    """Heartbeat; ``ts`` comes back in ``pong``."""

    ts: int | float | ShortText | None = None


class EndFrame(_Frame, tag="end", kw_only=True):
    """End the session for every device attached to it."""


ClientFrame = (
    StartFrame | UserMessageFrame | InterruptFrame | StateUpdateFrame | PingFrame | EndFrame
)
CLIENT_FRAMES: tuple[type[_Frame], ...] = get_args(ClientFrame)

# -- WebSocket: server frames --------------------------------------------------------------------


class Limits(_Shape, kw_only=True):
    max_frame_bytes: int
    rate_per_second: float
    rate_burst: int
    idle_timeout_seconds: float
    resume_window: int


class InFlight(_Shape, kw_only=True):
    """A reply still streaming when a client resumes."""

    reply_id: str
    in_reply_to: int | None
    text: str
    chunks: Count


class StartedFrame(_Frame, tag="started", kw_only=True):
    protocol: int
    session_id: str
    user_id: str
    mode: Mode
    state: Annotated[dict[str, Any], Meta(description="The user's state (REST shape; {} if none).")]
    history: list[HistoryMessage]
    last_seq: Count
    resumed: bool
    limits: Limits
    history_incomplete: Annotated[
        bool,
        Meta(
            description="True when Firestore could not be read (memory-only mode): state and "
            "history hold only what this server has in memory, and may lack the rest."
        ),
    ]


class ResumeFrame(_Frame, tag="resume", kw_only=True):
    recovered: bool
    last_seq: Count
    messages: list[HistoryMessage] | UnsetType = UNSET
    reason: Literal["history_trimmed", "unknown_seq", "too_many_missed"] | UnsetType = UNSET
    in_flight: InFlight | None


class AckFrame(_Frame, tag="ack", kw_only=True):
    seq: int | None
    message_id: str
    client_id: str | None
    timestamp: Timestamp
    duplicate: (
        Annotated[
            bool,
            Meta(
                description="The clientId was stored before: this is the original ack again; "
                "nothing was stored and no reply follows."
            ),
        ]
        | UnsetType
    ) = UNSET


class MessageFrame(_Frame, tag="message", kw_only=True):
    message: HistoryMessage


class ReplyStartFrame(_Frame, tag="reply.start", kw_only=True):
    reply_id: str
    in_reply_to: int | None


class ReplyChunkFrame(_Frame, tag="reply.chunk", kw_only=True):
    reply_id: str
    index: Annotated[Count, Meta(description="The index of the (last) chunk this frame carries.")]
    text: str
    first_index: (
        Annotated[
            Count,
            Meta(
                description="Present when chunks that waited for a slow reader were merged "
                "into this frame: it carries chunks firstIndex..index, their text concatenated."
            ),
        ]
        | UnsetType
    ) = UNSET


class ReplyEndFrame(_Frame, tag="reply.end", kw_only=True):
    reply_id: str
    seq: int | None
    message_id: str | None
    text: str
    complete: bool


class InterruptedFrame(_Frame, tag="interrupted", kw_only=True):
    reply_id: str
    heard: str
    seq: int | None
    message_id: str | None
    reason: str
    late: bool


class StateFrame(_Frame, tag="state", kw_only=True):
    state: Annotated[dict[str, Any], Meta(description="The user's state (REST shape).")]


class PongFrame(_Frame, tag="pong", kw_only=True):
    ts: int | float | str | None
    server_time: Timestamp


class ErrorFrame(_Frame, tag="error", kw_only=True):
    code: str
    message: str


class EndedFrame(_Frame, tag="ended", kw_only=True):
    session_id: str


class DurableFrame(_Frame, tag="durable", kw_only=True):
    """Every message of the session with ``seq`` up to this one is in Firestore.

    Sent right after ``started`` (and ``resume``) by a server whose store is
    durable, then as the write-behind commits (at most about four a second);
    never by a server on the memory store."""

    session_id: str
    seq: Count


ServerFrame = (
    StartedFrame
    | ResumeFrame
    | AckFrame
    | MessageFrame
    | ReplyStartFrame
    | ReplyChunkFrame
    | ReplyEndFrame
    | InterruptedFrame
    | StateFrame
    | PongFrame
    | ErrorFrame
    | EndedFrame
    | DurableFrame
)
SERVER_FRAMES: tuple[type[_Frame], ...] = get_args(ServerFrame)

#: Shapes the server writes: every field not typed ``UNSET`` is always present.
OUTPUT_TYPES: tuple[type[Struct], ...] = (
    HistoryMessage,
    ProfileView,
    SessionView,
    PersistenceView,
    ErrorBody,
    StateSaved,
    StateFound,
    ProfileFound,
    MessageAppended,
    SessionSaved,
    SessionFound,
    SessionEnded,
    ActiveSessions,
    SessionPage,
    RecentHistory,
    PreferencesSaved,
    UserCleared,
    UserRefreshed,
    SessionCleared,
    SessionDeleted,
    Stats,
    StatsFound,
    Health,
    Ready,
    NotReady,
    Limits,
    InFlight,
    *SERVER_FRAMES,
)

# -- encoding ----------------------------------------------------------------------------------


def _enc_hook(value: Any) -> Any:
    # Documents written by other clients may hold Firestore types.
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


#: ``encode(shape)``: ``shape`` (a wire shape, or a mapping holding shapes) as
#: compact UTF-8 JSON. Non-finite floats become ``null``. Floats in exponent
#: form are written without a ``+`` (``1e16``, where ``json.dumps`` wrote
#: ``1e+16``): the same number, the only difference to the encodings before
#: this module. The encoder's own method, not a function calling it: every
#: response body and four frames a WebSocket message are encoded here.
encode: Callable[[Struct | Mapping[str, Any]], bytes] = _encoder.encode


def encode_text(shape: Struct | Mapping[str, Any]) -> str:
    """``shape`` as compact JSON text, as :func:`encode` writes it: a WebSocket
    frame's (``samvad.web.protocol.encode``)."""
    return _encoder.encode(shape).decode()


_JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class WireResponse(Response):
    """An HTTP response whose body is a wire shape (or a mapping holding shapes)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encode(content)

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        # Starlette's, for the common case, without its checks per request.
        status = self.status_code
        if (
            headers is None
            and self.media_type == "application/json"
            and status >= 200
            and status not in (204, 304)
        ):
            self.raw_headers = [
                (b"content-length", str(len(self.body)).encode("latin-1")),
                _JSON_CONTENT_TYPE,
            ]
        else:
            super().init_headers(headers)


def plain_json(value: Any) -> Any:
    """A stored value as plain JSON, timestamps in the wire format.

    What this API stores is plain JSON already; documents written by other
    clients (the original backend) may hold Firestore types as well: those
    become strings, and non-finite numbers ``null``, rather than failing the
    response.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return to_iso(value)
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


# -- decoding ------------------------------------------------------------------------------------

_S = TypeVar("_S", bound=Struct)

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")
_EXPECTED = re.compile(r"^Expected `(?P<types>[^`]+)`(?P<rest>.*)$")
_LENGTH = re.compile(r"of length (?P<op>[<>]=) (?P<n>\d+)")
_BOUND = re.compile(r"^ (?P<op>[<>]=?) (?P<n>-?[\d.]+)")
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "object": "an object",
    "array": "an array",
}


def _field_path(path: str) -> str:
    return path[1:] if path.startswith(".") else path


def _problem(types: str, rest: str, got: str | None, optional: bool) -> str:
    if length := _LENGTH.search(rest):
        n = int(length["n"])
        if length["op"] == ">=":
            return "must not be empty" if n == 1 else f"must be at least {n} characters"
        return f"must be at most {n} characters"
    if bound := _BOUND.match(rest):
        word = "at least" if bound["op"].startswith(">") else "at most"
        return f"must be {word} {bound['n']}"
    if "matching" in rest:
        return "has a character or form that is not allowed"
    if got == "null" and not optional:
        return "is required"
    names = [t.strip() for t in types.split("|") if t.strip() != "null"]
    if set(names) >= {"int", "float", "str"}:
        return "must be a number or a string"
    return "must be " + " or ".join(_TYPE_WORDS.get(n, n) for n in names)


def type_candidates(annotation: Any) -> list[Any]:
    """The types an annotation allows (``Annotated`` and unions unwrapped)."""
    args = get_args(annotation)
    if not args:
        return [annotation]
    if getattr(annotation, "__metadata__", None) is not None:
        return type_candidates(args[0])
    return [t for arg in args for t in type_candidates(arg)]


def _enum_values(shape: type[Struct], path: str) -> list[str] | None:
    current: list[Any] = [shape]
    for part in path.split("."):
        structs = [t for t in current if isinstance(t, type) and issubclass(t, Struct)]
        if not structs:
            return None
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(structs[0])}
        if part not in fields:
            return None
        current = type_candidates(fields[part])
    for candidate in current:
        if isinstance(candidate, type) and issubclass(candidate, Enum):
            return [str(member.value) for member in candidate]
    return None


def field_error(shape: type[Struct], exc: msgspec.ValidationError) -> InvalidField:
    """msgspec's verdict on ``shape`` as an :class:`InvalidField` naming the field."""
    text = str(exc)
    at = _AT.search(text)
    path = _field_path(at["path"]) if at else ""
    head = text[: at.start()] if at else text
    if missing := _MISSING.match(head):
        name = f"{path}.{missing['name']}" if path else missing["name"]
        return InvalidField(name, "is required")
    if path and (values := _enum_values(shape, path)) is not None:
        return InvalidField(path, "must be one of " + ", ".join(values))
    if expected := _EXPECTED.match(head):
        rest = expected["rest"]
        got_match = re.search(r", got `([^`]+)`", rest)
        got = got_match[1] if got_match else None
        types = expected["types"]
        problem = _problem(types, rest.split(", got")[0], got, optional="null" in types)
        return InvalidField(path or "body", problem)
    return InvalidField(path or "body", head[:1].lower() + head[1:])


def decode_struct(value: Mapping[str, Any], shape: type[_S]) -> _S:
    """``value`` (one parsed JSON object) as ``shape``, or :class:`InvalidField`."""
    try:
        return msgspec.convert(value, shape)
    except msgspec.ValidationError as exc:
        raise field_error(shape, exc) from None


# -- domain objects to wire shapes ---------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return to_iso(value) if value is not None else None


def history_message(message: Message) -> HistoryMessage:
    return HistoryMessage(
        id=message.id,
        role=message.role,
        content=message.content,
        timestamp=to_iso(message.timestamp),
        session_id=message.session_id if message.session_id is not None else UNSET,
        interrupted=True if message.interrupted else UNSET,
        seq=message.seq if message.seq is not None else UNSET,
    )


def history_messages(messages: Iterable[Message]) -> list[HistoryMessage]:
    return [history_message(m) for m in messages]


def state_view(state: UserState | None) -> dict[str, Any]:
    """A user's state: the client's fields, then ``updatedAt`` and ``isActive`` (``{}`` if none)."""
    if state is None:
        return {}
    out: dict[str, Any] = plain_json(state.data)
    out["updatedAt"] = _iso(state.updated_at)
    out["isActive"] = state.is_active
    return out


#: Encoded state views kept in all (bytes), and the largest one kept.
STATE_VIEWS_MAX_BYTES = 4 * 1024 * 1024
STATE_VIEW_MAX_BYTES = 4096


class _StateViews:
    """The encoded :func:`state_view` of each user state served, kept for as
    long as that state lives (a weak reference: a saved state is a new one,
    and an evicted or erased one takes its view with it).

    A cached state read again and again — ``GET /state`` — is then encoded
    once, not per request. Only small views are kept, up to
    :data:`STATE_VIEWS_MAX_BYTES` in all, so the cache's byte budget stays
    what it says.
    """

    __slots__ = ("_bytes", "_views")

    def __init__(self) -> None:
        self._views: dict[int, tuple[weakref.ref[UserState], msgspec.Raw, int]] = {}
        self._bytes = 0

    def __call__(self, state: UserState) -> msgspec.Raw:
        key = id(state)
        entry = self._views.get(key)
        if entry is not None and entry[0]() is state:
            return entry[1]
        encoded = encode(state_view(state))
        view = msgspec.Raw(encoded)
        size = len(encoded)
        if size <= STATE_VIEW_MAX_BYTES and self._bytes + size <= STATE_VIEWS_MAX_BYTES:
            self._drop(key)
            ref = weakref.ref(state, partial(self._forget, key))
            self._views[key] = (ref, view, size)
            self._bytes += size
        return view

    def _forget(self, key: int, dead: weakref.ref[UserState]) -> None:
        entry = self._views.get(key)
        if entry is not None and entry[0] is dead:
            self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._views.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]

    @property
    def held_bytes(self) -> int:
        """Bytes of encoded views held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._views)


_state_views = _StateViews()


def state_view_json(state: UserState | None) -> StateObject:
    """:func:`state_view` already encoded (the same bytes), from the state's
    kept view when it has one.

    Typed as the object it encodes to, which is what a shape's ``state``
    field documents: msgspec writes a ``Raw``'s bytes as they are.
    """
    view = msgspec.Raw(b"{}") if state is None else _state_views(state)
    return cast(StateObject, view)


def profile_view(profile: Profile) -> ProfileView:
    history = profile.history
    return ProfileView(
        user_id=profile.user_id,
        conversation_history=history_messages(history),
        preferences=plain_json(profile.preferences),
        history_length=len(history),
        created_at=_iso(profile.created_at),
        last_updated=_iso(profile.last_updated),
    )


def session_view(session: Session, status: SessionStatus) -> SessionView:
    """A session with the status as served (see ``samvad.lifecycle.effective_status``)."""
    return SessionView(
        id=session.id,
        user_id=session.user_id,
        language=session.language,
        metadata=plain_json(session.metadata),
        is_active=status is SessionStatus.ACTIVE,
        status=status,
        created_at=_iso(session.created_at),
        last_activity=_iso(session.last_activity),
        ended_at=_iso(session.ended_at),
        expire_at=_iso(session.expire_at),
    )


def persistence_view(status: PersistenceStatus) -> PersistenceView:
    return PersistenceView(
        mode=status.mode,
        backend=status.backend,
        pending_writes=status.pending_documents,
        pending_in_flight=status.pending_in_flight,
        oldest_pending_age_seconds=round(status.oldest_pending_age, 3),
        replay_lag_seconds=round(status.replay_lag, 3),
        writes_issued=status.writes_issued,
        write_failures=status.write_failures,
        writes_set_aside=status.writes_set_aside,
        mode_since=to_iso(status.mode_since),
        last_error=status.last_error,
    )


def stats_view(
    *,
    active_users: int,
    active_sessions: int,
    total_profiles: int,
    total_interruptions: int,
    persisted_interruptions: int,
    live_interruptions: int,
    source: str,
    status: PersistenceStatus,
) -> Stats:
    p = persistence_view(status)
    return Stats(
        active_users=active_users,
        active_sessions=active_sessions,
        total_profiles=total_profiles,
        total_interruptions=total_interruptions,
        persisted_interruptions=persisted_interruptions,
        live_interruptions=live_interruptions,
        source=source,
        **{f: getattr(p, f) for f in PersistenceView.__struct_fields__},
    )
