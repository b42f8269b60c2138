"""How domain objects look on the wire: the original's camelCase JSON, with
timestamps as ISO-8601 UTC with milliseconds (``2025-01-10T17:00:00.000Z``)."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from samvad.clock import to_iso
from samvad.models import (
    Message,
    PersistenceStatus,
    Profile,
    Session,
    SessionStatus,
    UserState,
)


def _iso(value: datetime | None) -> str | None:
    return to_iso(value) if value is not None else None


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON, timestamps in the wire format.

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
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def message_json(message: Message) -> dict[str, Any]:
    """A history entry as the original served it, plus ``id`` and optional fields."""
    out: dict[str, Any] = {
        "id": message.id,
        "role": message.role.value,
        "content": message.content,
        "timestamp": to_iso(message.timestamp),
    }
    if message.session_id is not None:
        out["sessionId"] = message.session_id
    if message.interrupted:
        out["interrupted"] = True
    if message.seq is not None:
        out["seq"] = message.seq
    return out


def state_json(state: UserState) -> dict[str, Any]:
    out = jsonable(state.data)
    out["updatedAt"] = _iso(state.updated_at)
    out["isActive"] = state.is_active
    return dict(out)


def profile_json(profile: Profile) -> dict[str, Any]:
    return {
        "userId": profile.user_id,
        "conversationHistory": [message_json(m) for m in profile.history],
        "preferences": jsonable(profile.preferences),
        "historyLength": len(profile.history),
        "createdAt": _iso(profile.created_at),
        "lastUpdated": _iso(profile.last_updated),
    }


def session_json(session: Session, status: SessionStatus) -> dict[str, Any]:
    """A session with the status as served (see :func:`effective_status`)."""
    return {
        "id": session.id,
        "userId": session.user_id,
        "language": session.language,
        "metadata": jsonable(session.metadata),
        "isActive": status is SessionStatus.ACTIVE,
        "status": status.value,
        "createdAt": _iso(session.created_at),
        "lastActivity": _iso(session.last_activity),
        "endedAt": _iso(session.ended_at),
        "expireAt": _iso(session.expire_at),
    }


def status_fields(status: PersistenceStatus) -> dict[str, Any]:
    """The persistence status as JSON fields (``/healthz``, stats)."""
    return {
        "mode": status.mode.value,
        "backend": status.backend,
        "pendingWrites": status.pending_documents,
        "pendingInFlight": status.pending_in_flight,
        "oldestPendingAgeSeconds": round(status.oldest_pending_age, 3),
        "replayLagSeconds": round(status.replay_lag, 3),
        "writesIssued": status.writes_issued,
        "writeFailures": status.write_failures,
        "modeSince": to_iso(status.mode_since),
        "lastError": status.last_error,
    }
