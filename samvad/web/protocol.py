"""The real-time protocol, sans I/O: frames in, decisions out.

Everything here is plain synchronous code: parsing and validating client
frames into typed frames, the connection state machine, the rate limiter
(a token bucket on an injected clock), the frame size check, sequence
numbers, what a barge-in means for the stored text, the resume decision and
the server frames. ``samvad.web.realtime`` is the thin asyncio glue that moves
bytes between a socket and this module. The wire format is documented in
``docs/protocol.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from enum import Enum, IntEnum, StrEnum
from typing import Any

import msgspec
from msgspec import UNSET, Struct

from samvad.clock import to_iso
from samvad.conversation import Acked, ReplyChunk, ReplyEnded, ReplyStarted, ResumePlan
from samvad.conversation import ResumeFailure as ResumeFailure
from samvad.conversation import heard_part as heard_part
from samvad.conversation import last_seq as last_seq
from samvad.conversation import plan_resume as plan_resume
from samvad.errors import (
    AlreadyStarted,
    AuthUnavailable,
    BacklogFull,
    BadFrame,
    Conflict,
    Forbidden,
    FrameTooLarge,
    IdleTimeout,
    InvalidField,
    MalformedJson,
    NothingToInterrupt,
    NotStarted,
    PayloadTooLarge,
    RateLimited,
    SamvadError,
    SessionEnded,
    StartTimeout,
    Unauthorized,
    UnknownFrameType,
)
from samvad.models import Message, Mode, UserState
from samvad.validation import (
    check_id,
    check_language,
    check_message_text,
    check_object,
    check_session_id,
)
from samvad.web import schemas
from samvad.web.requests_json import flat_reader, parse_json

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "ERROR_CODES",
    "FRAME_ERRORS",
    "MAX_HISTORY_LIMIT",
    "PROTOCOL_VERSION",
    "ClientFrame",
    "Close",
    "CloseCode",
    "ConnectionState",
    "End",
    "Frame",
    "Interrupt",
    "Ping",
    "RateDecision",
    "RateLimiter",
    "Received",
    "Reject",
    "ServerProtocol",
    "Start",
    "StateUpdate",
    "TokenBucket",
    "UserMessage",
    "ack_frame",
    "durable_frame",
    "encode",
    "ended_frame",
    "error_frame",
    "frame_too_large",
    "interrupted_frame",
    "merged_chunk_frame",
    "message_frame",
    "parse_frame",
    "pong_frame",
    "reply_chunk_frame",
    "reply_end_frame",
    "reply_start_frame",
    "resume_frame",
    "started_frame",
    "state_frame",
    "state_json",
]

PROTOCOL_VERSION = 1

#: How many history messages ``started`` carries unless ``historyLimit`` says otherwise.
DEFAULT_HISTORY_LIMIT = 20
MAX_HISTORY_LIMIT = 100


class CloseCode(IntEnum):
    """The WebSocket close codes Samvad uses."""

    NORMAL = 1000  # the session ended (``end`` frame)
    GOING_AWAY = 1001  # the server is shutting down
    POLICY_VIOLATION = 1008  # kept exceeding the message-rate limit
    MESSAGE_TOO_BIG = 1009  # a frame over ``ws_max_frame_bytes``
    INTERNAL_ERROR = 1011  # a bug on the server; reconnect and resume
    TRY_AGAIN_LATER = 1013  # the client read too slowly (send queue full); resume
    UNAUTHORIZED = 4401  # missing or invalid token
    FORBIDDEN = 4403  # the token is for another user
    IDLE_TIMEOUT = 4408  # no frame for ``ws_idle_timeout`` s, or no start in ``ws_start_timeout`` s
    SESSION_ERASED = 4410  # the session (or its user) was erased: deleted or refreshed


#: The errors ``error`` frames report, by class; their ``code``s are the frames' codes
#: (``docs/protocol.md`` lists them, clients map them to actions).
FRAME_ERRORS: tuple[type[SamvadError], ...] = (
    MalformedJson,
    BadFrame,
    UnknownFrameType,
    InvalidField,
    NotStarted,
    AlreadyStarted,
    SessionEnded,
    Conflict,
    NothingToInterrupt,
    PayloadTooLarge,
    BacklogFull,
    RateLimited,
    FrameTooLarge,
    AuthUnavailable,
    Unauthorized,
    Forbidden,
    IdleTimeout,
    StartTimeout,
    SamvadError,
)
#: The ``code`` of every error frame.
ERROR_CODES: frozenset[str] = frozenset(error.code for error in FRAME_ERRORS)


# -- connection state ------------------------------------------------------------


class ConnectionState(StrEnum):
    """Where one connection is in the protocol."""

    AWAITING_START = "awaiting_start"
    ACTIVE = "active"
    ENDED = "ended"
    CLOSED = "closed"


# Members read for every frame, under module names: an Enum class's attribute
# is slow to read on Python 3.11 (see samvad.conversation._USER).
_AWAITING_START = ConnectionState.AWAITING_START
_ACTIVE = ConnectionState.ACTIVE
_ENDED = ConnectionState.ENDED
_CLOSED = ConnectionState.CLOSED

_TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    ConnectionState.AWAITING_START: frozenset({ConnectionState.ACTIVE, ConnectionState.CLOSED}),
    ConnectionState.ACTIVE: frozenset({ConnectionState.ENDED, ConnectionState.CLOSED}),
    ConnectionState.ENDED: frozenset({ConnectionState.CLOSED}),
    ConnectionState.CLOSED: frozenset(),
}


# -- client frames ---------------------------------------------------------------


class Start(Struct, frozen=True):
    """``start``: open (or resume) a session for a user."""

    user_id: str
    session_id: str | None = None
    language: str | None = None
    metadata: Mapping[str, Any] = msgspec.field(default_factory=dict)
    token: str | None = None
    resume_from: int | None = None
    history_limit: int = DEFAULT_HISTORY_LIMIT


class UserMessage(Struct, frozen=True):
    """``message``: chat text or a speech transcript (``final: false`` is interim)."""

    text: str
    final: bool = True
    client_id: str | None = None


class Interrupt(Struct, frozen=True):
    """``interrupt``: barge-in; how much of the reply the user heard, and why."""

    heard_chars: int | None = None
    heard_text: str | None = None
    reason: str = "barge_in"
    reply_id: str | None = None


class StateUpdate(Struct, frozen=True):
    """``state``: merge fields into the user's state."""

    state: Mapping[str, Any]


class Ping(Struct, frozen=True):
    """``ping``: heartbeat; ``ts`` is echoed back in ``pong``."""

    ts: str | int | float | None = None


class End(Struct, frozen=True):
    """``end``: end the session explicitly."""


ClientFrame = Start | UserMessage | Interrupt | StateUpdate | Ping | End


class Reject(Struct, frozen=True):
    """Answer with an ``error`` frame; the connection stays usable."""

    error: SamvadError


class Close(Struct, frozen=True):
    """Close the connection with ``code`` (after an ``error`` frame with ``error``)."""

    code: CloseCode
    reason: str
    error: str


Received = ClientFrame | Reject | Close


# -- rate limit ----------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; time from ``clock``."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("A token bucket needs a positive rate and a burst of at least one.")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> bool:
        """Take one token; False when there is none."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class RateDecision(Enum):
    ALLOW = "allow"
    REJECT = "reject"
    CLOSE = "close"


# Read for every frame (see _ACTIVE).
_ALLOW, _REJECT, _CLOSE = RateDecision.ALLOW, RateDecision.REJECT, RateDecision.CLOSE


class RateLimiter:
    """A token bucket that tolerates ``strikes`` refused frames in a row, then closes.

    A refused frame gets an ``error`` frame; any allowed frame clears the strikes.
    """

    __slots__ = ("_bucket", "_max_strikes", "strikes")

    def __init__(self, bucket: TokenBucket, *, strikes: int) -> None:
        self._bucket = bucket
        self._max_strikes = strikes
        self.strikes = 0

    def check(self) -> RateDecision:
        if self._bucket.take():
            self.strikes = 0
            return _ALLOW
        self.strikes += 1
        if self.strikes > self._max_strikes:
            return _CLOSE
        return _REJECT


def frame_too_large(data: str | bytes, limit: int) -> bool:
    """True when ``data`` takes more than ``limit`` bytes (text counted as UTF-8)."""
    if isinstance(data, bytes):
        return len(data) > limit
    if len(data) > limit:
        return True
    # A character takes at most 4 bytes: encode only when it could matter.
    return len(data) * 4 > limit and len(data.encode()) > limit


# -- the per-connection core -------------------------------------------------------


class ServerProtocol:
    """One connection's protocol state: size and rate checks, parsing, transitions.

    :meth:`receive` turns raw frame data into a :data:`Received` decision; the
    glue does the I/O and reports the outcome of ``start`` and ``end`` with
    :meth:`started` and :meth:`ended`.
    """

    __slots__ = ("limiter", "max_frame_bytes", "state")

    def __init__(
        self,
        *,
        max_frame_bytes: int,
        rate: float,
        burst: int,
        strikes: int,
        clock: Callable[[], float],
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.limiter = RateLimiter(
            TokenBucket(rate=rate, burst=burst, clock=clock), strikes=strikes
        )
        self.state = ConnectionState.AWAITING_START

    def _move(self, to: ConnectionState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise RuntimeError(
                f'Cannot move a connection from "{self.state.value}" to "{to.value}".'
            )
        self.state = to

    def started(self) -> None:
        """The session started: frames other than ``start`` are accepted from now on."""
        self._move(ConnectionState.ACTIVE)

    def ended(self) -> None:
        """The session ended (``end``); only closing is left."""
        self._move(ConnectionState.ENDED)

    def closed(self) -> None:
        """The connection is closed; idempotent."""
        if self.state is not ConnectionState.CLOSED:
            self._move(ConnectionState.CLOSED)

    def receive(self, data: str | bytes) -> Received:
        """Check, parse and validate one frame of client data."""
        if self.state is _CLOSED:
            raise RuntimeError("Cannot receive a frame once the connection is closed.")
        limit = self.max_frame_bytes
        # frame_too_large(), its usual answer inlined: text of at most a
        # quarter of the limit in characters fits whatever they are.
        if (type(data) is not str or len(data) * 4 > limit) and frame_too_large(data, limit):
            return Close(
                CloseCode.MESSAGE_TOO_BIG,
                f"frame over {self.max_frame_bytes} bytes",
                FrameTooLarge.code,
            )
        decision = self.limiter.check()
        if decision is _CLOSE:
            return Close(
                CloseCode.POLICY_VIOLATION, "message-rate limit exceeded", RateLimited.code
            )
        if decision is _REJECT:
            return Reject(RateLimited("Too many frames; slow down.", retry_after=0.0))
        try:
            frame = parse_frame(data)
        except SamvadError as exc:
            return Reject(exc)
        if frame.__class__ is UserMessage and self.state is _ACTIVE:
            return frame  # _admit's answer for the usual frame, inline
        return self._admit(frame)

    def _admit(self, frame: ClientFrame) -> Received:
        if isinstance(frame, Ping):
            return frame
        state = self.state
        if state is _AWAITING_START and not isinstance(frame, Start):
            return Reject(NotStarted("Send a start frame first."))
        if state is _ACTIVE and isinstance(frame, Start):
            return Reject(AlreadyStarted("This connection has already started."))
        if state is _ENDED:
            return Reject(SessionEnded("The session has ended."))
        return frame


# -- parsing -----------------------------------------------------------------------


def parse_frame(data: str | bytes) -> ClientFrame:
    """Parse one client frame; raises a :class:`~samvad.errors.BadRequest` naming what
    is wrong (its ``code`` is the ``error`` frame's).

    The JSON reader is the REST bodies' (duplicate keys, lone surrogates, NaN
    refused alike); the fields are decoded by the frame's shape in
    ``samvad.web.schemas``; the rules past the types are ``samvad.validation``'s.
    """
    if isinstance(data, bytes):
        raise BadFrame("Binary frames are not supported; send JSON text.")
    flat = _read_flat(data)
    if flat is not None:
        return (
            _parse_message(flat) if isinstance(flat, schemas.UserMessageFrame) else _parse_end(flat)
        )
    return _parse_any(data)


def _parse_any(data: str) -> ClientFrame:
    """:func:`parse_frame` the long way: any frame, and every error named."""
    raw = parse_json(data)
    if not isinstance(raw, dict):
        raise BadFrame("A frame must be a JSON object.")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise BadFrame("A frame needs a string field 'type'.")
    entry = _PARSERS.get(kind)
    if entry is None:
        raise UnknownFrameType(f"Unknown frame type {kind[:40]!r}.")
    shape, parser = entry
    return parser(schemas.decode_struct(raw, shape))


def _parse_start(frame: Struct) -> Start:
    assert isinstance(frame, schemas.StartFrame)
    user_id = check_id(frame.user_id, "userId")
    session_id = frame.session_id
    if session_id is not None:
        session_id = check_session_id(session_id)
    # Stored as the map field ``metadata`` of the session: one level below its root.
    metadata = check_object(frame.metadata, "metadata", depth=1) if frame.metadata else {}
    resume_from: int | None = None
    if frame.resume is not None:
        if session_id is None:
            raise InvalidField("resume", "needs a sessionId")
        resume_from = frame.resume.last_seq
    return Start(
        user_id=user_id,
        session_id=session_id,
        language=check_language(frame.language),
        metadata=metadata,
        token=frame.token,
        resume_from=resume_from,
        history_limit=DEFAULT_HISTORY_LIMIT if frame.history_limit is None else frame.history_limit,
    )


def _parse_message(frame: Struct) -> UserMessage:
    assert isinstance(frame, schemas.UserMessageFrame)
    check_message_text(frame.text, "text")
    client_id = None if frame.client_id is None else check_id(frame.client_id, "clientId")
    return UserMessage(text=frame.text, final=frame.final, client_id=client_id)


def _parse_interrupt(frame: Struct) -> Interrupt:
    assert isinstance(frame, schemas.InterruptFrame)
    if frame.heard_chars is not None and frame.heard_text is not None:
        raise InvalidField("heardChars", "and heardText cannot both be given")
    return Interrupt(
        heard_chars=frame.heard_chars,
        heard_text=frame.heard_text,
        reason=frame.reason or "barge_in",
        reply_id=frame.reply_id,
    )


def _parse_state(frame: Struct) -> StateUpdate:
    assert isinstance(frame, schemas.StateUpdateFrame)
    return StateUpdate(state=check_object(frame.state, "state"))


def _parse_ping(frame: Struct) -> Ping:
    assert isinstance(frame, schemas.PingFrame)
    return Ping(ts=frame.ts)


def _parse_end(frame: Struct) -> End:
    return End()


def _message_reader() -> Callable[[str], Struct | None]:
    reader = flat_reader(schemas.UserMessageFrame, schemas.EndFrame)
    if reader is None:
        raise RuntimeError("Message and end frames should be made of strings and booleans only.")
    return reader


#: Message (and end) frames, read straight into their shapes when that reads
#: them exactly as the long way would (samvad.web.requests_json.flat_reader).
_read_flat = _message_reader()

_PARSERS: dict[str, tuple[type[Struct], Callable[[Any], ClientFrame]]] = {
    "start": (schemas.StartFrame, _parse_start),
    "message": (schemas.UserMessageFrame, _parse_message),
    "interrupt": (schemas.InterruptFrame, _parse_interrupt),
    "state": (schemas.StateUpdateFrame, _parse_state),
    "ping": (schemas.PingFrame, _parse_ping),
    "end": (schemas.EndFrame, _parse_end),
}


# -- sequence numbers, barge-in and resume -------------------------------------------


# ``last_seq``, ``heard_part``, ``plan_resume`` and their types are rules of the
# conversation (``samvad.conversation``); imported here for the frames and for
# the code that knew them from this module.


# -- server frames -----------------------------------------------------------------
# Each returns the frame's shape from ``samvad.web.schemas``; ``encode`` writes it.

Frame = Struct | Mapping[str, Any]


#: A server frame as compact JSON text (the schemas' encoder itself: four
#: times per message, no Python frame of its own here).
encode: Callable[[Frame], str] = schemas.encode_text


def state_json(state: UserState | None) -> dict[str, Any]:
    """A user's state as frames carry it (the REST shape; ``{}`` when there is none)."""
    return schemas.state_view(state)


def started_frame(
    *,
    session_id: str,
    user_id: str,
    mode: str,
    state: UserState | None,
    history: Sequence[Message],
    last_seq: int,
    resumed: bool,
    limits: Mapping[str, Any],
    history_incomplete: bool = False,
) -> schemas.StartedFrame:
    return schemas.StartedFrame(
        protocol=PROTOCOL_VERSION,
        session_id=session_id,
        user_id=user_id,
        mode=Mode(mode),
        state=schemas.state_view(state),
        history=schemas.history_messages(history),
        last_seq=last_seq,
        resumed=resumed,
        limits=schemas.decode_struct(limits, schemas.Limits),
        history_incomplete=history_incomplete,
    )


def resume_frame(
    plan: ResumePlan, *, last_seq: int, in_flight: Mapping[str, Any] | None
) -> schemas.ResumeFrame:
    return schemas.ResumeFrame(
        recovered=plan.recovered,
        last_seq=last_seq,
        messages=schemas.history_messages(plan.messages) if plan.recovered else UNSET,
        reason=plan.reason.value if plan.reason is not None else UNSET,
        in_flight=schemas.decode_struct(in_flight, schemas.InFlight)
        if in_flight is not None
        else None,
    )


def ack_frame(event: Acked) -> schemas.AckFrame:
    """``ack`` of the engine's :class:`~samvad.conversation.Acked`. The four
    frames of a message's exchange are built from their events, one call
    each (:data:`samvad.web.realtime` maps events to these)."""
    message = event.message
    return schemas.AckFrame(
        seq=message.seq,
        message_id=message.id,
        client_id=event.client_id,
        timestamp=to_iso(message.timestamp),
        duplicate=True if event.duplicate else UNSET,
    )


def durable_frame(session_id: str, seq: int) -> schemas.DurableFrame:
    return schemas.DurableFrame(session_id=session_id, seq=seq)


def message_frame(message: Message) -> schemas.MessageFrame:
    return schemas.MessageFrame(message=schemas.history_message(message))


def reply_start_frame(event: ReplyStarted) -> schemas.ReplyStartFrame:
    return schemas.ReplyStartFrame(reply_id=event.reply_id, in_reply_to=event.in_reply_to)


def reply_chunk_frame(event: ReplyChunk) -> schemas.ReplyChunkFrame:
    return schemas.ReplyChunkFrame(reply_id=event.reply_id, index=event.index, text=event.text)


def merged_chunk_frame(
    reply_id: str, *, first_index: int, index: int, text: str
) -> schemas.ReplyChunkFrame:
    """``reply.chunk`` carrying chunks ``first_index..index`` merged (a reader
    that fell behind)."""
    return schemas.ReplyChunkFrame(
        reply_id=reply_id, index=index, text=text, first_index=first_index
    )


def reply_end_frame(event: ReplyEnded) -> schemas.ReplyEndFrame:
    message = event.message
    return schemas.ReplyEndFrame(
        reply_id=event.reply_id,
        seq=message.seq if message is not None else None,
        message_id=message.id if message is not None else None,
        text=event.text,
        complete=event.complete,
    )


def interrupted_frame(
    reply_id: str, *, heard: str, message: Message | None, reason: str, late: bool
) -> schemas.InterruptedFrame:
    return schemas.InterruptedFrame(
        reply_id=reply_id,
        heard=heard,
        seq=message.seq if message is not None else None,
        message_id=message.id if message is not None else None,
        reason=reason,
        late=late,
    )


def state_frame(state: UserState) -> schemas.StateFrame:
    return schemas.StateFrame(state=schemas.state_view(state))


def pong_frame(ts: str | int | float | None, server_time: str) -> schemas.PongFrame:
    return schemas.PongFrame(ts=ts, server_time=server_time)


def error_frame(code: str, message: str) -> schemas.ErrorFrame:
    return schemas.ErrorFrame(code=code, message=message)


def ended_frame(session_id: str) -> schemas.EndedFrame:
    return schemas.EndedFrame(session_id=session_id)
