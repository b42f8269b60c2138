"""How ADK sessions, events and scoped state are laid out in Firestore.

Four collections under a prefix (``adk_`` by default), apart from Samvad's own
``sessions`` and from ADK's ``FirestoreSessionService`` (``adk-session``,
``app_states``, ``user_states``):

* ``{prefix}sessions/{app|user|session}`` — ``appName``, ``userId``,
  ``sessionId``, ``createTime``, ``updateTime`` (epoch seconds, as ADK keeps
  them), ``revision``, ``chunk`` and one field ``s:<key>`` per session-scoped
  state key.
* ``{prefix}events/{app|user|session|chunk}`` — the event log in chunks:
  ``session``, ``appName``, ``userId``, ``chunk`` and one field
  ``e:<seq>:<event id>`` per event holding the event as ADK's JSON. A chunk
  holds at most :data:`CHUNK_EVENTS` events and :data:`CHUNK_BYTES` of them,
  so a burst of events in one session becomes one Firestore write, and no
  document approaches the 1 MiB limit.
* ``{prefix}app_states/{app}`` and ``{prefix}user_states/{app|user}`` —
  ``s:<key>`` fields (plus ``appName`` / ``userId``).

Each state value is stored as its JSON text: any JSON value (nested lists,
which Firestore arrays cannot hold, or very large integers) round-trips, and
each key is its own field, so writers of different keys never overwrite each
other. Events carry their id in the field name, so events appended by two
server instances to one session both survive.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from samvad.documents import Document

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_EVENTS",
    "EVENT_FIELD",
    "MAX_EVENT_BYTES",
    "STATE_FIELD",
    "Collections",
    "app_state_id",
    "chunk_id",
    "decode_state",
    "event_field",
    "parse_event_field",
    "session_key",
    "state_fields",
    "user_state_id",
    "user_state_suffix",
]

#: Events per chunk document, and bytes of event JSON per chunk.
CHUNK_EVENTS = 64
CHUNK_BYTES = 256 * 1024
#: An event larger than this cannot be stored (Firestore's limit is 1 MiB).
MAX_EVENT_BYTES = 900 * 1024

STATE_FIELD = "s:"
EVENT_FIELD = "e:"


@dataclass(frozen=True, slots=True)
class Collections:
    """The four collection names under one prefix."""

    sessions: str
    events: str
    app_states: str
    user_states: str

    @classmethod
    def under(cls, prefix: str) -> Collections:
        if not prefix or "/" in prefix:
            raise ValueError(f"An ADK collection prefix must be a non-empty name; got {prefix!r}.")
        return cls(
            sessions=prefix + "sessions",
            events=prefix + "events",
            app_states=prefix + "app_states",
            user_states=prefix + "user_states",
        )


@functools.lru_cache(maxsize=65536)
def _part(text: str) -> str:
    # Percent-encoding keeps "/" (a path separator) and "|" (ours) out of ids;
    # "_" and "." are encoded too so no id can be "." or a reserved "__x__".
    return quote(text, safe="").replace("_", "%5F").replace(".", "%2E")


def session_key(app_name: str, user_id: str, session_id: str) -> str:
    """The document id of a session (also its write-behind barrier)."""
    return f"{_part(app_name)}|{_part(user_id)}|{_part(session_id)}"


def chunk_id(key: str, chunk: int) -> str:
    return f"{key}|{chunk:06d}"


def app_state_id(app_name: str) -> str:
    return _part(app_name)


def user_state_id(app_name: str, user_id: str) -> str:
    return f"{_part(app_name)}|{_part(user_id)}"


def user_state_suffix(user_id: str) -> str:
    """How the ids of a user's user-state documents end (one per app)."""
    return "|" + _part(user_id)


def event_field(seq: int, event_id: str) -> str:
    return f"{EVENT_FIELD}{seq:09d}:{event_id}"


def parse_event_field(name: str) -> tuple[int, str] | None:
    """(seq, event id) of an event field name; None for any other field."""
    if not name.startswith(EVENT_FIELD):
        return None
    seq, _, event_id = name[len(EVENT_FIELD) :].partition(":")
    try:
        return int(seq), event_id
    except ValueError:
        return None


def state_fields(values: dict[str, Any]) -> dict[str, str]:
    """State values (already JSON-safe) as ``s:<key>`` fields of JSON text."""
    return {STATE_FIELD + key: json.dumps(value) for key, value in values.items()}


def decode_state(doc: Document | None) -> dict[str, Any]:
    """The state held in a document's ``s:<key>`` fields."""
    if not doc:
        return {}
    state: dict[str, Any] = {}
    for name, value in doc.items():
        if name.startswith(STATE_FIELD) and isinstance(value, str):
            state[name[len(STATE_FIELD) :]] = json.loads(value)
    return state
