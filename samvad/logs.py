"""Logging setup: human-readable text by default, one JSON object per line on request.

Log records carry ids (user, session, request), never conversation content.
The ids of the request or connection being served live in context variables
(set by ``samvad.web.middleware``, the REST handlers and the WebSocket glue);
:class:`ContextFilter` copies them onto every record, so JSON lines carry
``request_id``, ``user_id`` and ``session_id`` without each call passing them.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from samvad.config import Settings

#: The id of the HTTP request or WebSocket being served (``X-Request-ID``).
request_id_var: ContextVar[str | None] = ContextVar("samvad_request_id", default=None)
#: The user the request or connection acts for.
user_id_var: ContextVar[str | None] = ContextVar("samvad_user_id", default=None)
#: The session the request or connection is about.
session_id_var: ContextVar[str | None] = ContextVar("samvad_session_id", default=None)

_CONTEXT = (
    ("request_id", request_id_var),
    ("user_id", user_id_var),
    ("session_id", session_id_var),
)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def bind_log_context(*, user_id: str | None = None, session_id: str | None = None) -> None:
    """Tag the log records of the current request or connection with these ids."""
    if user_id is not None:
        user_id_var.set(user_id)
    if session_id is not None:
        session_id_var.set(session_id)


class ContextFilter(logging.Filter):
    """Adds the current request, user and session ids to each record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
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
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Access logs carry paths, which carry user ids: fine at INFO, but noisy.
    level = logging.getLevelNamesMapping()[settings.log_level]
    logging.getLogger("uvicorn.access").setLevel(max(level, logging.WARNING))
