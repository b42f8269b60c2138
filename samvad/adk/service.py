"""``SamvadSessionService``: Google ADK's session service on Samvad's hot path.

A complete :class:`google.adk.sessions.BaseSessionService`. Sessions, their
events and the ``app:`` / ``user:`` scoped state live in memory; every change
is queued on a write-behind (:class:`samvad.writebehind.WriteBehind`) that
makes it durable in Firestore (collections of its own, see
:mod:`samvad.adk.documents`), coalescing a burst of events in one session into
one write. So ``append_event`` returns in microseconds, and :meth:`flush`
returns once everything appended is in Firestore.

Semantics are ADK's own, copied from its in-memory and database services:

* state scopes: ``app:`` keys are shared by every session of the app,
  ``user:`` keys by the user's sessions in the app, ``temp:`` keys live on the
  caller's session object for the invocation and are never stored (nor kept
  in the stored event's ``state_delta``); a delta replaces a key's value
  whole, and ``None`` is stored as null;
* ``get_session`` with :class:`GetSessionConfig` (``num_recent_events``,
  ``after_timestamp``), sessions listed oldest update first, without events;
* a session object that another append has overtaken raises ADK's
  ``StaleSessionError`` (as ``DatabaseSessionService`` does), and an equal
  re-delivery of an event is ignored (as ``InMemorySessionService`` does).

Across server instances, events are never lost: each is stored under its own
id, and state keys merge key by key. An instance serves a session from memory
until its cached view expires (``SAMVAD_CACHE_TTL``); events another instance
appended meanwhile then appear, in timestamp order.

Text turns (user and agent events with text) also reach the user's Samvad
history through :meth:`samvad.persistence.Persistence.append_message`, so REST
and WebSocket clients see the conversation (``mirror_history``).

Nothing here does I/O before the first call (ADK's CLI builds services
synchronously): the store is opened and the write-behind started on first use,
or by ``await service.start()`` / ``async with service``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.sessions import _session_util
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State

from samvad.adk import documents as docs
from samvad.adk.cache import ExpiringMap
from samvad.adk.documents import Collections
from samvad.adk.store import AdkStore
from samvad.clock import Clock, SystemClock
from samvad.config import Settings
from samvad.documents import Document
from samvad.models import Mode, PersistenceStatus, Role
from samvad.persistence import Persistence
from samvad.stores.base import Store
from samvad.writebehind import WriteBehind, WriteBehindConfig
from samvad.writes import (
    Barrier,
    Erase,
    EraseScope,
    FieldsWrite,
    Write,
    session_barrier,
    user_barrier,
)

__all__ = [
    "DEFAULT_STATE_TTL",
    "STALE_SESSION_MESSAGE",
    "SamvadSessionService",
]

logger = logging.getLogger(__name__)

#: ADK's own wording, so callers matching on it keep working.
STALE_SESSION_MESSAGE = (
    "The session has been modified in storage since it was loaded. "
    "Please reload the session before appending more events."
)
#: Owner of app-scoped documents in the write-behind's barriers: no user erase
#: may hold back (or drop) writes shared by every user of an app.
_APP_OWNER = "\x00adk-app"
#: How long app- and user-scoped state is served from memory before it is
#: read again (other instances may have changed it).
DEFAULT_STATE_TTL = 5.0


@dataclass(slots=True)
class _Record:
    """One session as this instance holds it (the source of what callers get)."""

    key: str
    app_name: str
    user_id: str
    session_id: str
    state: dict[str, Any]
    events: list[Event]
    created: float
    last_update_time: float
    revision: int = 0
    next_seq: int = 0
    chunk: int = 0
    chunk_events: int = 0
    chunk_bytes: int = 0
    ids: set[str] = field(default_factory=set)


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    # Containers are copied so a caller's writes into them never reach the
    # stored view; scalars (most values) cost nothing.
    return {
        key: copy.deepcopy(value) if isinstance(value, dict | list) else value
        for key, value in state.items()
    }


_PLAIN = (str, int, float, bool, type(None))


def _split_delta(delta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A delta's app, user and session buckets (no temp keys), JSON-safe as
    ADK's database service stores them."""
    if all(type(value) in _PLAIN for value in delta.values()):
        # Plain values are their own JSON form: skip the serializer's round trip.
        return _session_util.extract_state_delta(delta)
    return _session_util.extract_json_safe_state_delta(delta)


_SESSION_FIELDS = frozenset(Session.model_fields)


def _new_session(fields: dict[str, Any], *, marker: str) -> Session:
    """A validated-already ``Session`` built the way ``model_construct`` builds one.

    ``model_construct`` walks every field in Python, a third of a ``get_session``;
    the values here are ours and complete, so this sets pydantic's slots
    directly. The contract tests compare these sessions with ADK's own.
    """
    session = Session.__new__(Session)
    object.__setattr__(session, "__dict__", fields)
    object.__setattr__(session, "__pydantic_fields_set__", set(_SESSION_FIELDS))
    object.__setattr__(session, "__pydantic_extra__", None)
    object.__setattr__(session, "__pydantic_private__", {"_storage_update_marker": marker})
    return session


def _marker(session: Session) -> str | None:
    """``session._storage_update_marker``, read without pydantic's ``__getattr__``."""
    private = session.__pydantic_private__
    return private.get("_storage_update_marker") if private else None


def _set_revision(session: Session, last_update_time: float, marker: str) -> None:
    """Set the session's update time and revision marker as plain assignments do.

    ``Session`` validates no assignment, so this is what pydantic's
    ``__setattr__`` would do, without its per-call dispatch (a tenth of an append).
    """
    session.__dict__["last_update_time"] = last_update_time
    session.__pydantic_fields_set__.add("last_update_time")
    if session.__pydantic_private__ is None:
        object.__setattr__(session, "__pydantic_private__", {})
    session.__pydantic_private__["_storage_update_marker"] = marker  # type: ignore[index]


def _text_of(event: Event) -> str:
    content = event.content
    if content is None or not content.parts:
        return ""
    return "".join(part.text for part in content.parts if part.text and not part.thought)


class SamvadSessionService(BaseSessionService):
    """ADK sessions in memory, durable in Firestore through Samvad's write-behind.

    ``settings`` (default: ``Settings.from_env()``, the environment of
    ``samvad serve``) choose the store and the write-behind's timing. Pass
    ``store`` to use a store you own (it is then neither opened nor closed
    here). ``persistence`` receives the text turns (``mirror_history``); by
    default one is built over the same store. ``prefix`` names the
    collections (:class:`~samvad.adk.documents.Collections`).
    """

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        store: Store | None = None,
        persistence: Persistence | None = None,
        mirror_history: bool = True,
        prefix: str = "adk_",
        clock: Clock | None = None,
        state_ttl: float = DEFAULT_STATE_TTL,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.clock = clock or SystemClock()
        self.collections = Collections.under(prefix)
        self._owns_store = store is None
        self._store: Store | None = store
        self._persistence = persistence
        self._owns_persistence = False
        self._mirror_history = mirror_history
        self._state_ttl = state_ttl
        self._writes: WriteBehind | None = None
        self._started: asyncio.Task[None] | None = None
        self._closed = False
        s = self.settings
        timer = self.clock.monotonic
        self._sessions: ExpiringMap[str, _Record] = ExpiringMap(
            maxsize=s.cache_max_entries, ttl=s.cache_ttl, timer=timer
        )
        self._app_states: ExpiringMap[str, dict[str, Any]] = ExpiringMap(
            maxsize=s.cache_max_entries, ttl=state_ttl, timer=timer
        )
        self._user_states: ExpiringMap[str, dict[str, Any]] = ExpiringMap(
            maxsize=s.cache_max_entries, ttl=state_ttl, timer=timer
        )
        #: Store reads made (documents and queries), for the benchmarks.
        self.store_reads = 0
        #: False on a store that does not outlive the process: nothing is queued.
        self._durable = True

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start the write-behind (also done on first use)."""
        if self._closed:
            raise RuntimeError("Cannot use a SamvadSessionService once it is closed.")
        if self._started is None:
            self._started = asyncio.create_task(self._start(), name="samvad-adk-start")
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        s = self.settings
        if self._store is None:
            # The store choice is samvad serve's own rule.
            from samvad.stores.factory import build_store

            self._store = build_store(s)
        if self._owns_store:
            await self._store.open()
        if self._persistence is None and self._mirror_history:
            self._persistence = Persistence(self._store, settings=s, clock=self.clock)
            self._owns_persistence = True
            await self._persistence.start()
        writes = WriteBehind(
            AdkStore(self._store, self.collections),
            config=WriteBehindConfig.from_settings(s),
            clock=self.clock,
        )
        await writes.start()
        if not self._store.durable:
            # A store that dies with the process (the memory store) keeps
            # nothing these maps could not: they hold everything, for good,
            # and no write is queued (see _durable).
            self._durable = False
            timer = self.clock.monotonic
            self._sessions = ExpiringMap(maxsize=sys.maxsize, ttl=math.inf, timer=timer)
            self._app_states = ExpiringMap(maxsize=sys.maxsize, ttl=math.inf, timer=timer)
            self._user_states = ExpiringMap(maxsize=sys.maxsize, ttl=math.inf, timer=timer)
        self._writes = writes

    async def _ready(self) -> WriteBehind:
        writes = self._writes
        if writes is None:
            await self.start()
            writes = self._writes
            assert writes is not None
        return writes

    async def close(self) -> int:
        """Flush within the shutdown deadline and release what this service opened.

        Returns how many writes were left unflushed.
        """
        if self._closed:
            return 0
        self._closed = True
        left = 0
        if self._started is not None:
            try:
                await self._started
            except Exception:
                logger.warning("the ADK session service never started", exc_info=True)
        if self._writes is not None:
            left = await self._writes.close(self.settings.shutdown_flush_deadline)
        if self._owns_persistence and self._persistence is not None:
            left += await self._persistence.close()
        if self._owns_store and self._store is not None:
            await self._store.close()
        return left

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

    async def flush(self) -> None:
        """Return once every change made so far is in the store.

        In memory-only mode (Firestore unreachable) this waits for Firestore to
        come back; bound it with ``asyncio.timeout``.
        """
        writes = await self._ready()
        await writes.flush()
        if self._persistence is not None and self._mirror_history:
            await self._persistence.writes.flush()

    def status(self) -> PersistenceStatus | None:
        """The write-behind's mode and backlog; None before the first use."""
        return self._writes.status() if self._writes is not None else None

    @property
    def writes_by_collection(self) -> dict[str, int]:
        """Store writes issued so far, per collection (or erase operation)."""
        return self._writes.writes_by_collection if self._writes is not None else {}

    # -- loading, with the writes not yet in the store laid over -------------

    @property
    def _inner(self) -> Store:
        assert self._store is not None
        return self._store

    async def _load(
        self,
        barriers: tuple[Barrier, ...],
        read: Callable[[], Awaitable[Any]],
        pending: Callable[[], list[Write]],
    ) -> tuple[Any, list[Write], bool]:
        """Read the store (``read``) consistently with the write-behind: the
        answer (None when not read or erased), the unconfirmed writes to lay
        over it, and whether the view built from them is complete."""
        wb = self._writes
        assert wb is not None
        found = await wb.read(read, barriers=barriers, pending=pending)
        return found.value, found.writes, found.complete

    def _pending_fields(
        self, collection: str, accept: Callable[[FieldsWrite], bool]
    ) -> list[Write]:
        wb = self._writes
        assert wb is not None
        return wb.pending_writes_where(
            lambda w: isinstance(w, FieldsWrite) and w.collection == collection and accept(w)
        )

    async def _load_record(
        self, key: str, app_name: str, user_id: str, session_id: str
    ) -> tuple[_Record | None, bool]:
        c = self.collections
        barriers = (user_barrier(user_id), session_barrier(key))

        async def read() -> tuple[Document | None, list[tuple[str, Document]]]:
            self.store_reads += 2
            session_doc, chunks = await asyncio.gather(
                self._inner.get(c.sessions, key),
                self._inner.select(c.events, where={"session": key}),
            )
            return session_doc, chunks

        def pending() -> list[Write]:
            return [
                *self._pending_fields(c.sessions, lambda w: w.doc_id == key),
                *self._pending_fields(c.events, lambda w: w.fields.get("session") == key),
            ]

        stored, writes, complete = await self._load(barriers, read, pending)
        session_doc, chunk_rows = stored if stored is not None else (None, [])
        chunks: dict[str, Document] = dict(chunk_rows)
        for write in writes:
            assert isinstance(write, FieldsWrite)
            if write.collection == c.sessions:
                session_doc = write.apply_to(session_doc)
            else:
                chunks[write.doc_id] = write.apply_to(chunks.get(write.doc_id))
        if session_doc is None:
            return None, complete
        return self._decode_record(
            key, app_name, user_id, session_id, session_doc, chunks
        ), complete

    def _decode_record(
        self,
        key: str,
        app_name: str,
        user_id: str,
        session_id: str,
        session_doc: Document,
        chunks: dict[str, Document],
    ) -> _Record:
        found: list[tuple[float, int, str, Event]] = []
        last_chunk, last_count, last_bytes, top_seq = 0, 0, 0, -1
        for chunk_doc in chunks.values():
            number = int(chunk_doc.get("chunk", 0))
            count = size = 0
            for name, value in chunk_doc.items():
                parsed = docs.parse_event_field(name)
                if parsed is None:
                    continue
                seq, event_id = parsed
                # An event still queued is overlaid as the object itself.
                event = value if isinstance(value, Event) else Event.model_validate_json(value)
                found.append((event.timestamp, seq, event_id, event))
                count += 1
                size += len(value) if isinstance(value, str) else 0
                top_seq = max(top_seq, seq)
            if number > last_chunk or (number == last_chunk and count > last_count):
                last_chunk, last_count, last_bytes = number, count, size
        # Timestamp order: across instances the only order there is; within
        # one, the order events were appended in.
        found.sort(key=lambda row: (row[0], row[1], row[2]))
        events = [row[3] for row in found]
        return _Record(
            key=key,
            app_name=app_name,
            user_id=user_id,
            session_id=session_id,
            state=docs.decode_state(session_doc),
            events=events,
            created=float(session_doc.get("createTime", 0.0)),
            last_update_time=float(session_doc.get("updateTime", 0.0)),
            revision=int(session_doc.get("revision", 0)),
            next_seq=top_seq + 1,
            chunk=last_chunk,
            chunk_events=last_count,
            chunk_bytes=last_bytes,
            ids={event.id for event in events},
        )

    async def _record(self, app_name: str, user_id: str, session_id: str) -> _Record | None:
        key = docs.session_key(app_name, user_id, session_id)
        if self._writes is not None:
            found = self._sessions.fresh(key, want_complete=self._want_complete())
            if found is not None or not self._durable:
                return found
        await self._ready()

        async def load() -> tuple[_Record | None, bool]:
            return await self._load_record(key, app_name, user_id, session_id)

        return await self._sessions.get(key, load, want_complete=self._want_complete())

    def _want_complete(self) -> bool:
        return self._writes is not None and self._writes.mode is Mode.FIRESTORE

    async def _scoped_state(
        self, collection: str, doc_id: str, barriers: tuple[Barrier, ...]
    ) -> dict[str, Any]:
        cache = self._app_states if collection == self.collections.app_states else self._user_states
        found = cache.fresh(doc_id, want_complete=self._want_complete())
        if found is not None:
            return found
        if not self._durable:
            # Nothing is ever stored: what is not in memory does not exist.
            empty: dict[str, Any] = {}
            cache.put(doc_id, empty)
            return empty

        async def load() -> tuple[dict[str, Any] | None, bool]:
            async def read() -> Document | None:
                self.store_reads += 1
                return await self._inner.get(collection, doc_id)

            doc, writes, complete = await self._load(
                barriers,
                read,
                lambda: self._pending_fields(collection, lambda w: w.doc_id == doc_id),
            )
            for write in writes:
                assert isinstance(write, FieldsWrite)
                doc = write.apply_to(doc)
            return docs.decode_state(doc), complete

        state = await cache.get(doc_id, load, want_complete=self._want_complete())
        return state if state is not None else {}

    async def _app_state(self, app_name: str) -> dict[str, Any]:
        return await self._scoped_state(
            self.collections.app_states, docs.app_state_id(app_name), (user_barrier(_APP_OWNER),)
        )

    async def _user_state(self, app_name: str, user_id: str) -> dict[str, Any]:
        return await self._scoped_state(
            self.collections.user_states,
            docs.user_state_id(app_name, user_id),
            (user_barrier(user_id),),
        )

    # -- views -----------------------------------------------------------------

    @staticmethod
    def _view(
        record: _Record,
        events: list[Event],
        app_state: dict[str, Any],
        user_state: dict[str, Any],
    ) -> Session:
        state = _copy_state(record.state)
        if app_state:
            for key, value in app_state.items():
                state[State.APP_PREFIX + key] = (
                    copy.deepcopy(value) if isinstance(value, dict | list) else value
                )
        if user_state:
            for key, value in user_state.items():
                state[State.USER_PREFIX + key] = (
                    copy.deepcopy(value) if isinstance(value, dict | list) else value
                )
        return _new_session(
            {
                "id": record.session_id,
                "app_name": record.app_name,
                "user_id": record.user_id,
                "state": state,
                "events": events,
                "last_update_time": record.last_update_time,
            },
            marker=str(record.revision),
        )

    # -- writes --------------------------------------------------------------

    def _submit(self, write: Write) -> None:
        assert self._writes is not None
        if self._durable or isinstance(write, Erase):
            self._writes.submit(write)

    def _session_write(self, record: _Record, state: dict[str, Any], *, created: bool) -> None:
        if not self._durable:
            return
        fields: dict[str, Any] = {
            "key": record.key,
            "appName": record.app_name,
            "userId": record.user_id,
            "sessionId": record.session_id,
            "updateTime": record.last_update_time,
            "revision": record.revision,
            "chunk": record.chunk,
        }
        if created:
            fields["createTime"] = record.created
        fields.update(docs.state_fields(state))
        self._submit(
            FieldsWrite(
                collection=self.collections.sessions,
                doc_id=record.key,
                user_id=record.user_id,
                session_id=record.key,
                fields=fields,
            )
        )

    def _apply_scoped(
        self, app_name: str, user_id: str, app_delta: dict[str, Any], user_delta: dict[str, Any]
    ) -> None:
        """Write app- and user-scoped deltas (already JSON-safe) here and to the store."""
        c = self.collections
        if app_delta:
            doc_id = docs.app_state_id(app_name)
            cached = self._app_states.peek(doc_id)
            if cached is not None:
                cached.update(app_delta)
            else:
                self._app_states.discard(doc_id)
            self._submit(
                FieldsWrite(
                    collection=c.app_states,
                    doc_id=doc_id,
                    user_id=_APP_OWNER,
                    fields={"appName": app_name, **docs.state_fields(app_delta)},
                )
            )
        if user_delta:
            doc_id = docs.user_state_id(app_name, user_id)
            cached = self._user_states.peek(doc_id)
            if cached is not None:
                cached.update(user_delta)
            else:
                self._user_states.discard(doc_id)
            self._submit(
                FieldsWrite(
                    collection=c.user_states,
                    doc_id=doc_id,
                    user_id=user_id,
                    fields={
                        "appName": app_name,
                        "userId": user_id,
                        **docs.state_fields(user_delta),
                    },
                )
            )

    # -- BaseSessionService ----------------------------------------------------

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        await self._ready()
        session_id = session_id.strip() if session_id else None
        if session_id:
            if await self._record(app_name, user_id, session_id) is not None:
                raise AlreadyExistsError(f"Session with id {session_id} already exists.")
        else:
            session_id = str(uuid.uuid4())
        deltas = _split_delta(state or {})
        app_state = await self._app_state(app_name)
        user_state = await self._user_state(app_name, user_id)
        # Loading the scoped state awaited: someone may have created it since.
        key = docs.session_key(app_name, user_id, session_id)
        existing = self._sessions.peek(key)
        if existing is not None:
            raise AlreadyExistsError(f"Session with id {session_id} already exists.")
        self._apply_scoped(app_name, user_id, deltas["app"], deltas["user"])
        now = self.clock.now().timestamp()
        record = _Record(
            key=key,
            app_name=app_name,
            user_id=user_id,
            session_id=session_id,
            state=dict(deltas["session"]),
            events=[],
            created=now,
            last_update_time=now,
        )
        self._sessions.put(key, record, complete=self._want_complete())
        self._session_write(record, record.state, created=True)
        return self._view(
            record, [], {**app_state, **deltas["app"]}, {**user_state, **deltas["user"]}
        )

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        session_id = session_id.strip() if session_id else session_id
        want = self._writes is not None and self._writes.mode is Mode.FIRESTORE
        record = (
            self._sessions.fresh(
                docs.session_key(app_name, user_id, session_id), want_complete=want
            )
            if self._writes is not None
            else None
        )
        if record is None:
            record = await self._record(app_name, user_id, session_id)
            if record is None:
                return None
        events = record.events
        if config is not None:
            if config.num_recent_events is not None:
                events = events[-config.num_recent_events :] if config.num_recent_events else []
            if config.after_timestamp is not None:
                # As ADK's in-memory service: from the last event before the
                # cut-off onwards (events are in time order).
                i = len(events) - 1
                while i >= 0 and events[i].timestamp >= config.after_timestamp:
                    i -= 1
                events = events[i + 1 :]
        app_state = self._app_states.fresh(docs.app_state_id(app_name), want_complete=want)
        if app_state is None:
            app_state = await self._app_state(app_name)
        user_state = self._user_states.fresh(
            docs.user_state_id(app_name, user_id), want_complete=want
        )
        if user_state is None:
            user_state = await self._user_state(app_name, user_id)
        return self._view(record, list(events), app_state, user_state)

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        wb = await self._ready()
        c = self.collections
        where: dict[str, Any] = {"appName": app_name}
        if user_id is not None:
            where["userId"] = user_id
        barriers: tuple[Barrier, ...] = (user_barrier(user_id),) if user_id is not None else ()

        async def read() -> list[tuple[str, Document]]:
            self.store_reads += 1
            return await self._inner.select(c.sessions, where=where)

        def matches(write: FieldsWrite) -> bool:
            return write.fields.get("appName") == app_name and (
                user_id is None or write.fields.get("userId") == user_id
            )

        stored, writes, _complete = await self._load(
            barriers, read, lambda: self._pending_fields(c.sessions, matches)
        )
        rows: dict[str, Document] = dict(stored or [])
        for write in writes:
            assert isinstance(write, FieldsWrite)
            rows[write.doc_id] = write.apply_to(rows.get(write.doc_id))
        records: dict[str, _Record] = {}
        for key, doc in rows.items():
            owner = doc.get("userId")
            sid = doc.get("sessionId")
            if not isinstance(owner, str) or not isinstance(sid, str):
                continue
            if wb.erased((user_barrier(owner), session_barrier(key))):
                continue
            records[key] = _Record(
                key=key,
                app_name=app_name,
                user_id=owner,
                session_id=sid,
                state=docs.decode_state(doc),
                events=[],
                created=float(doc.get("createTime", 0.0)),
                last_update_time=float(doc.get("updateTime", 0.0)),
                revision=int(doc.get("revision", 0)),
            )
        # What this instance holds is at least as new as the store.
        for key, record in self._sessions.items():
            if record.app_name == app_name and (user_id is None or record.user_id == user_id):
                records[key] = record
        app_state = await self._app_state(app_name)
        users = sorted({record.user_id for record in records.values()})
        user_states = dict(
            zip(
                users,
                await asyncio.gather(*(self._user_state(app_name, u) for u in users)),
                strict=True,
            )
        )
        sessions = [
            self._view(record, [], app_state, user_states[record.user_id])
            for record in records.values()
        ]
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        await self._ready()
        session_id = session_id.strip() if session_id else session_id
        key = docs.session_key(app_name, user_id, session_id)
        self._submit(Erase(EraseScope.SESSION, key))
        self._sessions.discard(key)

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        return _copy_state(await self._user_state(app_name, user_id))

    async def append_event(self, session: Session, event: Event) -> Event:
        if event.partial:
            return event
        # The hot path: the session is in memory (no coroutine, no load).
        record = (
            self._sessions.fresh(
                docs.session_key(session.app_name, session.user_id, session.id),
                want_complete=self._writes.mode is Mode.FIRESTORE,
            )
            if self._writes is not None
            else None
        )
        if record is None:
            record = await self._record(session.app_name, session.user_id, session.id)
        if record is None:
            raise SessionNotFoundError(f"Session {session.id} not found.")
        if event.id in record.ids and any(e == event for e in record.events if e.id == event.id):
            # An equal re-delivery (a retried call): neither stored nor applied twice.
            return event
        # Temp state reaches the caller's session before it is trimmed from the
        # event, so later agents of the same invocation can read it. (Trimming
        # re-validates the actions: only done when there is a temp key.)
        delta = event.actions.state_delta if event.actions else None
        if delta and any(key.startswith(State.TEMP_PREFIX) for key in delta):
            self._apply_temp_state(session, event)
            event = self._trim_temp_delta_state(event)
        self._check_fresh(session, record)
        deltas = (
            _split_delta(event.actions.state_delta)
            if event.actions and event.actions.state_delta
            else None
        )
        if deltas is not None and (deltas["app"] or deltas["user"]):
            # Cached normally; loaded once so the update lands on a full view.
            if deltas["app"]:
                await self._app_state(session.app_name)
            if deltas["user"]:
                await self._user_state(session.app_name, session.user_id)
            # Awaiting may have let another append in: check again.
            self._check_fresh(session, record)
        payload = event.model_dump_json(exclude_none=True, fallback=str) if self._durable else ""
        if len(payload) > docs.MAX_EVENT_BYTES:
            raise ValueError(
                f"Event {event.id} is {len(payload)} bytes as JSON; "
                f"at most {docs.MAX_EVENT_BYTES} can be stored."
            )
        # From here on nothing awaits: the append is atomic for this instance.
        if record.chunk_events and (
            record.chunk_events >= docs.CHUNK_EVENTS
            or record.chunk_bytes + len(payload) > docs.CHUNK_BYTES
        ):
            record.chunk += 1
            record.chunk_events = record.chunk_bytes = 0
        seq = record.next_seq
        record.next_seq += 1
        record.revision += 1
        record.chunk_events += 1
        record.chunk_bytes += len(payload)
        record.events.append(event)
        record.ids.add(event.id)
        record.last_update_time = event.timestamp
        session_delta: dict[str, Any] = {}
        if deltas is not None:
            session_delta = deltas["session"]
            record.state.update(session_delta)
            if deltas["app"] or deltas["user"]:
                self._apply_scoped(session.app_name, session.user_id, deltas["app"], deltas["user"])
        if self._durable:
            self._submit(
                FieldsWrite(
                    collection=self.collections.events,
                    doc_id=docs.chunk_id(record.key, record.chunk),
                    user_id=record.user_id,
                    session_id=record.key,
                    fields={
                        "session": record.key,
                        "appName": record.app_name,
                        "userId": record.user_id,
                        "chunk": record.chunk,
                        docs.event_field(seq, event.id): payload,
                    },
                )
            )
        if self._durable:
            self._session_write(record, session_delta, created=False)
        _set_revision(session, event.timestamp, str(record.revision))
        if self._mirror_history:
            self._mirror(session, event)
        return self._commit_event_to_session(session, event)

    @staticmethod
    def _check_fresh(session: Session, record: _Record) -> None:
        """Raise ``StaleSessionError`` when another append overtook ``session``."""
        marker = _marker(session)
        if marker is not None:
            if marker != str(record.revision):
                raise StaleSessionError(STALE_SESSION_MESSAGE)
            return
        # A session object this service did not hand out: stale only when the
        # stored log has moved past the events it holds.
        if record.last_update_time > session.last_update_time:
            latest = record.events[-1].id if record.events else None
            held = session.events[-1].id if session.events else None
            if latest != held:
                raise StaleSessionError(STALE_SESSION_MESSAGE)

    def _mirror(self, session: Session, event: Event) -> None:
        if not self._mirror_history or self._persistence is None:
            return
        text = _text_of(event)
        if not text.strip():
            return
        role = Role.USER if event.author == "user" else Role.ASSISTANT
        self._persistence.append_message(
            session.user_id, role=role, content=text, session_id=session.id
        )

    # -- erasure ---------------------------------------------------------------

    async def erase_user(self, user_id: str) -> int:
        """Erase every ADK session, event and user-scoped state of ``user_id`` (all apps).

        Pending writes for the user are dropped at once; the store deletes run
        through the write-behind, ahead of any later write for the user.
        Returns how many of the user's sessions this instance held in memory.
        """
        await self._ready()
        self._submit(Erase(EraseScope.USER, user_id))
        dropped = [key for key, record in self._sessions.items() if record.user_id == user_id]
        for key in dropped:
            self._sessions.discard(key)
        suffix = docs.user_state_suffix(user_id)
        for doc_id in [k for k, _ in self._user_states.items() if k.endswith(suffix)]:
            self._user_states.discard(doc_id)
        logger.info("erased the ADK data of user %s (%d sessions held)", user_id, len(dropped))
        return len(dropped)
