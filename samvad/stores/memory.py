"""A store that keeps documents in this process: for ``--store memory`` and unit tests.

It implements exactly the semantics of the Firestore store (the contract tests
hold both to them), but it is not durable: a restart loses everything.

Callers never alias what it stores: documents are deep-copied in and out, as a
network round trip would. Profiles are the exception that keeps a flush cheap:
they are kept as :class:`~samvad.models.Profile` values, whose history is a
tuple of frozen messages that needs no copy; only their preferences (a plain
dict) are deep-copied, when a write changes them. A flush of a full history
therefore costs a merge of the new messages, not a copy and re-decoding of a
hundred.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from samvad.documents import (
    IDEMPOTENCY_KEYS,
    INTERRUPTIONS,
    PROFILES,
    SESSIONS,
    STATES,
    Document,
    empty_profile,
    encode_profile,
    profile_with,
)
from samvad.models import Profile, SessionStatus, StoreCounts
from samvad.stores.base import ErasureCounts, HistoryBounds, SessionCursor, Store, StoreRejected
from samvad.writes import Erase, EraseScope, FieldsWrite, ProfileWrite

__all__ = [
    "MemoryStore",
]


class MemoryStore(Store):
    """Documents in dictionaries, one per collection."""

    name = "memory"
    durable = False

    def __init__(self, *, bounds: HistoryBounds | None = None) -> None:
        super().__init__(bounds=bounds or HistoryBounds())
        self._collections: dict[str, dict[str, Document]] = {
            STATES: {},
            PROFILES: {},
            SESSIONS: {},
            INTERRUPTIONS: {},
        }
        # user_profiles, as values (see the module docstring); encoded on the way out.
        self._profiles: dict[str, Profile] = {}
        self.writes = 0

    def _docs(self, collection: str) -> dict[str, Document]:
        return self._collections.setdefault(collection, {})

    async def ping(self) -> None:
        return None

    async def get(self, collection: str, doc_id: str) -> Document | None:
        if collection == PROFILES:
            profile = self._profiles.get(doc_id)
            if profile is None:
                return None
            # encode_profile builds fresh lists and maps of immutable values;
            # only the preferences' nested values need copying.
            encoded = encode_profile(profile)
            encoded["preferences"] = copy.deepcopy(encoded["preferences"])
            return encoded
        doc = self._docs(collection).get(doc_id)
        # A deep copy, as a network round trip would give: callers may not
        # alias the stored document.
        return copy.deepcopy(doc) if doc is not None else None

    async def write_fields(self, write: FieldsWrite) -> None:
        docs = self._docs(write.collection)
        stored = docs.get(write.doc_id)
        if write.takes_over(stored):
            raise StoreRejected(f"{write.collection}/{write.doc_id} belongs to another user")
        doc = write.result(stored)
        if doc is None:
            return  # must_exist, and it does not
        docs[write.doc_id] = copy.deepcopy(doc)
        self.writes += 1

    async def write_profile(self, write: ProfileWrite, *, now: datetime) -> Profile:
        current = self._profiles.get(write.user_id) or empty_profile(write.user_id)
        profile = profile_with(
            current,
            messages=write.append,
            # The write's preferences belong to the caller: keep a copy.
            preferences=copy.deepcopy(write.preferences) if write.preferences else None,
            now=now,
            cap=self.bounds.cap,
            max_bytes=self.bounds.max_bytes,
        )
        self._profiles[write.user_id] = profile
        self.writes += 1
        return profile

    async def erase(self, erase: Erase) -> ErasureCounts:
        field = "userId" if erase.scope is EraseScope.USER else "sessionId"
        if erase.scope is EraseScope.USER:
            self._docs(STATES).pop(erase.target_id, None)
            self._profiles.pop(erase.target_id, None)
            sessions = self._delete_where(SESSIONS, "userId", erase.target_id)
            self._delete_where(IDEMPOTENCY_KEYS, "userId", erase.target_id)
        else:
            sessions = 1 if self._docs(SESSIONS).pop(erase.target_id, None) is not None else 0
        interruptions = self._delete_where(INTERRUPTIONS, field, erase.target_id)
        self.writes += 1
        return ErasureCounts(sessions=sessions, interruptions=interruptions)

    def _delete_where(self, collection: str, field: str, value: str) -> int:
        docs = self._docs(collection)
        doomed = [doc_id for doc_id, doc in docs.items() if doc.get(field) == value]
        for doc_id in doomed:
            del docs[doc_id]
        return len(doomed)

    def _user_sessions(
        self, user_id: str, status: SessionStatus | None
    ) -> list[tuple[str, Document]]:
        return [
            (doc_id, doc)
            for doc_id, doc in self._docs(SESSIONS).items()
            if doc.get("userId") == user_id
            and (status is None or doc.get("status") == status.value)
        ]

    async def list_sessions(
        self,
        *,
        user_id: str,
        status: SessionStatus | None,
        limit: int,
        cursor: SessionCursor | None = None,
    ) -> tuple[list[tuple[str, Document]], SessionCursor | None]:
        # Like a Firestore query ordered by lastActivity: documents without
        # the field are not part of the result.
        rows = [row for row in self._user_sessions(user_id, status) if _has_activity(row)]
        rows.sort(key=_newest_first_key, reverse=True)
        if cursor is not None:
            after = (cursor.last_activity, cursor.session_id)
            rows = [row for row in rows if _newest_first_key(row) < after]
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit and page:
            last_id, last_doc = page[-1]
            next_cursor = SessionCursor(last_activity=last_doc["lastActivity"], session_id=last_id)
        return copy.deepcopy(page), next_cursor

    async def idle_sessions(self, *, before: datetime, limit: int) -> list[tuple[str, Document]]:
        rows = [
            (doc_id, doc)
            for doc_id, doc in self._docs(SESSIONS).items()
            if doc.get("status") == SessionStatus.ACTIVE.value
            and isinstance(doc.get("lastActivity"), datetime)
            and doc["lastActivity"] < before
        ]
        rows.sort(key=lambda row: (row[1]["lastActivity"], row[0]))
        return copy.deepcopy(rows[:limit])

    async def counts(self) -> StoreCounts:
        return StoreCounts(
            active_users=sum(1 for d in self._docs(STATES).values() if d.get("isActive") is True),
            active_sessions=sum(
                1 for d in self._docs(SESSIONS).values() if d.get("isActive") is True
            ),
            total_profiles=len(self._profiles),
            total_interruptions=len(self._docs(INTERRUPTIONS)),
        )

    # -- queries by field (added for the ADK session service) ----------------

    def _matching(self, collection: str, where: Mapping[str, Any]) -> list[str]:
        docs = self._docs(collection)
        return sorted(
            doc_id
            for doc_id, doc in docs.items()
            if all(name in doc and doc[name] == value for name, value in where.items())
        )

    async def select(
        self, collection: str, *, where: Mapping[str, Any]
    ) -> list[tuple[str, Document]]:
        docs = self._docs(collection)
        return [
            (doc_id, copy.deepcopy(docs[doc_id])) for doc_id in self._matching(collection, where)
        ]

    async def delete_where(self, collection: str, *, where: Mapping[str, Any]) -> int:
        doomed = self._matching(collection, where)
        docs = self._docs(collection)
        for doc_id in doomed:
            del docs[doc_id]
        self.writes += 1
        return len(doomed)


def _has_activity(row: tuple[str, Document]) -> bool:
    return isinstance(row[1].get("lastActivity"), datetime)


def _newest_first_key(row: tuple[str, Document]) -> tuple[datetime, str]:
    doc_id, doc = row
    last_activity: datetime = doc["lastActivity"]
    return (last_activity, doc_id)
