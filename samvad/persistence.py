"""The persistence service: what the REST API and the WebSocket layer call.

Reads come from the in-memory cache; a miss reads the store once and lays the
writes that have not reached it yet on top (the *overlay*), so what a caller
sees never goes back in time, whether or not Firestore is reachable. Writes
update the cached view and the write-behind queue and return at once: no
method here waits on a Firestore write, and no Firestore error reaches a
caller. See ``docs/persistence.md`` for the guarantees.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from samvad.cache import ViewCache
from samvad.clock import Clock, SystemClock, truncate_ms
from samvad.config import Settings
from samvad.documents import (
    INTERRUPTIONS,
    PROFILES,
    SESSIONS,
    STATES,
    Document,
    decode_profile,
    decode_session,
    decode_state,
    empty_profile,
    encode_session,
    profile_with,
    state_fields,
)
from samvad.errors import Conflict
from samvad.history import new_message_id
from samvad.interruptions import Interruption
from samvad.models import (
    Message,
    Mode,
    PersistenceStatus,
    Profile,
    Role,
    Session,
    SessionPage,
    SessionStatus,
    StoreCounts,
    UserState,
)
from samvad.stores.base import (
    HistoryBounds,
    SessionCursor,
    Store,
    StoreRejected,
    StoreUnavailable,
)
from samvad.writebehind import FlushObserver, WriteBehind, WriteBehindConfig
from samvad.writes import (
    Barrier,
    Erase,
    EraseScope,
    FieldsWrite,
    Key,
    ProfileWrite,
    Write,
    session_barrier,
    user_barrier,
)

logger = logging.getLogger(__name__)

_STORE_ERRORS = (StoreUnavailable, StoreRejected)
_MAX_SESSIONS_LISTED = 100


def new_id() -> str:
    """A random identifier for messages and interruption records."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class UserErasure:
    """What erasing a user's data cleared (``cleared`` in the refresh response)."""

    user_state: bool
    user_profile: bool
    sessions: int


@dataclass(frozen=True, slots=True)
class SessionErasure:
    """What deleting one session cleared."""

    session: bool


class Persistence:
    """Cache + store + write-behind, behind one API.

    Construction does no I/O; :meth:`start` (or ``async with``) probes the store
    and starts the write-behind; :meth:`close` flushes within the configured
    deadline. The store is owned by the caller.
    """

    def __init__(
        self,
        store: Store,
        *,
        settings: Settings | None = None,
        clock: Clock | None = None,
        on_flush: FlushObserver | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.clock = clock or SystemClock()
        self.store = store
        s = self.settings
        if store.bounds != HistoryBounds(cap=s.history_cap, max_bytes=s.history_max_bytes):
            raise ValueError(
                "The store bounds history differently from the settings "
                f"({store.bounds} against cap={s.history_cap}, max_bytes={s.history_max_bytes})."
            )
        self.writes = WriteBehind(
            store,
            config=WriteBehindConfig(
                flush_interval=s.flush_interval,
                linger=s.flush_linger,
                touch_interval=s.touch_interval,
                concurrency=s.flush_concurrency,
                max_pending=s.max_pending_documents,
                retry_max_backoff=s.retry_max_backoff,
                probe_interval=s.probe_interval,
                probe_max_interval=s.probe_max_interval,
            ),
            clock=self.clock,
            on_profile_flushed=self._profile_flushed,
            on_flush=on_flush,
        )
        timer = self.clock.monotonic
        size, ttl = s.cache_max_entries, s.cache_ttl
        self.states: ViewCache[str, UserState] = ViewCache(maxsize=size, ttl=ttl, timer=timer)
        self.profiles: ViewCache[str, Profile] = ViewCache(maxsize=size, ttl=ttl, timer=timer)
        self.sessions: ViewCache[str, Session] = ViewCache(maxsize=size, ttl=ttl, timer=timer)
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await self.writes.start()

    async def close(self) -> int:
        """Flush pending writes within the shutdown deadline; returns how many were left."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)
        return await self.writes.close(self.settings.shutdown_flush_deadline)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def mode(self) -> Mode:
        return self.writes.mode

    def status(self) -> PersistenceStatus:
        return self.writes.status()

    def _now(self) -> datetime:
        return truncate_ms(self.clock.now())

    def _submit(self, write: Write) -> None:
        self.writes.submit(write)

    # -- loading with the overlay ------------------------------------------

    async def _load_doc(
        self, collection: str, doc_id: str, barriers: tuple[Barrier, ...]
    ) -> tuple[Document | None, list[Write], bool]:
        """The stored document, the unconfirmed writes to lay over it, and whether
        the store was actually read (``complete``)."""
        key: Key = (collection, doc_id)
        wb = self.writes
        doc: Document | None = None
        complete = True
        before: list[Write] = []
        for _attempt in range(3):
            epoch = wb.erase_epoch
            # Writes pending before the read may be confirmed while it runs and
            # then vanish from the queue: keep them, re-applying is harmless.
            before = wb.pending_writes(key)
            doc, complete = None, True
            if not wb.erased(barriers):
                if wb.mode is Mode.MEMORY:
                    complete = False
                else:
                    try:
                        doc = await self.store.get(collection, doc_id)
                    except _STORE_ERRORS as exc:
                        wb.report_unavailable(exc)
                        complete = False
            if wb.erase_epoch == epoch:
                break
            # An erase came in during the read: read again behind it.
        if wb.erased(barriers):
            doc, before = None, []
        return doc, before + wb.pending_writes(key), complete

    @staticmethod
    def _overlay_fields(doc: Document | None, writes: list[Write]) -> Document | None:
        for write in writes:
            if isinstance(write, FieldsWrite):
                doc = write.apply_to(doc)
        return doc

    def _overlay_profile(self, profile: Profile | None, writes: list[Write]) -> Profile | None:
        for write in writes:
            if isinstance(write, ProfileWrite):
                profile = self._profile_with(profile, write, self._now())
        return profile

    def _profile_with(self, profile: Profile | None, write: ProfileWrite, now: datetime) -> Profile:
        """``profile`` after ``write``: what the store will make of it."""
        s = self.settings
        return profile_with(
            profile or empty_profile(write.user_id),
            messages=write.append,
            preferences=write.preferences,
            now=now,
            cap=s.history_cap,
            max_bytes=s.history_max_bytes,
        )

    def _write_profile(self, write: ProfileWrite, now: datetime) -> None:
        """Queue ``write`` and apply it to the cached view (or warm an uncached one)."""
        self._submit(write)
        cached = self.profiles.peek(write.user_id)
        if cached is None:
            self.profiles.discard(write.user_id)  # it may be cached as absent
            self._warm(self.get_profile(write.user_id))
            return
        self.profiles.put(
            write.user_id,
            self._profile_with(cached.value, write, now),
            complete=cached.complete,
        )

    def _want_complete(self) -> bool:
        return self.writes.mode is Mode.FIRESTORE

    # -- user state ----------------------------------------------------------

    async def get_state(self, user_id: str) -> UserState | None:
        """A user's state, or None when they have none."""

        async def load() -> tuple[UserState | None, bool]:
            doc, writes, complete = await self._load_doc(STATES, user_id, (user_barrier(user_id),))
            doc = self._overlay_fields(doc, writes)
            return (decode_state(user_id, doc) if doc is not None else None), complete

        return await self.states.get(user_id, load, want_complete=self._want_complete())

    def save_state(self, user_id: str, data: Mapping[str, Any]) -> UserState:
        """Merge ``data`` into a user's state (each top-level field replaced whole).

        Returns the resulting state as far as this instance knows it.
        """
        now = self._now()
        fields = state_fields(data, now)
        self._submit(FieldsWrite(collection=STATES, doc_id=user_id, user_id=user_id, fields=fields))
        cached = self.states.peek(user_id)
        if cached is not None:
            state = UserState(
                user_id=user_id,
                data={**cached.value.data, **data},
                updated_at=now,
                is_active=True,
            )
            self.states.put(user_id, state, complete=cached.complete)
            return state
        self.states.discard(user_id)  # it may be cached as absent
        self._warm(self.get_state(user_id))
        return UserState(user_id=user_id, data=dict(data), updated_at=now, is_active=True)

    def _warm(self, load: Coroutine[Any, Any, object]) -> None:
        """Load a view in the background after a write to an uncached document.

        Whoever writes is likely to read next; and should Firestore go away in
        between, the complete view is already in memory.
        """
        task = asyncio.create_task(load, name="samvad-cache-warm")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for background cache loads started by writes (for tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- profile and history -----------------------------------------------

    async def get_profile(self, user_id: str) -> Profile | None:
        """A user's profile with its bounded history, or None when they have none."""
        s = self.settings

        async def load() -> tuple[Profile | None, bool]:
            doc, writes, complete = await self._load_doc(
                PROFILES, user_id, (user_barrier(user_id),)
            )
            profile = (
                decode_profile(user_id, doc, cap=s.history_cap, max_bytes=s.history_max_bytes)
                if doc is not None
                else None
            )
            return self._overlay_profile(profile, writes), complete

        return await self.profiles.get(user_id, load, want_complete=self._want_complete())

    async def recent_history(self, user_id: str, limit: int) -> tuple[Message, ...]:
        """The last ``limit`` messages of a user's history, oldest first."""
        profile = await self.get_profile(user_id)
        if profile is None or limit <= 0:
            return ()
        return profile.history[-limit:]

    def append_message(
        self,
        user_id: str,
        *,
        role: Role,
        content: str,
        session_id: str | None = None,
        interrupted: bool = False,
        seq: int | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Append a message to a user's history; returns it with its id and timestamp."""
        now = self._now()
        cached = self.profiles.peek(user_id)
        if cached is not None and cached.value.history:
            # Never older than the message before it, whatever the wall clock does.
            now = max(now, cached.value.history[-1].timestamp)
        message = Message(
            id=message_id or new_message_id(now),
            role=role,
            content=content,
            timestamp=now,
            session_id=session_id,
            interrupted=interrupted,
            seq=seq,
        )
        self._write_profile(
            ProfileWrite(user_id=user_id, append=[message], cap=self.settings.history_cap), now
        )
        return message

    def set_preferences(self, user_id: str, preferences: Mapping[str, Any]) -> None:
        """Merge ``preferences`` into a user's profile (each top-level key replaced whole)."""
        write = ProfileWrite(
            user_id=user_id, preferences=dict(preferences), cap=self.settings.history_cap
        )
        self._write_profile(write, self._now())

    def _profile_flushed(self, committed: Profile) -> None:
        # The commit merged what other instances appended; adopt it, with what
        # this instance queued since, so instances converge at flush speed.
        user_id = committed.user_id
        if self.writes.erased((user_barrier(user_id),)):
            return
        cached = self.profiles.peek(user_id)
        if cached is None:
            return
        view = self._overlay_profile(committed, self.writes.pending_writes((PROFILES, user_id)))
        if view is not None:
            self.profiles.put(user_id, view, complete=cached.complete)

    # -- sessions ----------------------------------------------------------

    async def get_session(self, session_id: str) -> Session | None:
        async def load() -> tuple[Session | None, bool]:
            barriers: tuple[Barrier, ...] = (session_barrier(session_id),)
            doc, writes, complete = await self._load_doc(SESSIONS, session_id, barriers)
            owner = doc.get("userId") if doc is not None else None
            if isinstance(owner, str) and self.writes.erased((user_barrier(owner),)):
                doc = None
            doc = self._overlay_fields(doc, writes)
            return (decode_session(session_id, doc) if doc is not None else None), complete

        return await self.sessions.get(session_id, load, want_complete=self._want_complete())

    def _write_session(self, session: Session, *, touch: bool = False) -> None:
        fields = encode_session(session)
        created_at = fields.pop("createdAt")
        self._submit(
            FieldsWrite(
                collection=SESSIONS,
                doc_id=session.id,
                user_id=session.user_id,
                session_id=session.id,
                fields=fields,
                defaults={"createdAt": created_at},
                touch=touch,
            )
        )
        cached = self.sessions.peek(session.id)
        self.sessions.put(
            session.id, session, complete=cached.complete if cached is not None else True
        )

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(days=self.settings.session_retention_days)

    async def save_session(
        self,
        session_id: str,
        *,
        user_id: str,
        language: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Session:
        """Create a session, or update and re-activate it (metadata merged key by key).

        Raises :class:`Conflict` when the session exists for another user.
        """
        now = self._now()
        existing = await self.get_session(session_id)
        if existing is not None and existing.user_id and existing.user_id != user_id:
            raise Conflict(f"session {session_id} belongs to another user")
        merged_metadata = {**(existing.metadata if existing else {}), **(metadata or {})}
        session = Session(
            id=session_id,
            user_id=user_id,
            language=language
            if language is not None
            else (existing.language if existing else None),
            metadata=merged_metadata,
            status=SessionStatus.ACTIVE,
            created_at=(existing.created_at if existing and existing.created_at else now),
            last_activity=now,
            ended_at=None,
            expire_at=self._expiry(now),
        )
        self._write_session(session)
        return session

    async def end_session(self, session_id: str) -> Session | None:
        """Mark a session ended; None when there is no such session."""
        existing = await self.get_session(session_id)
        if existing is None:
            return None
        now = self._now()
        session = _replace_session(
            existing,
            status=SessionStatus.ENDED,
            ended_at=existing.ended_at or now,
            last_activity=now,
            expire_at=self._expiry(now),
        )
        self._write_session(session)
        return session

    async def touch_session(self, session_id: str) -> Session | None:
        """Record activity on a session; flushed lazily (``touch_interval``)."""
        existing = await self.get_session(session_id)
        if existing is None:
            return None
        now = self._now()
        session = _replace_session(existing, last_activity=now, expire_at=self._expiry(now))
        self._write_session(session, touch=True)
        return session

    async def mark_abandoned(self, session_id: str) -> Session | None:
        """Mark an active session ``abandoned`` (idle longer than allowed)."""
        existing = await self.get_session(session_id)
        if existing is None or existing.status is not SessionStatus.ACTIVE:
            return existing
        session = _replace_session(existing, status=SessionStatus.ABANDONED)
        self._write_session(session)
        return session

    async def list_sessions(
        self,
        user_id: str,
        *,
        status: SessionStatus | None = None,
        limit: int = 20,
        cursor: SessionCursor | None = None,
    ) -> SessionPage:
        """A user's sessions, most recent activity first, with a cursor for the next page."""
        limit = max(1, min(limit, _MAX_SESSIONS_LISTED))
        wb = self.writes
        user = (user_barrier(user_id),)

        def pending() -> list[Write]:
            return wb.pending_writes_where(
                lambda w: (
                    isinstance(w, FieldsWrite) and w.collection == SESSIONS and w.user_id == user_id
                )
            )

        rows: dict[str, Document] = {}
        before: list[Write] = []
        next_cursor: SessionCursor | None = None
        from_store = False
        for _attempt in range(3):
            epoch = wb.erase_epoch
            # Writes pending before the query may be confirmed while it runs
            # and vanish from the queue: keep them (re-applying is harmless).
            before = pending()
            rows, next_cursor, from_store = {}, None, False
            if wb.erased(user) or wb.mode is not Mode.FIRESTORE:
                break
            try:
                stored, next_cursor = await self.store.list_sessions(
                    user_id=user_id, status=status, limit=limit, cursor=cursor
                )
            except _STORE_ERRORS as exc:
                wb.report_unavailable(exc)
                break
            rows, from_store = dict(stored), True
            if wb.erase_epoch == epoch:
                break
            # An erase came in during the query: query again behind it.
        if wb.erased(user):
            # Only what was written after the erase counts.
            rows, before, from_store, next_cursor = {}, [], False, None
        if not from_store:
            # Memory-only: what this instance knows of the user's sessions.
            for session_id, session in self.sessions.items():
                if session.user_id == user_id:
                    rows[session_id] = encode_session(session)
        for write in [*before, *pending()]:
            assert isinstance(write, FieldsWrite)
            rows[write.doc_id] = write.apply_to(rows.get(write.doc_id))
        sessions = [
            decode_session(session_id, doc)
            for session_id, doc in rows.items()
            if doc.get("userId") == user_id and not wb.erased((session_barrier(session_id),))
        ]
        if status is not None:
            sessions = [s for s in sessions if s.status is status]
        sessions = [s for s in sessions if s.last_activity is not None]
        sessions.sort(key=lambda s: (s.last_activity, s.id), reverse=True)
        if cursor is not None:
            position = (cursor.last_activity, cursor.session_id)
            sessions = [s for s in sessions if (s.last_activity, s.id) < position]
        page = sessions[:limit]
        if not from_store:
            next_cursor = None
            if len(sessions) > limit:
                last = page[-1]
                assert last.last_activity is not None
                next_cursor = SessionCursor(last_activity=last.last_activity, session_id=last.id)
        encoded = next_cursor.encode() if next_cursor is not None else None
        return SessionPage(sessions=tuple(page), next_cursor=encoded)

    async def active_sessions(self, user_id: str) -> tuple[Session, ...]:
        """A user's active sessions, most recent first (at most 100)."""
        page = await self.list_sessions(
            user_id, status=SessionStatus.ACTIVE, limit=_MAX_SESSIONS_LISTED
        )
        return page.sessions

    async def sweep_idle_sessions(self, *, limit: int = 500) -> int:
        """Mark active sessions idle longer than ``session_idle_timeout`` abandoned."""
        cutoff = self._now() - timedelta(seconds=self.settings.session_idle_timeout)
        ids: set[str] = {
            session_id
            for session_id, session in self.sessions.items()
            if session.status is SessionStatus.ACTIVE
            and session.last_activity is not None
            and session.last_activity < cutoff
        }
        if self.writes.mode is Mode.FIRESTORE:
            try:
                rows = await self.store.idle_sessions(before=cutoff, limit=limit)
                ids.update(session_id for session_id, _ in rows)
            except _STORE_ERRORS as exc:
                self.writes.report_unavailable(exc)
        marked = 0
        for session_id in sorted(ids):
            session = await self.get_session(session_id)
            if (
                session is not None
                and session.status is SessionStatus.ACTIVE
                and session.last_activity is not None
                and session.last_activity < cutoff
            ):
                await self.mark_abandoned(session_id)
                marked += 1
        if marked:
            logger.info("marked %d idle sessions abandoned", marked)
        return marked

    # -- interruptions ------------------------------------------------------

    def record_interruption(self, interruption: Interruption) -> None:
        """Persist an interruption record when ``persist_interruptions`` is on."""
        if not self.settings.persist_interruptions:
            return
        self._submit(
            FieldsWrite(
                collection=INTERRUPTIONS,
                doc_id=new_id(),
                user_id=interruption.user_id,
                session_id=interruption.session_id,
                fields={
                    "userId": interruption.user_id,
                    "sessionId": interruption.session_id,
                    "at": interruption.at,
                    "reason": interruption.reason,
                    "heard": interruption.heard,
                    "cut": interruption.cut,
                    "messageId": interruption.message_id,
                },
            )
        )

    # -- erasure -------------------------------------------------------------

    async def erase_user(self, user_id: str) -> UserErasure:
        """Erase a user's state, profile and sessions, here and in the store.

        Pending writes for the user are dropped at once; the store deletes run
        through the write-behind, ahead of any later write for the user.
        """
        state = await self.get_state(user_id)
        profile = await self.get_profile(user_id)
        session_ids = {sid for sid, s in self.sessions.items() if s.user_id == user_id}
        for write in self.writes.pending_writes_where(
            lambda w: isinstance(w, FieldsWrite) and w.collection == SESSIONS
        ):
            if isinstance(write, FieldsWrite) and write.user_id == user_id:
                session_ids.add(write.doc_id)
        if self.writes.mode is Mode.FIRESTORE and not self.writes.erased((user_barrier(user_id),)):
            cursor: SessionCursor | None = None
            try:
                while True:
                    rows, cursor = await self.store.list_sessions(
                        user_id=user_id, status=None, limit=_MAX_SESSIONS_LISTED, cursor=cursor
                    )
                    session_ids.update(session_id for session_id, _ in rows)
                    if cursor is None:
                        break
            except _STORE_ERRORS as exc:
                self.writes.report_unavailable(exc)
        self._submit(Erase(EraseScope.USER, user_id))
        self.states.discard(user_id)
        self.profiles.discard(user_id)
        for session_id in session_ids:
            self.sessions.discard(session_id)
        logger.info("erased user %s (%d sessions)", user_id, len(session_ids))
        return UserErasure(
            user_state=state is not None,
            user_profile=profile is not None,
            sessions=len(session_ids),
        )

    async def erase_session(self, session_id: str) -> SessionErasure:
        """Delete one session (and its persisted interruptions)."""
        session = await self.get_session(session_id)
        self._submit(Erase(EraseScope.SESSION, session_id))
        self.sessions.discard(session_id)
        return SessionErasure(session=session is not None)

    # -- stats -----------------------------------------------------------------

    async def counts(self) -> tuple[StoreCounts, bool]:
        """Aggregate counts and whether they come from the store (else from memory)."""
        if self.writes.mode is Mode.FIRESTORE:
            try:
                return await self.store.counts(), True
            except _STORE_ERRORS as exc:
                self.writes.report_unavailable(exc)
        active_users = sum(1 for _, state in self.states.items() if state.is_active)
        active_sessions = sum(1 for _, session in self.sessions.items() if session.is_active)
        return (
            StoreCounts(
                active_users=active_users,
                active_sessions=active_sessions,
                total_profiles=len(self.profiles),
                total_interruptions=0,
            ),
            False,
        )


def _replace_session(session: Session, **changes: Any) -> Session:
    return dataclasses.replace(session, **changes)
