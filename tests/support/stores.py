"""Store doubles for unit tests of the logic above the store.

These prove nothing about Firestore: the Firestore store is tested against
the real emulator (tests/test_store_contract.py, tests/test_fault_injection.py).
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from samvad.documents import Document
from samvad.models import Profile, SessionStatus, StoreCounts
from samvad.stores.base import (
    ErasureCounts,
    HistoryBounds,
    SessionCursor,
    StoreRejected,
    StoreUnavailable,
)
from samvad.stores.memory import MemoryStore
from samvad.writes import Erase, FieldsWrite, Key, ProfileWrite


class FlakyStore(MemoryStore):
    """A memory store that can be taken down, made to reject writes, or held.

    ``down``: every call raises StoreUnavailable. ``rejecting``: writes to these
    keys raise StoreRejected. ``gate``: when cleared, writes wait for it (in
    flight). ``log`` records every write that reached the store, in order.
    It poses as a durable store, like the Firestore store it stands in for.
    """

    durable = True

    def __init__(self, *, bounds: HistoryBounds | None = None) -> None:
        super().__init__(bounds=bounds)
        self.down = False
        self.rejecting: set[Key] = set()
        self.gate = asyncio.Event()
        self.gate.set()
        self.log: list[tuple[str, Key]] = []
        self.reads = 0
        self.pings = 0
        self.reconnects = 0
        self.reconnected = asyncio.Event()
        self.query_gate = asyncio.Event()
        self.query_gate.set()

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("store is down (test)")

    async def _enter(self, key: Key) -> None:
        self._check()
        await self.gate.wait()
        self._check()
        if key in self.rejecting:
            raise StoreRejected("rejected (test)")

    async def ping(self) -> None:
        self.pings += 1
        self._check()

    async def reconnect(self) -> None:
        self.reconnects += 1
        self.reconnected.set()

    async def get(self, collection: str, doc_id: str) -> Document | None:
        self._check()
        self.reads += 1
        return await super().get(collection, doc_id)

    async def list_sessions(
        self,
        *,
        user_id: str,
        status: SessionStatus | None,
        limit: int,
        cursor: SessionCursor | None = None,
    ) -> tuple[list[tuple[str, Document]], SessionCursor | None]:
        """Takes its snapshot first, then waits for ``query_gate``: like a query
        whose answer is on the wire while writes commit."""
        self._check()
        result = await super().list_sessions(
            user_id=user_id, status=status, limit=limit, cursor=cursor
        )
        await self.query_gate.wait()
        return result

    async def counts(self) -> StoreCounts:
        self._check()
        return await super().counts()

    async def write_fields(self, write: FieldsWrite) -> None:
        await self._enter(write.key)
        await super().write_fields(write)
        self.log.append(("fields", write.key))

    async def write_profile(self, write: ProfileWrite, *, now: datetime) -> Profile:
        await self._enter(write.key)
        profile = await super().write_profile(write, now=now)
        self.log.append(("profile", write.key))
        return profile

    async def erase(self, erase: Erase) -> ErasureCounts:
        await self._enter(erase.key)
        counts = await super().erase(erase)
        self.log.append(("erase", erase.key))
        return counts


async def settle(rounds: int = 50) -> None:
    """Let every ready task run (no timers: the memory store never waits on I/O)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
