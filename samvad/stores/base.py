"""The store contract: durable documents for ``user_states``, ``user_profiles``
and ``sessions`` (and the optional ``interruptions`` log).

A store is the *durable* layer only. Callers never wait on it on the hot path:
:class:`samvad.writebehind.WriteBehind` feeds it coalesced writes in the
background and :class:`samvad.persistence.Persistence` reads it on a cache
miss. Every backend is an async context manager and runs the same contract
test suite (``tests/test_store_contract.py``).
"""

from __future__ import annotations

import base64
import binascii
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from samvad.clock import parse_iso, to_iso
from samvad.documents import Document
from samvad.errors import BadRequest
from samvad.models import Profile, SessionStatus, StoreCounts
from samvad.writes import Erase, FieldsWrite, ProfileWrite

__all__ = [
    "ErasureCounts",
    "HistoryBounds",
    "SessionCursor",
    "Store",
    "StoreRejected",
    "StoreUnavailable",
]


class StoreUnavailable(Exception):
    """The backend could not be reached within its deadline (or failed transiently).

    The write-behind turns this into memory-only mode; it never reaches a client.
    """


class StoreRejected(Exception):
    """The backend refused a write for its content (not for its availability)."""


@dataclass(frozen=True, slots=True)
class HistoryBounds:
    """How much history a profile keeps."""

    cap: int = 100
    max_bytes: int = 512 * 1024


@dataclass(frozen=True, slots=True)
class ErasureCounts:
    """What an erase removed from the store."""

    sessions: int = 0
    interruptions: int = 0


@dataclass(frozen=True, slots=True)
class SessionCursor:
    """Where a page of sessions ended (newest lastActivity first, then id)."""

    last_activity: datetime
    session_id: str

    def encode(self) -> str:
        raw = json.dumps({"t": to_iso(self.last_activity), "id": self.session_id})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> SessionCursor:
        try:
            padded = text + "=" * (-len(text) % 4)
            raw = json.loads(base64.urlsafe_b64decode(padded.encode()))
            return cls(last_activity=parse_iso(raw["t"]), session_id=str(raw["id"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise BadRequest("cursor is not a cursor this server issued") from None


class Store(ABC):
    """Durable storage for Samvad's collections."""

    #: Short name for status output ("firestore", "memory").
    name: str = "store"
    #: False for a store that does not outlive the process (the memory store):
    #: the reported mode is then always ``memory``.
    durable: bool = True

    def __init__(self, *, bounds: HistoryBounds) -> None:
        self.bounds = bounds

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (no I/O happens before this)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`open` acquired."""

    async def reconnect(self) -> None:  # noqa: B027 - optional hook
        """Drop and re-create connections (after an outage)."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers; raise :class:`StoreUnavailable` when not."""

    @abstractmethod
    async def get(self, collection: str, doc_id: str) -> Document | None:
        """One document, or None when it does not exist."""

    @abstractmethod
    async def write_fields(self, write: FieldsWrite) -> None:
        """Apply a :class:`FieldsWrite` (semantics: :meth:`FieldsWrite.apply_to`)."""

    @abstractmethod
    async def write_profile(self, write: ProfileWrite, *, now: datetime) -> Profile:
        """Apply a :class:`ProfileWrite` atomically against concurrent writers
        (other server instances) and return the profile as committed."""

    @abstractmethod
    async def erase(self, erase: Erase) -> ErasureCounts:
        """Delete what ``erase`` covers."""

    @abstractmethod
    async def list_sessions(
        self,
        *,
        user_id: str,
        status: SessionStatus | None,
        limit: int,
        cursor: SessionCursor | None = None,
    ) -> tuple[list[tuple[str, Document]], SessionCursor | None]:
        """A user's sessions, newest activity first, optionally of one status."""

    @abstractmethod
    async def idle_sessions(self, *, before: datetime, limit: int) -> list[tuple[str, Document]]:
        """Active sessions whose last activity is older than ``before``, oldest first."""

    @abstractmethod
    async def counts(self) -> StoreCounts:
        """Aggregate counts for the stats endpoint, never by loading every document."""

    # -- queries by field (added for the ADK session service) ----------------

    @abstractmethod
    async def select(
        self, collection: str, *, where: Mapping[str, Any]
    ) -> list[tuple[str, Document]]:
        """Every document of ``collection`` whose fields equal all of ``where``,
        in document-id order (a document without one of the fields never matches)."""

    @abstractmethod
    async def delete_where(self, collection: str, *, where: Mapping[str, Any]) -> int:
        """Delete every document :meth:`select` would return; returns how many."""
