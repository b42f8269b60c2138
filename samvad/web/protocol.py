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

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum
from typing import Any

from samvad.clock import to_iso
from samvad.conversation import ResumeFailure as ResumeFailure
from samvad.conversation import ResumePlan
from samvad.conversation import heard_part as heard_part
from samvad.conversation import last_seq as last_seq
from samvad.conversation import plan_resume as plan_resume
from samvad.errors import FrameRejected, InvalidField
from samvad.interruptions import Interruption
from samvad.models import Message, UserState
from samvad.validation import check_id, check_object, check_session_id
from samvad.web import wire

PROTOCOL_VERSION = 1

#: Longest ``reason`` an interrupt frame may give, and longest ``clientId``/``language``.
MAX_REASON_CHARS = 200
MAX_CLIENT_ID_CHARS = 128
MAX_LANGUAGE_CHARS = 64
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


class ErrorCode(StrEnum):
    """The stable ``code`` strings of ``error`` frames."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    SESSION_ENDED = "session_ended"
    NOTHING_TO_INTERRUPT = "nothing_to_interrupt"
    RATE_LIMITED = "rate_limited"
    FRAME_TOO_LARGE = "frame_too_large"
    CONFLICT = "conflict"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BACKLOG_FULL = "backlog_full"
    REPLY_FAILED = "reply_failed"
    IDLE_TIMEOUT = "idle_timeout"
    START_TIMEOUT = "start_timeout"
    SLOW_CONSUMER = "slow_consumer"
    INTERNAL_ERROR = "internal_error"


# -- connection state ------------------------------------------------------------


class ConnectionState(StrEnum):
    """Where one connection is in the protocol."""

    AWAITING_START = "awaiting_start"
    ACTIVE = "active"
    ENDED = "ended"
    CLOSED = "closed"


_TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    ConnectionState.AWAITING_START: frozenset({ConnectionState.ACTIVE, ConnectionState.CLOSED}),
    ConnectionState.ACTIVE: frozenset({ConnectionState.ENDED, ConnectionState.CLOSED}),
    ConnectionState.ENDED: frozenset({ConnectionState.CLOSED}),
    ConnectionState.CLOSED: frozenset(),
}


# -- client frames ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """``start``: open (or resume) a session for a user."""

    user_id: str
    session_id: str | None = None
    language: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    token: str | None = None
    resume_from: int | None = None
    history_limit: int = DEFAULT_HISTORY_LIMIT


@dataclass(frozen=True, slots=True)
class UserMessage:
    """``message``: chat text or a speech transcript (``final: false`` is interim)."""

    text: str
    final: bool = True
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class Interrupt:
    """``interrupt``: barge-in; how much of the reply the user heard, and why."""

    heard_chars: int | None = None
    heard_text: str | None = None
    reason: str = "barge_in"
    reply_id: str | None = None


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """``state``: merge fields into the user's state."""

    state: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: heartbeat; ``ts`` is echoed back in ``pong``."""

    ts: str | int | float | None = None


@dataclass(frozen=True, slots=True)
class End:
    """``end``: end the session explicitly."""


ClientFrame = Start | UserMessage | Interrupt | StateUpdate | Ping | End


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer with an ``error`` frame; the connection stays usable."""

    error: FrameRejected


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code`` (after an ``error`` frame with ``error``)."""

    code: CloseCode
    reason: str
    error: ErrorCode


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
            return RateDecision.ALLOW
        self.strikes += 1
        if self.strikes > self._max_strikes:
            return RateDecision.CLOSE
        return RateDecision.REJECT


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
        if self.state is ConnectionState.CLOSED:
            raise RuntimeError("Cannot receive a frame once the connection is closed.")
        if frame_too_large(data, self.max_frame_bytes):
            return Close(
                CloseCode.MESSAGE_TOO_BIG,
                f"frame over {self.max_frame_bytes} bytes",
                ErrorCode.FRAME_TOO_LARGE,
            )
        decision = self.limiter.check()
        if decision is RateDecision.CLOSE:
            return Close(
                CloseCode.POLICY_VIOLATION, "message-rate limit exceeded", ErrorCode.RATE_LIMITED
            )
        if decision is RateDecision.REJECT:
            return _reject(ErrorCode.RATE_LIMITED, "Too many frames; slow down.")
        try:
            frame = parse_frame(data)
        except FrameRejected as exc:
            return Reject(exc)
        return self._admit(frame)

    def _admit(self, frame: ClientFrame) -> Received:
        if isinstance(frame, Ping):
            return frame
        state = self.state
        if state is ConnectionState.AWAITING_START and not isinstance(frame, Start):
            return _reject(ErrorCode.NOT_STARTED, "Send a start frame first.")
        if state is ConnectionState.ACTIVE and isinstance(frame, Start):
            return _reject(ErrorCode.ALREADY_STARTED, "This connection has already started.")
        if state is ConnectionState.ENDED:
            return _reject(ErrorCode.SESSION_ENDED, "The session has ended.")
        return frame


def _reject(code: ErrorCode, message: str) -> Reject:
    return Reject(FrameRejected(code.value, message))


# -- parsing -----------------------------------------------------------------------


def parse_frame(data: str | bytes) -> ClientFrame:
    """Parse one client frame; raises :class:`FrameRejected` naming what is wrong."""
    if isinstance(data, bytes):
        raise FrameRejected(ErrorCode.BAD_FRAME, "Binary frames are not supported; send JSON text.")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        raise FrameRejected(ErrorCode.BAD_JSON, "The frame is not valid JSON.") from None
    if not isinstance(raw, dict):
        raise FrameRejected(ErrorCode.BAD_FRAME, "A frame must be a JSON object.")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise FrameRejected(ErrorCode.BAD_FRAME, "A frame needs a string field 'type'.")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise FrameRejected(ErrorCode.UNKNOWN_TYPE, f"Unknown frame type {kind[:40]!r}.")
    try:
        return parser(raw)
    except InvalidField as exc:
        raise FrameRejected(ErrorCode.INVALID_FIELD, exc.message) from None


def _optional_str(raw: Mapping[str, Any], name: str, max_chars: int) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField(name, "must be a string")
    if len(value) > max_chars:
        raise InvalidField(name, f"must be at most {max_chars} characters")
    return value


def _optional_int(
    raw: Mapping[str, Any], name: str, *, lo: int, hi: int | None = None
) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidField(name, "must be an integer")
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise InvalidField(name, f"must be {bounds}")
    return value


def _optional_bool(raw: Mapping[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise InvalidField(name, "must be true or false")
    return value


def _parse_start(raw: Mapping[str, Any]) -> Start:
    if "userId" not in raw:
        raise InvalidField("userId", "is required")
    user_id = check_id(raw["userId"], "userId")
    session_id = raw.get("sessionId")
    if session_id is not None:
        session_id = check_session_id(session_id)
    metadata = raw.get("metadata")
    metadata = check_object(metadata, "metadata") if metadata is not None else {}
    resume_from: int | None = None
    resume = raw.get("resume")
    if resume is not None:
        if not isinstance(resume, Mapping):
            raise InvalidField("resume", "must be an object")
        if session_id is None:
            raise InvalidField("resume", "needs a sessionId")
        resume_from = _optional_int(resume, "lastSeq", lo=0)
        if resume_from is None:
            raise InvalidField("resume.lastSeq", "is required")
    history_limit = _optional_int(raw, "historyLimit", lo=0, hi=MAX_HISTORY_LIMIT)
    return Start(
        user_id=user_id,
        session_id=session_id,
        language=_optional_str(raw, "language", MAX_LANGUAGE_CHARS),
        metadata=metadata,
        token=_optional_str(raw, "token", 16 * 1024),
        resume_from=resume_from,
        history_limit=DEFAULT_HISTORY_LIMIT if history_limit is None else history_limit,
    )


def _parse_message(raw: Mapping[str, Any]) -> UserMessage:
    text = raw.get("text")
    if not isinstance(text, str):
        raise InvalidField("text", "must be a string")
    if not text.strip():
        raise InvalidField("text", "must not be empty")
    return UserMessage(
        text=text,
        final=_optional_bool(raw, "final", True),
        client_id=_optional_str(raw, "clientId", MAX_CLIENT_ID_CHARS),
    )


def _parse_interrupt(raw: Mapping[str, Any]) -> Interrupt:
    heard_chars = _optional_int(raw, "heardChars", lo=0)
    heard_text = raw.get("heardText")
    if heard_text is not None and not isinstance(heard_text, str):
        raise InvalidField("heardText", "must be a string")
    if heard_chars is not None and heard_text is not None:
        raise InvalidField("heardChars", "and heardText cannot both be given")
    return Interrupt(
        heard_chars=heard_chars,
        heard_text=heard_text,
        reason=_optional_str(raw, "reason", MAX_REASON_CHARS) or "barge_in",
        reply_id=_optional_str(raw, "replyId", MAX_CLIENT_ID_CHARS),
    )


def _parse_state(raw: Mapping[str, Any]) -> StateUpdate:
    if "state" not in raw:
        raise InvalidField("state", "is required")
    return StateUpdate(state=check_object(raw["state"], "state"))


def _parse_ping(raw: Mapping[str, Any]) -> Ping:
    ts = raw.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, str | int | float)):
        raise InvalidField("ts", "must be a number or a string")
    if isinstance(ts, str) and len(ts) > MAX_CLIENT_ID_CHARS:
        raise InvalidField("ts", f"must be at most {MAX_CLIENT_ID_CHARS} characters")
    return Ping(ts=ts)


def _parse_end(raw: Mapping[str, Any]) -> End:
    return End()


_PARSERS: dict[str, Callable[[Mapping[str, Any]], ClientFrame]] = {
    "start": _parse_start,
    "message": _parse_message,
    "interrupt": _parse_interrupt,
    "state": _parse_state,
    "ping": _parse_ping,
    "end": _parse_end,
}


# -- sequence numbers, barge-in and resume -------------------------------------------


# ``last_seq``, ``heard_part``, ``plan_resume`` and their types are rules of the
# conversation (``samvad.conversation``); imported here for the frames and for
# the code that knew them from this module.


# -- server frames -----------------------------------------------------------------


def encode(frame: Mapping[str, Any]) -> str:
    """A server frame as compact JSON text."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def state_json(state: UserState | None) -> dict[str, Any]:
    """A user's state as frames carry it (the REST shape; ``{}`` when there is none)."""
    return wire.state_json(state) if state is not None else {}


def interruption_json(interruption: Interruption) -> dict[str, Any]:
    return {
        "at": to_iso(interruption.at),
        "reason": interruption.reason,
        "heard": interruption.heard,
        "cut": interruption.cut,
        "messageId": interruption.message_id,
    }


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
) -> dict[str, Any]:
    return {
        "type": "started",
        "protocol": PROTOCOL_VERSION,
        "sessionId": session_id,
        "userId": user_id,
        "mode": mode,
        "state": state_json(state),
        "history": [wire.message_json(m) for m in history],
        "lastSeq": last_seq,
        "resumed": resumed,
        "limits": dict(limits),
    }


def resume_frame(
    plan: ResumePlan, *, last_seq: int, in_flight: Mapping[str, Any] | None
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "resume", "recovered": plan.recovered, "lastSeq": last_seq}
    if plan.recovered:
        frame["messages"] = [wire.message_json(m) for m in plan.messages]
    else:
        assert plan.reason is not None
        frame["reason"] = plan.reason.value
    frame["inFlight"] = dict(in_flight) if in_flight is not None else None
    return frame


def ack_frame(message: Message, client_id: str | None) -> dict[str, Any]:
    return {
        "type": "ack",
        "seq": message.seq,
        "messageId": message.id,
        "clientId": client_id,
        "timestamp": to_iso(message.timestamp),
    }


def message_frame(message: Message) -> dict[str, Any]:
    return {"type": "message", "message": wire.message_json(message)}


def reply_start_frame(reply_id: str, *, in_reply_to: int | None) -> dict[str, Any]:
    return {"type": "reply.start", "replyId": reply_id, "inReplyTo": in_reply_to}


def reply_chunk_frame(reply_id: str, *, index: int, text: str) -> dict[str, Any]:
    return {"type": "reply.chunk", "replyId": reply_id, "index": index, "text": text}


def reply_end_frame(
    reply_id: str, *, message: Message | None, text: str, complete: bool
) -> dict[str, Any]:
    return {
        "type": "reply.end",
        "replyId": reply_id,
        "seq": message.seq if message is not None else None,
        "messageId": message.id if message is not None else None,
        "text": text,
        "complete": complete,
    }


def interrupted_frame(
    reply_id: str, *, heard: str, message: Message | None, reason: str, late: bool
) -> dict[str, Any]:
    return {
        "type": "interrupted",
        "replyId": reply_id,
        "heard": heard,
        "seq": message.seq if message is not None else None,
        "messageId": message.id if message is not None else None,
        "reason": reason,
        "late": late,
    }


def state_frame(state: UserState) -> dict[str, Any]:
    return {"type": "state", "state": state_json(state)}


def pong_frame(ts: str | int | float | None, server_time: str) -> dict[str, Any]:
    return {"type": "pong", "ts": ts, "serverTime": server_time}


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def ended_frame(session_id: str) -> dict[str, Any]:
    return {"type": "ended", "sessionId": session_id}
