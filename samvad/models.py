"""Domain types: what Samvad stores and serves, independent of any backend."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec

__all__ = [
    "MESSAGE_OVERHEAD_BYTES",
    "Message",
    "Mode",
    "PersistenceStatus",
    "Profile",
    "Role",
    "Session",
    "SessionPage",
    "SessionStatus",
    "StoreCounts",
    "UserState",
    "approx_bytes",
]


class Role(StrEnum):
    """Who said a message."""

    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class SessionStatus(StrEnum):
    """Life cycle of a session: ``active`` until ended, or ``abandoned`` when left idle."""

    ACTIVE = "active"
    ENDED = "ended"
    ABANDONED = "abandoned"


class Mode(StrEnum):
    """Where writes go right now."""

    FIRESTORE = "firestore"
    MEMORY = "memory"


# Per-message bookkeeping counted on top of the content's UTF-8 bytes when
# bounding a history in bytes: field names, id, role, timestamp and session id,
# as Firestore counts a map's size.
MESSAGE_OVERHEAD_BYTES = 160


# What a value takes in this process, approximately and on the high side, for
# bounding caches and the write backlog in bytes (CPython 3.11, 64-bit; sizes
# from sys.getsizeof, rounded up, with a share of the containers' tables).
_OBJECT_BYTES = 64  # an object with a few slots, or a small int, float or datetime
_ITEM_BYTES = 72  # one key of a dict with its share of the table, or one list slot
_MESSAGE_BYTES = 256  # a Message with its id, timestamp and slot values, beyond its content
_getsizeof = sys.getsizeof
#: ``sys.getsizeof`` of an ASCII string beyond its length (CPython 3.11, 64-bit).
_ASCII_STR_BYTES = sys.getsizeof("")


def _str_bytes(text: str) -> int:
    """``sys.getsizeof(text)``, without its call through ``__sizeof__`` for the
    usual ASCII text (which costs a few times more)."""
    return _ASCII_STR_BYTES + len(text) if text.isascii() else _getsizeof(text)


def approx_bytes(value: Any) -> int:
    """Approximate memory of a JSON-like value (dicts, lists, strings, numbers,
    datetimes), erring on the high side. Linear in the value's size."""
    kind = type(value)
    if kind is str:
        return _str_bytes(value)
    if kind in _SCALARS:
        return _OBJECT_BYTES
    if kind is dict:
        size = _OBJECT_BYTES + len(value) * _ITEM_BYTES
        for key, item in value.items():
            # Leaves inline: this runs for every write queued.
            size += _str_bytes(key) if type(key) is str else approx_bytes(key)
            leaf = type(item)
            if leaf is str:
                size += _str_bytes(item)
            elif leaf in _SCALARS:
                size += _OBJECT_BYTES
            else:
                size += approx_bytes(item)
        return size
    if kind is list or kind is tuple:
        size = _OBJECT_BYTES + len(value) * _ITEM_BYTES
        for item in value:
            size += approx_bytes(item)
        return size
    # Rarer shapes (subclasses, other mappings and sequences), by their ABCs.
    if isinstance(value, str | bytes):
        return sys.getsizeof(value)
    if isinstance(value, Mapping):
        return approx_bytes(dict(value))
    if isinstance(value, list | tuple):
        return approx_bytes(list(value))
    return _OBJECT_BYTES


_SCALARS = frozenset({int, float, bool, type(None), datetime})


class Message(msgspec.Struct, frozen=True, gc=False):
    """One entry of a user's conversation history.

    A frozen msgspec struct rather than a frozen dataclass: two are made per
    WebSocket message, and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) cost about ten times as much. Its
    fields are strings, numbers and a datetime, so it can never be part of a
    reference cycle and stays out of the garbage collector's lists
    (``gc=False``): a full history of every cached user is a lot of objects
    for each full collection to walk.
    """

    id: str
    role: Role
    content: str
    timestamp: datetime
    session_id: str | None = None
    interrupted: bool = False
    seq: int | None = None
    #: The id the sending client gave it (WebSocket ``clientId``): a message
    #: re-sent with the same id in the same session is not stored twice.
    client_id: str | None = None

    def stored_size(self) -> int:
        """Approximate bytes this message takes in the profile document."""
        # UTF-8 lengths without encoding ASCII text (one character, one byte),
        # inline: this runs for each message appended and each that falls off.
        content = self.content
        size = (len(content) if content.isascii() else len(content.encode())) + (
            MESSAGE_OVERHEAD_BYTES
        )
        client_id = self.client_id
        if client_id is not None:
            size += len(client_id) if client_id.isascii() else len(client_id.encode())
        return size

    def memory_bytes(self) -> int:
        """Approximate bytes this message takes in memory (see :func:`approx_bytes`)."""
        content = self.content  # _str_bytes, inline: two a WebSocket message
        if content.isascii():
            return _ASCII_STR_BYTES + len(content) + _MESSAGE_BYTES
        return _getsizeof(content) + _MESSAGE_BYTES


class UserState(msgspec.Struct, frozen=True, weakref=True):
    """The active session state of one user (``user_states/{userId}``).

    ``data`` holds the fields the client saved; treat it as read-only: a
    state's wire view is kept for as long as the state lives (weakly,
    ``samvad.web.schemas.state_view_json``), and a change is a new state.

    A frozen msgspec struct, as :class:`Message` is: one is made for every
    state saved, at a fraction of a frozen dataclass's cost. Unlike it, in
    the collector's lists: msgspec refuses ``gc=False`` with weak
    references.
    """

    user_id: str
    data: Mapping[str, Any]
    updated_at: datetime | None = None
    is_active: bool = True

    def memory_bytes(self) -> int:
        """Approximate bytes this view takes in memory (see :func:`approx_bytes`)."""
        return 4 * _OBJECT_BYTES + approx_bytes(self.data)


class Profile(msgspec.Struct, frozen=True, gc=False, eq=False):
    """A user's cross-session profile (``user_profiles/{userId}``).

    Make one with :meth:`of`. :attr:`history` is oldest first and already
    bounded by the history cap and byte bound. A frozen msgspec struct, as
    :class:`Message` is: a new one is made for every message appended. Out of
    the garbage collector's lists, as :class:`Message` is (``gc=False``; and
    so the cache's wrapper of it): every cached user's profile would be
    walked by each full collection, and the young collections walk every
    profile made since the last one. Nothing in it can refer back to it
    (messages, JSON-like preferences), so it can never be part of a
    reference cycle.

    The history is the window ``log[log_start:log_end]`` of a list the
    profiles of successive appends share. The list is append-only: nothing
    ever rewrites or removes an item of it, so every profile's window stays
    what it was when the profile was made, and appending a message to the
    newest profile is a ``list.append`` where a tuple would copy the hundred
    messages before it (``samvad.history.extended``, which also copies the
    window into a new log when another profile has appended to the shared
    one first or when enough of its front has fallen off). ``log_spent`` is
    the stored size of ``log[:log_start]``, which the log still holds.
    Compared by value (:attr:`history` and the other fields), not by log.
    Profiles are made and extended on the event loop's thread only (a window
    read from another thread would still be whole: the items below a list's
    length never change).

    Unlike a tuple of untracked messages, which a collection stops tracking,
    the log is a list the collector keeps walking in its full collections
    (rare: about every half hour at a steady load): some 30 ms for 50,000
    full histories on the reference machine, about 1.5 ms by proportion for
    the ~2,400 full histories of short messages the default cache budget
    holds (docs/benchmarks.md, section 26).
    """

    user_id: str
    preferences: Mapping[str, Any] = msgspec.field(default_factory=dict)
    created_at: datetime | None = None
    last_updated: datetime | None = None
    history_bytes: int = 0
    log: list[Message] = msgspec.field(default_factory=list)
    log_start: int = 0
    log_end: int = 0
    log_spent: int = 0

    @classmethod
    def of(
        cls,
        user_id: str,
        *,
        history: Iterable[Message] = (),
        preferences: Mapping[str, Any] | None = None,
        created_at: datetime | None = None,
        last_updated: datetime | None = None,
        history_bytes: int | None = None,
    ) -> Profile:
        """A profile with ``history`` (bounded already by the caller), whose
        stored size is ``history_bytes`` (computed when not given)."""
        log = list(history)
        if history_bytes is None:
            history_bytes = 0
            for message in log:
                history_bytes += message.stored_size()
        return cls(
            user_id,
            {} if preferences is None else preferences,
            created_at,
            last_updated,
            history_bytes,
            log,
            0,
            len(log),
        )

    @property
    def history(self) -> tuple[Message, ...]:
        """The history, oldest first (a copy of the window: read it once per use)."""
        log, start, end = self.log, self.log_start, self.log_end
        return tuple(log) if start == 0 and end == len(log) else tuple(log[start:end])

    def recent(self, limit: int) -> tuple[Message, ...]:
        """The last ``limit`` messages of the history (none for ``limit`` <= 0)."""
        if limit <= 0:
            return ()
        end = self.log_end
        return tuple(self.log[max(self.log_start, end - limit) : end])

    def newest(self) -> Message | None:
        """The last message of the history, if any (without copying it)."""
        return self.log[self.log_end - 1] if self.log_end > self.log_start else None

    def memory_bytes(self) -> int:
        """Approximate bytes this view takes in memory (see :func:`approx_bytes`).

        Constant time in the history's length: ``history_bytes`` already sums
        the messages' stored sizes (UTF-8, never fewer bytes than CPython keeps
        for the same text, plus :data:`MESSAGE_OVERHEAD_BYTES`), and
        ``log_spent`` those of the messages that fell off the front of the
        shared log and are held until it is copied.
        """
        size = 6 * _OBJECT_BYTES + self.history_bytes + self.log_spent
        size += self.log_end * (_MESSAGE_BYTES + _ITEM_BYTES)
        return size + approx_bytes(self.preferences) if self.preferences else size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Profile):
            return NotImplemented
        return (
            self.user_id == other.user_id
            and self.history_bytes == other.history_bytes
            and self.created_at == other.created_at
            and self.last_updated == other.last_updated
            and self.preferences == other.preferences
            and self.history == other.history
        )

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]  # preferences are a dict

    def __repr__(self) -> str:
        return (
            f"Profile(user_id={self.user_id!r}, history=<{self.log_end - self.log_start}"
            f" messages>, created_at={self.created_at!r}, last_updated={self.last_updated!r})"
        )


class Session(msgspec.Struct, frozen=True, gc=False):
    """One conversation session (``sessions/{sessionId}``).

    A frozen msgspec struct, as :class:`UserState` is: a touch makes one
    for every message that refreshes the session's activity (0.10 against
    1.33 µs for a frozen dataclass, ``timeit``). Out of the collector's
    lists: its JSON-like metadata never refers back to it. Change one with
    ``msgspec.structs.replace``.
    """

    id: str
    user_id: str
    language: str | None = None
    metadata: Mapping[str, Any] = msgspec.field(default_factory=dict)
    status: SessionStatus = SessionStatus.ACTIVE
    created_at: datetime | None = None
    last_activity: datetime | None = None
    ended_at: datetime | None = None
    expire_at: datetime | None = None

    def memory_bytes(self) -> int:
        """Approximate bytes this view takes in memory (see :func:`approx_bytes`)."""
        return (
            10 * _OBJECT_BYTES
            + approx_bytes(self.id)
            + approx_bytes(self.language or "")
            + approx_bytes(self.metadata)
        )

    @property
    def is_active(self) -> bool:
        return self.status is SessionStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a session listing; ``next_cursor`` is None on the last page.

    ``complete`` is False when the page was built without Firestore (memory-only
    mode): it holds only the sessions this instance knows of."""

    sessions: tuple[Session, ...]
    next_cursor: str | None = None
    complete: bool = True


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """Figures for ``/api/session/stats``, from count aggregations."""

    active_users: int
    active_sessions: int
    total_profiles: int
    total_interruptions: int


@dataclass(frozen=True, slots=True)
class PersistenceStatus:
    """What the write-behind is doing, for ``/healthz`` and the stats."""

    mode: Mode
    backend: str
    pending_documents: int
    pending_in_flight: int
    oldest_pending_age: float
    #: How long the oldest write past its scheduled time has waited; session
    #: activity touches are scheduled ``touch_interval`` late on purpose.
    replay_lag: float
    writes_issued: int
    write_failures: int
    mode_since: datetime
    last_error: str | None = None
    #: Changes Firestore refused for their content, set aside in the dead-letter.
    writes_set_aside: int = 0
    #: Estimated memory of the pending writes (bounded by ``SAMVAD_MAX_PENDING_BYTES``).
    pending_bytes: int = 0
