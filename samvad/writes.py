"""Pending writes: what the write-behind queue holds for one document.

A write is keyed by the document it changes, so a burst of changes to one
document coalesces into one write (:meth:`absorb`). Writes name the *barriers*
they sit behind: an :class:`Erase` of a user or a session raises a barrier,
and no write behind it reaches the store until the erase is done. That is
what stops a late flush from bringing erased data back (the bookkeeping is
:mod:`samvad.barriers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import msgspec

from samvad.documents import PROFILES, Document
from samvad.models import Message, approx_bytes

__all__ = [
    "WRITE_OVERHEAD_BYTES",
    "Barrier",
    "Erase",
    "EraseScope",
    "FieldsWrite",
    "Key",
    "ProfileWrite",
    "Write",
    "session_barrier",
    "user_barrier",
]

Key = tuple[str, str]
"""(collection or operation, document id)."""

Barrier = tuple[str, str]
"""("user", userId) or ("session", sessionId)."""

#: Bytes a queued write costs besides its content: the write, its queue entry
#: and their keys (for bounding the write backlog in bytes).
WRITE_OVERHEAD_BYTES = 512


def user_barrier(user_id: str) -> Barrier:
    return ("user", user_id)


def session_barrier(session_id: str) -> Barrier:
    return ("session", session_id)


@dataclass(slots=True)
class FieldsWrite:
    """Set top-level fields of one document (each field is replaced as a whole).

    ``defaults`` are written only where the stored document lacks the field
    (``createdAt``). A ``touch`` write only refreshes low-value fields such as
    ``lastActivity`` and may wait longer before it is flushed. A ``must_exist``
    write changes a document only if it exists: ending or touching a session
    that another instance erased must not re-create it. The fields named in
    ``merge`` are maps merged key by key into the stored one (a session's
    ``metadata``): the store merges them, so keys another instance wrote
    meanwhile stay.
    """

    collection: str
    doc_id: str
    user_id: str
    fields: dict[str, Any]
    session_id: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    touch: bool = False
    must_exist: bool = False
    merge: tuple[str, ...] = ()

    @property
    def key(self) -> Key:
        return (self.collection, self.doc_id)

    @property
    def barriers(self) -> tuple[Barrier, ...]:
        if self.session_id is None:
            return (user_barrier(self.user_id),)
        return (user_barrier(self.user_id), session_barrier(self.session_id))

    def absorb(self, later: FieldsWrite) -> int | None:
        """Fold a later write to the same document into this one; None: what
        that added to :meth:`approx_bytes` is not known exactly (fields
        replaced are counted twice until the entry is counted again)."""
        if later.merge or self.merge:
            self._absorb_merged(later)
        else:
            self.fields.update(later.fields)
        for name, value in later.defaults.items():
            self.defaults.setdefault(name, value)
        self.touch = self.touch and later.touch
        # Folded into a write that may create the document, it may create it too.
        self.must_exist = self.must_exist and later.must_exist
        return None

    def takes_over(self, doc: Mapping[str, Any] | None) -> bool:
        """Whether this write would change a document another user owns.

        Stores refuse such a write for its content (the write-behind sets it
        aside). An instance that could not read Firestore (memory-only mode)
        treats a session id it has not seen as new; should it be another
        user's, this is where its owner is kept.
        """
        if doc is None:
            return False
        owner = doc.get("userId")
        return isinstance(owner, str) and owner != "" and owner != self.user_id

    def approx_bytes(self) -> int:
        """Approximate memory this write holds (see :func:`samvad.models.approx_bytes`)."""
        return WRITE_OVERHEAD_BYTES + approx_bytes(self.fields) + approx_bytes(self.defaults)

    def result(self, doc: Mapping[str, Any] | None) -> Document | None:
        """The document after this write, or None when it needs one and there is none."""
        if doc is None and self.must_exist:
            return None
        return self.apply_to(doc)

    def apply_to(self, doc: Mapping[str, Any] | None) -> Document:
        """The document after this write; the semantics every store implements."""
        result: Document = dict(doc) if doc is not None else {}
        result.update(self.changes(doc))
        return result

    def changes(self, doc: Mapping[str, Any] | None) -> Document:
        """The top-level fields this write sets on ``doc`` (the stored document,
        None when there is none): the defaults it lacks, the fields, and the
        maps named in ``merge`` merged into the stored ones."""
        changes: Document = {
            name: value for name, value in self.defaults.items() if doc is None or name not in doc
        }
        changes.update(self.fields)
        for name in self.merge:
            stored = doc.get(name) if doc is not None else None
            if isinstance(stored, Mapping):
                changes[name] = {**stored, **self.fields[name]}
        return changes

    def _absorb_merged(self, later: FieldsWrite) -> None:
        """:meth:`absorb`'s fields when either write merges maps: a map merged
        into one merged stays merged (the keys of both); merged into a field
        replaced whole, it is part of the replacement; replaced whole, it
        replaces what was merged."""
        fields, merge = self.fields, set(self.merge)
        for name, value in later.fields.items():
            if name in later.merge:
                if name in fields:
                    earlier = fields[name]
                    # Merged or replaced whole before, it stays so.
                    fields[name] = {**earlier, **value} if isinstance(earlier, Mapping) else value
                else:
                    fields[name] = value
                    merge.add(name)
            else:
                fields[name] = value
                merge.discard(name)
        self.merge = tuple(sorted(merge))


class ProfileWrite(msgspec.Struct, gc=False):
    """Append messages to a user's history and merge preferences.

    The store merges by message id (so a replay is idempotent) and bounds the
    history in the same write. ``cap`` bounds what is kept here too: older
    pending messages could never survive the trim.

    A msgspec struct rather than a dataclass, as :class:`Message` is: two are
    made per WebSocket message, at a third of a dataclass's cost (0.35
    against 1.1 µs, ``timeit``). Out of the collector's lists (``gc=False``):
    its list of messages and its JSON preferences never refer back to it.
    """

    user_id: str
    append: list[Message] = msgspec.field(default_factory=list)
    preferences: dict[str, Any] = msgspec.field(default_factory=dict)
    cap: int = 100

    @property
    def key(self) -> Key:
        return (PROFILES, self.user_id)

    #: Never a touch (a class attribute, not a property: read for every write queued).
    touch: ClassVar[bool] = False

    @property
    def barriers(self) -> tuple[Barrier, ...]:
        return (user_barrier(self.user_id),)

    def approx_bytes(self) -> int:
        """Approximate memory this write holds (see :func:`samvad.models.approx_bytes`)."""
        size = WRITE_OVERHEAD_BYTES
        for message in self.append:
            size += message.memory_bytes()
        return size + approx_bytes(self.preferences) if self.preferences else size

    def absorb(self, later: ProfileWrite) -> int | None:
        """Fold a later write of the same user into this one: what that added
        to :meth:`approx_bytes` when it is known exactly (messages appended,
        none trimmed, no preferences), else None."""
        append = self.append
        append.extend(later.append)
        added: int | None = None
        if len(append) > self.cap:
            del append[: len(append) - self.cap]
        elif not later.preferences:
            added = 0
            for message in later.append:
                added += message.memory_bytes()
        self.preferences.update(later.preferences)
        return added


class EraseScope(StrEnum):
    USER = "user"
    SESSION = "session"


@dataclass(slots=True)
class Erase:
    """Delete everything of a user (state, profile, sessions, interruptions) or of
    one session (the session and its interruptions)."""

    scope: EraseScope
    target_id: str

    @property
    def key(self) -> Key:
        return ("erase:" + self.scope.value, self.target_id)

    @property
    def barrier(self) -> Barrier:
        return (self.scope.value, self.target_id)

    def approx_bytes(self) -> int:
        """Approximate memory this write holds."""
        return WRITE_OVERHEAD_BYTES

    @property
    def barriers(self) -> tuple[Barrier, ...]:
        # An erase waits for nothing queued: it drops what it covers. It does
        # wait for covered writes already in flight (Barriers.erase_must_wait).
        return ()

    touch: ClassVar[bool] = False

    def absorb(self, later: Erase) -> int:
        """Two erases of the same target are one (it adds nothing)."""
        return 0


Write = FieldsWrite | ProfileWrite | Erase
