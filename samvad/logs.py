"""Logging setup: human-readable text by default, one JSON object per line on request.

Log records carry ids (user, session, request), never conversation content.
The ids of the request or connection being served live in context variables
(set by ``samvad.web.middleware``, the REST handlers and the WebSocket glue);
:class:`ContextFilter` copies them onto every record, so JSON lines carry
``request_id``, ``user_id`` and ``session_id`` without each call passing them.
An HTTP request keeps all of them in one :class:`LogContext` (one context
variable set per request instead of four); a WebSocket connection uses the
variables one by one.

JSON lines are what Cloud Logging reads from a container's output: besides
``level`` they carry ``severity`` (the field it reads; it ignores ``level``)
and, for a request that came with a trace header (``X-Cloud-Trace-Context``
on Cloud Run, or W3C ``traceparent``), ``logging.googleapis.com/trace``,
``.../spanId`` and ``.../trace_sampled``, which group a request's lines under
its trace in the console.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from samvad.config import Settings

__all__ = [
    "SAMPLED_KEY",
    "SPAN_KEY",
    "TRACE_KEY",
    "ContextFilter",
    "JsonFormatter",
    "LogContext",
    "TraceContext",
    "bind_log_context",
    "configure_logging",
    "log_context_var",
    "parse_trace",
    "request_id_var",
    "session_id_var",
    "trace_var",
    "user_id_var",
]

#: The id of the HTTP request or WebSocket being served (``X-Request-ID``).
request_id_var: ContextVar[str | None] = ContextVar("samvad_request_id", default=None)
#: The user the request or connection acts for.
user_id_var: ContextVar[str | None] = ContextVar("samvad_user_id", default=None)
#: The session the request or connection is about.
session_id_var: ContextVar[str | None] = ContextVar("samvad_session_id", default=None)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The trace a request belongs to (from its trace header)."""

    trace_id: str
    span_id: str | None = None
    sampled: bool = False


#: The trace of the request being served, when it came with a trace header.
trace_var: ContextVar[TraceContext | None] = ContextVar("samvad_trace", default=None)


@dataclass(slots=True)
class LogContext:
    """The ids of one HTTP request, in one context variable (:data:`log_context_var`).

    :func:`bind_log_context` fills in the user and the session as the request
    learns them; tasks started while it is served share the object, as they
    would share the variables' values.
    """

    request_id: str
    trace: TraceContext | None = None
    user_id: str | None = None
    session_id: str | None = None


#: The HTTP request being served (when set, it wins over the single variables).
log_context_var: ContextVar[LogContext | None] = ContextVar("samvad_log_context", default=None)

_HEX = frozenset("0123456789abcdefABCDEF")


def parse_trace(headers: Iterable[tuple[bytes, bytes]]) -> TraceContext | None:
    """The trace named by ``X-Cloud-Trace-Context`` or ``traceparent`` (None when
    neither is there or well formed); the first is what Cloud Run sets."""
    cloud: bytes | None = None
    w3c: bytes | None = None
    for name, value in headers:
        if name == b"x-cloud-trace-context":
            cloud = value
        elif name == b"traceparent":
            w3c = value
    if cloud is not None:
        # TRACE_ID/SPAN_ID;o=OPTIONS, span and options optional.
        text = cloud.decode("latin-1")
        trace, _, rest = text.partition("/")
        span, _, options = rest.partition(";")
        if len(trace) == 32 and _HEX.issuperset(trace):
            return TraceContext(
                trace_id=trace.lower(),
                # Cloud Logging wants the span as 16 hex digits; the header has it in decimal.
                span_id=format(int(span), "016x")
                if span.isdigit() and 0 < int(span) < 2**64
                else None,
                sampled=options == "o=1",
            )
    if w3c is not None:
        # VERSION-TRACEID-PARENTID-FLAGS
        parts = w3c.decode("latin-1").split("-")
        if len(parts) == 4 and len(parts[1]) == 32 and _HEX.issuperset(parts[1]):
            parent = parts[2] if len(parts[2]) == 16 and _HEX.issuperset(parts[2]) else None
            flags = parts[3]
            sampled = len(flags) == 2 and _HEX.issuperset(flags) and int(flags, 16) & 1 == 1
            return TraceContext(trace_id=parts[1].lower(), span_id=parent, sampled=sampled)
    return None


_CONTEXT = (
    ("request_id", request_id_var),
    ("user_id", user_id_var),
    ("session_id", session_id_var),
)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def bind_log_context(*, user_id: str | None = None, session_id: str | None = None) -> None:
    """Tag the log records of the current request or connection with these ids."""
    context = log_context_var.get()
    if context is not None:
        if user_id is not None:
            context.user_id = user_id
        if session_id is not None:
            context.session_id = session_id
        return
    if user_id is not None:
        user_id_var.set(user_id)
    if session_id is not None:
        session_id_var.set(session_id)


class ContextFilter(logging.Filter):
    """Adds the current request, user and session ids to each record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = log_context_var.get()
        if context is not None:
            values: Iterable[tuple[str, str | None]] = (
                ("request_id", context.request_id),
                ("user_id", context.user_id),
                ("session_id", context.session_id),
            )
            trace = context.trace
        else:
            values = ((name, var.get()) for name, var in _CONTEXT)
            trace = trace_var.get()
        for name, value in values:
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        if trace is not None and not hasattr(record, "_trace"):
            record._trace = trace
        return True


#: Python's level names as Cloud Logging severities.
_SEVERITY = {"WARN": "WARNING", "FATAL": "CRITICAL"}

TRACE_KEY = "logging.googleapis.com/trace"
SPAN_KEY = "logging.googleapis.com/spanId"
SAMPLED_KEY = "logging.googleapis.com/trace_sampled"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, severity (and level), logger, message, the
    trace of the request (Cloud Logging's fields), and extra fields.

    ``project`` makes the trace a full resource name
    (``projects/P/traces/T``), as Cloud Logging wants it.
    """

    def __init__(self, *, project: str | None = None) -> None:
        super().__init__()
        self._project = project

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "severity": _SEVERITY.get(record.levelname, record.levelname),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace: TraceContext | None = getattr(record, "_trace", None)
        if trace is not None:
            entry[TRACE_KEY] = (
                f"projects/{self._project}/traces/{trace.trace_id}"
                if self._project
                else trace.trace_id
            )
            if trace.span_id is not None:
                entry[SPAN_KEY] = trace.span_id
            entry[SAMPLED_KEY] = trace.sampled
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> None:
    """Configure the root logger (and uvicorn's) from the settings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(project=settings.project))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn's access lines carry paths, which carry user ids, and come at
    # INFO only: off (``SAMVAD_ACCESS_LOG`` logs route templates instead). With
    # no handler to reach, uvicorn does not even format them: it checks once
    # per connection, and building each line's arguments cost about 2 % of
    # the CPU of a GET.
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.WARNING)
    access.propagate = False
