"""The store the ADK session service's write-behind writes through.

It passes document writes to Samvad's store (Firestore or memory) unchanged
and gives the write-behind's :class:`~samvad.writes.Erase` its ADK meaning: a
user erase deletes the user's ADK sessions, events and user-scoped state in
every app; a session erase (keyed by the session's document id) deletes the
session and its events. Because erasures travel through the write-behind,
they drop the pending writes they cover and hold back later ones, so a late
flush never brings an erased session back.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from samvad.adk.documents import Collections
from samvad.documents import Document
from samvad.models import Profile, SessionStatus, StoreCounts
from samvad.stores.base import ErasureCounts, SessionCursor, Store
from samvad.writes import Erase, EraseScope, FieldsWrite, ProfileWrite

__all__ = [
    "AdkStore",
]


class AdkStore(Store):
    """ADK collections over another store; it does not own that store."""

    def __init__(self, inner: Store, collections: Collections) -> None:
        super().__init__(bounds=inner.bounds)
        self.inner = inner
        self.collections = collections
        self.name = inner.name
        self.durable = inner.durable

    async def ping(self) -> None:
        await self.inner.ping()

    async def reconnect(self) -> None:
        await self.inner.reconnect()

    async def get(self, collection: str, doc_id: str) -> Document | None:
        return await self.inner.get(collection, doc_id)

    async def write_fields(self, write: FieldsWrite) -> None:
        await self.inner.write_fields(write)

    async def select(
        self, collection: str, *, where: Mapping[str, Any]
    ) -> list[tuple[str, Document]]:
        return await self.inner.select(collection, where=where)

    async def delete_where(self, collection: str, *, where: Mapping[str, Any]) -> int:
        return await self.inner.delete_where(collection, where=where)

    async def erase(self, erase: Erase) -> ErasureCounts:
        c = self.collections
        if erase.scope is EraseScope.USER:
            where = {"userId": erase.target_id}
            await self.inner.delete_where(c.events, where=where)
            await self.inner.delete_where(c.user_states, where=where)
            sessions = await self.inner.delete_where(c.sessions, where=where)
            return ErasureCounts(sessions=sessions)
        # Events first: a session document left behind by a failed erase is
        # retried by the write-behind, and is what a reader checks first.
        await self.inner.delete_where(c.events, where={"session": erase.target_id})
        sessions = await self.inner.delete_where(c.sessions, where={"key": erase.target_id})
        return ErasureCounts(sessions=sessions)

    # The write-behind of the ADK service only writes fields and erases; the
    # rest of the contract belongs to Samvad's own collections.

    async def write_profile(self, write: ProfileWrite, *, now: datetime) -> Profile:
        raise NotImplementedError("The ADK store writes no Samvad profiles.")

    async def list_sessions(
        self,
        *,
        user_id: str,
        status: SessionStatus | None,
        limit: int,
        cursor: SessionCursor | None = None,
    ) -> tuple[list[tuple[str, Document]], SessionCursor | None]:
        raise NotImplementedError("The ADK store lists no Samvad sessions.")

    async def idle_sessions(self, *, before: datetime, limit: int) -> list[tuple[str, Document]]:
        raise NotImplementedError("The ADK store lists no Samvad sessions.")

    async def counts(self) -> StoreCounts:
        raise NotImplementedError("The ADK store counts no Samvad documents.")
