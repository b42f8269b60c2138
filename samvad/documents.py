"""How domain objects are laid out as Firestore documents, and back.

The field names here are part of the contract with the original system
(camelCase, ``user_states`` / ``user_profiles`` / ``sessions``). Decoding is
lenient: documents written by the original JavaScript backend (ISO strings
for timestamps, messages without ids) read back without error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from samvad.clock import parse_iso
from samvad.history import (
    extended,
    history_bytes,
    in_time_order,
    merge,
    order_key,
    trim,
)
from samvad.models import Message, Profile, Role, Session, SessionStatus, UserState

__all__ = [
    "IDEMPOTENCY_KEYS",
    "INTERRUPTIONS",
    "PROFILES",
    "SESSIONS",
    "STATES",
    "STATE_SERVER_FIELDS",
    "Document",
    "decode_message",
    "decode_profile",
    "decode_session",
    "decode_state",
    "empty_profile",
    "encode_message",
    "encode_profile",
    "encode_session",
    "profile_with",
    "state_fields",
]

STATES = "user_states"
PROFILES = "user_profiles"
SESSIONS = "sessions"
INTERRUPTIONS = "interruptions"
#: First responses to REST writes sent with an Idempotency-Key (``samvad.idempotency``).
IDEMPOTENCY_KEYS = "idempotency_keys"

Document = dict[str, Any]

# Fields the server owns in a user_states document; everything else is the client's.
STATE_SERVER_FIELDS = ("updatedAt", "isActive")


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return parse_iso(value)
        except ValueError:
            return None
    return None


# -- user_states -------------------------------------------------------------


def state_fields(data: Mapping[str, Any], now: datetime) -> Document:
    """The fields a state save writes: the client's fields plus ``updatedAt``/``isActive``."""
    fields = dict(data)
    fields["updatedAt"] = now
    fields["isActive"] = True
    return fields


def decode_state(user_id: str, doc: Mapping[str, Any]) -> UserState:
    data = {k: v for k, v in doc.items() if k not in STATE_SERVER_FIELDS}
    return UserState(
        user_id=user_id,
        data=data,
        updated_at=_time(doc.get("updatedAt")),
        is_active=bool(doc.get("isActive", True)),
    )


# -- user_profiles -----------------------------------------------------------


def encode_message(message: Message) -> Document:
    doc: Document = {
        "id": message.id,
        "role": message.role.value,
        "content": message.content,
        "timestamp": message.timestamp,
    }
    if message.session_id is not None:
        doc["sessionId"] = message.session_id
    if message.interrupted:
        doc["interrupted"] = True
    if message.seq is not None:
        doc["seq"] = message.seq
    if message.client_id is not None:
        doc["clientId"] = message.client_id
    return doc


def decode_message(doc: Mapping[str, Any]) -> Message:
    timestamp = _time(doc.get("timestamp")) or datetime.fromtimestamp(0, UTC)
    content = doc.get("content")
    content = content if isinstance(content, str) else ""
    role_raw = doc.get("role")
    try:
        role = Role(str(role_raw))
    except ValueError:
        role = Role.SYSTEM
    message_id = doc.get("id")
    if not isinstance(message_id, str) or not message_id:
        # Written by the original backend, which kept no ids: derive a stable one
        # so merges stay idempotent for these messages too.
        digest = hashlib.sha256(
            f"{timestamp.isoformat()}|{role.value}|{content}".encode()
        ).hexdigest()
        message_id = "legacy-" + digest[:20]
    seq = doc.get("seq")
    session_id = doc.get("sessionId")
    client_id = doc.get("clientId")
    return Message(
        id=message_id,
        role=role,
        content=content,
        timestamp=timestamp,
        session_id=session_id if isinstance(session_id, str) else None,
        interrupted=bool(doc.get("interrupted", False)),
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        client_id=client_id if isinstance(client_id, str) else None,
    )


def encode_profile(profile: Profile) -> Document:
    history = profile.history
    return {
        "userId": profile.user_id,
        "conversationHistory": [encode_message(m) for m in history],
        "preferences": dict(profile.preferences),
        "historyLength": len(history),
        "createdAt": profile.created_at,
        "lastUpdated": profile.last_updated,
    }


def decode_profile(user_id: str, doc: Mapping[str, Any], *, cap: int, max_bytes: int) -> Profile:
    raw_history = doc.get("conversationHistory")
    messages = [
        decode_message(item)
        for item in (raw_history if isinstance(raw_history, list) else [])
        if isinstance(item, Mapping)
    ]
    if not in_time_order(messages):
        # Samvad writes histories in time order; one written by another client
        # (the original backend) may not be. Every history held is kept in
        # order, which is what lets ``merge`` skip the id check for new messages.
        messages.sort(key=order_key)
    history, size = trim(messages, cap=cap, max_bytes=max_bytes)
    preferences = doc.get("preferences")
    return Profile.of(
        user_id,
        history=history,
        preferences=dict(preferences) if isinstance(preferences, Mapping) else {},
        created_at=_time(doc.get("createdAt")),
        last_updated=_time(doc.get("lastUpdated")),
        history_bytes=size,
    )


def empty_profile(user_id: str) -> Profile:
    return Profile(user_id)


def profile_with(
    profile: Profile,
    *,
    messages: list[Message],
    preferences: Mapping[str, Any] | None,
    now: datetime,
    cap: int,
    max_bytes: int,
) -> Profile:
    """``profile`` with ``messages`` merged in (by id, in time order), bounded, and
    ``preferences`` merged over the stored ones."""
    prefs = profile.preferences
    if preferences:
        prefs = {**profile.preferences, **preferences}
    if not messages:
        return Profile(
            profile.user_id,
            prefs,
            profile.created_at or now,
            now,
            profile.history_bytes,
            profile.log,
            profile.log_start,
            profile.log_end,
            profile.log_spent,
        )
    created_at = profile.created_at or min(now, messages[0].timestamp)
    # The common case, new messages after the newest: onto the shared log.
    window = extended(profile, messages, cap=cap, max_bytes=max_bytes)
    if window is not None:
        log, start, end, size, spent = window
        return Profile(profile.user_id, prefs, created_at, now, size, log, start, end, spent)
    history = profile.history
    merged = merge(history, messages)
    known_size = None
    if len(merged) == len(history) + len(messages) and merged[-1] is messages[-1]:
        known_size = profile.history_bytes + history_bytes(messages)
    kept, size = trim(merged, cap=cap, max_bytes=max_bytes, size=known_size)
    return Profile.of(
        profile.user_id,
        history=kept,
        preferences=prefs,
        created_at=created_at,
        last_updated=now,
        history_bytes=size,
    )


# -- sessions ------------------------------------------------------------------


def encode_session(session: Session) -> Document:
    return {
        "id": session.id,
        "userId": session.user_id,
        "language": session.language,
        "metadata": dict(session.metadata),
        "isActive": session.is_active,
        "status": session.status.value,
        "createdAt": session.created_at,
        "lastActivity": session.last_activity,
        "endedAt": session.ended_at,
        "expireAt": session.expire_at,
    }


def decode_session(session_id: str, doc: Mapping[str, Any]) -> Session:
    status_raw = doc.get("status")
    try:
        status = SessionStatus(str(status_raw))
    except ValueError:
        status = SessionStatus.ACTIVE if doc.get("isActive", True) else SessionStatus.ENDED
    metadata = doc.get("metadata")
    language = doc.get("language")
    user_id = doc.get("userId")
    return Session(
        id=session_id,
        user_id=user_id if isinstance(user_id, str) else "",
        language=language if isinstance(language, str) else None,
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
        status=status,
        created_at=_time(doc.get("createdAt")),
        last_activity=_time(doc.get("lastActivity")),
        ended_at=_time(doc.get("endedAt")),
        expire_at=_time(doc.get("expireAt")),
    )
