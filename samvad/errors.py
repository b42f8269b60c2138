"""The error hierarchy.

Each class carries the HTTP status and the WebSocket close code that stand for
it, and the stable ``code`` that REST error bodies and WebSocket ``error``
frames carry (``docs/protocol.md`` lists them): these classes are the one list
of error codes. They are turned into responses in exactly one place per
transport (``samvad.web.http_errors`` for REST, the WebSocket glue for frames).
"""

from __future__ import annotations

__all__ = [
    "AlreadyStarted",
    "AuthUnavailable",
    "BacklogFull",
    "BadFrame",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "DataUnavailable",
    "Forbidden",
    "FrameTooLarge",
    "IdempotencyKeyReused",
    "IdleTimeout",
    "InvalidField",
    "MalformedJson",
    "MethodNotAllowed",
    "NotFound",
    "NotStarted",
    "NothingToInterrupt",
    "PayloadTooLarge",
    "RateLimited",
    "SamvadError",
    "SessionEnded",
    "StartTimeout",
    "Unauthorized",
    "UnknownFrameType",
]


class SamvadError(Exception):
    """Base of every error Samvad reports to a client."""

    status_code: int = 500
    close_code: int = 1011
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SamvadError):
    """The request is malformed or a value is invalid."""

    status_code = 400
    close_code = 1007
    code = "bad_request"


class InvalidField(BadRequest):
    """One named field of the request is missing or has a wrong value."""

    code = "invalid_field"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field


class MalformedJson(BadRequest):
    """The body or frame is not valid JSON (also NaN, Infinity, duplicate keys)."""

    code = "bad_json"


class BadFrame(BadRequest):
    """A WebSocket frame is not a JSON object with a string ``type``, or is binary."""

    code = "bad_frame"


class UnknownFrameType(BadRequest):
    """A WebSocket frame's ``type`` is none of the protocol's."""

    code = "unknown_type"


class NotStarted(BadRequest):
    """A WebSocket frame other than ``start`` or ``ping`` came before ``start``."""

    code = "not_started"


class AlreadyStarted(BadRequest):
    """A second ``start`` on one WebSocket connection."""

    code = "already_started"


class SessionEnded(BadRequest):
    """A WebSocket frame came after the session ended."""

    code = "session_ended"


class NothingToInterrupt(BadRequest):
    """An ``interrupt`` with no reply to cut."""

    code = "nothing_to_interrupt"


class Unauthorized(SamvadError):
    """Credentials are missing or invalid."""

    status_code = 401
    close_code = 4401
    code = "unauthorized"


class Forbidden(SamvadError):
    """The caller is authenticated but may not touch this resource."""

    status_code = 403
    close_code = 4403
    code = "forbidden"


class NotFound(SamvadError):
    """The addressed resource does not exist."""

    status_code = 404
    close_code = 4404
    code = "not_found"


class MethodNotAllowed(SamvadError):
    """The path does not support the request's method (REST only)."""

    status_code = 405
    code = "method_not_allowed"


class Conflict(SamvadError):
    """The request conflicts with the current state of the resource."""

    status_code = 409
    close_code = 4409
    code = "conflict"


class IdempotencyKeyReused(SamvadError):
    """An ``Idempotency-Key`` already answered a different request (``samvad.idempotency``)."""

    status_code = 422
    close_code = 1008
    code = "idempotency_key_reused"


class PayloadTooLarge(SamvadError):
    """The body or frame is larger than the configured limit."""

    status_code = 413
    close_code = 1009
    code = "payload_too_large"


class FrameTooLarge(PayloadTooLarge):
    """A WebSocket frame is larger than ``ws_max_frame_bytes`` (the connection is closed)."""

    code = "frame_too_large"


class RateLimited(SamvadError):
    """The caller sent more than its limit allows."""

    status_code = 429
    close_code = 1008
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BacklogFull(SamvadError):
    """Too many documents wait for Firestore; new ones are refused until it drains.

    Nothing already acknowledged is dropped: the refusal is what keeps that promise.
    """

    status_code = 503
    close_code = 1013
    code = "backlog_full"


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names the variable."""


class IdleTimeout(SamvadError):
    """No WebSocket frame came for ``ws_idle_timeout`` seconds."""

    status_code = 408
    close_code = 4408
    code = "idle_timeout"


class StartTimeout(IdleTimeout):
    """No ``start`` frame came within ``ws_start_timeout`` seconds of connecting."""

    code = "start_timeout"


class AuthUnavailable(SamvadError):
    """Credentials could not be checked right now (e.g. Google's public keys could
    not be fetched); the caller's credentials may well be valid, so retry."""

    status_code = 503
    close_code = 1013
    code = "auth_unavailable"


class DataUnavailable(SamvadError):
    """Firestore cannot be read right now (memory-only mode) and what this instance
    holds in memory may not be all there is: the answer would be a guess.

    Raised instead of :class:`NotFound` (or a partial answer) so that nobody is
    told a user or session does not exist when it may. ``retry_after`` is the
    number of seconds until the write-behind next probes Firestore.
    """

    status_code = 503
    close_code = 1013
    code = "data_unavailable"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
