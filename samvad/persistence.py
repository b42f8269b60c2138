"""The persistence service: what the layers above call to read and write data.

It owns the view caches (user states, profiles, sessions) and drives the
write-behind queue (:mod:`samvad.writebehind`), which it calls and which never
calls back. Guarantees (``docs/persistence.md`` has the whole story):

* **Memory first** — a write updates the cached view and the queue and returns
  at once: no method here waits on a Firestore write, and no Firestore error
  reaches a caller (the one refusal is :class:`~samvad.errors.BacklogFull`,
  before anything is changed).
* **Never back in time** — a cache miss reads the store once and lays the
  writes that have not reached it yet on top (the *overlay*), so a caller
  sees its own writes whether or not Firestore is reachable. A view built
  without the store (memory-only mode) is marked incomplete and read again
  once the store is back.
* **Erasure is final** — once :meth:`Persistence.erase_user` or
  :meth:`Persistence.erase_session` returns, no read on this instance serves
  the erased data, whether from the cache, the store, or a write that was
  pending or in flight; only writes made after the erase are served.
* **Instances converge** — a profile's cached view adopts what each of this
  instance's profile writes committed (other instances' appends merged in)
  plus what this instance queued since. The adoption happens at the next
  profile operation here, the first moment anyone can observe the view, and
  every change to the profile cache takes the commits first, so it is the
  same as adopting at commit time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
import msgspec.structs

from samvad.cache import Cached, Loader, ViewCache
from samvad.clock import Clock, SystemClock, millisecond_now, to_iso
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
from samvad.emulator import export_data
from samvad.errors import Conflict
from samvad.history import new_message_id
from samvad.interruptions import Interruption
from samvad.journal import Journal, JournalConfig
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
from samvad.overlay import RemoteWrites
from samvad.stores.base import HistoryBounds, SessionCursor, Store, StoreRejected, StoreUnavailable
from samvad.writebehind import FlushObserver, Read, WriteBehind, WriteBehindConfig
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

__all__ = [
    "CacheStats",
    "Persistence",
    "SessionErasure",
    "UserErasure",
    "WriteReceipt",
    "current_receipt",
    "new_id",
]

logger = logging.getLogger(__name__)

_MAX_SESSIONS_LISTED = 100

V = TypeVar("V")

#: The session fields an update writes: ending a session, and marking it
#: abandoned; and the maps a save merges key by key.
_ENDED = ("isActive", "status", "lastActivity", "endedAt", "expireAt")
_STATUS = ("isActive", "status")
_MERGED = ("metadata",)


def _session_fields(session: Session, names: tuple[str, ...]) -> Document:
    encoded = encode_session(session)
    return {name: encoded[name] for name in names}


# Read for every message, under a module name: on Python 3.11 reading an
# attribute of an Enum class goes through the slow hook ``EnumType.__getattr__``
# installs (see samvad.conversation._USER).
_FIRESTORE = Mode.FIRESTORE

#: Seconds another instance's write is laid over loads here: far longer than
#: its write-behind takes to flush it (about a second) unless it is in an outage.
REMOTE_WRITES_TTL = 60.0
#: Seconds an erase another instance announced holds loads here at most, when
#: its end is never announced (that instance died during it).
REMOTE_ERASE_HOLD = 30.0


DEAD_LETTER_FILE = "dead-letter.jsonl"
#: Seconds ``start`` waits for the embedded emulator to answer before it goes
#: on in memory-only mode (it answered a read already; this covers a cold start).
EMBEDDED_START_WAIT = 60.0


class WriteReceipt:
    """The newest journal record written on behalf of one acknowledgement (a
    REST response): the door that sends it waits for that record, not for the
    journal's newest (:meth:`Persistence.durable`)."""

    __slots__ = ("record",)

    def __init__(self) -> None:
        self.record: asyncio.Future[int] | None = None


#: The receipt of what the current context will acknowledge; the web door sets
#: one per request. Tasks started from that context share it.
current_receipt: ContextVar[WriteReceipt | None] = ContextVar("samvad_write_receipt", default=None)


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return to_iso(value)
    if isinstance(value, msgspec.Struct):  # a Message of a profile write
        return msgspec.structs.asdict(value)
    return repr(value)


def _fields_of(write: Write) -> dict[str, Any]:
    """A write's fields by name (a dataclass's or a msgspec struct's)."""
    if isinstance(write, msgspec.Struct):
        return msgspec.structs.asdict(write)
    return dataclasses.asdict(write)


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


@dataclass(frozen=True, slots=True)
class CacheStats:
    """One view cache's figures (for metrics)."""

    hits: int
    misses: int
    entries: int
    #: Estimated bytes held (see ``SAMVAD_CACHE_MAX_BYTES``).
    bytes: int = 0


class Persistence:
    """Cache + store + write-behind, behind one API.

    Construction does no I/O; :meth:`start` (or ``async with``) probes the store
    and starts the write-behind; :meth:`close` flushes within the configured
    deadline. The store is owned by the caller. ``on_flush`` observes every
    store write (metrics); see :data:`samvad.writebehind.FlushObserver`.
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
        #: How long a session is kept after its last activity (every touch sets it).
        self._retention = timedelta(days=self.settings.session_retention_days)
        self.clock = clock or SystemClock()
        self._now = millisecond_now(self.clock)
        self.store = store
        s = self.settings
        if store.bounds != HistoryBounds(cap=s.history_cap, max_bytes=s.history_max_bytes):
            raise ValueError(
                "The store bounds history differently from the settings "
                f"({store.bounds} against cap={s.history_cap}, max_bytes={s.history_max_bytes})."
            )
        #: The write-ahead journal, open from :meth:`start` when enabled (and the
        #: store is durable: replaying into a memory store would keep nothing).
        self.journal: Journal | None = None
        self.writes = WriteBehind(
            store,
            config=WriteBehindConfig.from_settings(s),
            clock=self.clock,
            on_flush=on_flush,
            confirm=self._confirm_journal,
            dead_letter=self._keep_dead_letter,
            on_commit=self._committed_uncached,
        )
        timer = self.clock.monotonic
        size, ttl, budget = s.cache_max_entries, s.cache_ttl, s.cache_max_bytes
        # The byte budget: half for profiles (histories), a quarter each for
        # states and sessions. Evicting never loses a write: unconfirmed
        # writes live in the write-behind and are laid over the next load.
        self.states: ViewCache[str, UserState] = ViewCache(
            maxsize=size, ttl=ttl, timer=timer, max_bytes=budget // 4, sizeof=UserState.memory_bytes
        )
        self.profiles: ViewCache[str, Profile] = ViewCache(
            maxsize=size, ttl=ttl, timer=timer, max_bytes=budget // 2, sizeof=Profile.memory_bytes
        )
        self.sessions: ViewCache[str, Session] = ViewCache(
            maxsize=size, ttl=ttl, timer=timer, max_bytes=budget // 4, sizeof=Session.memory_bytes
        )
        self._background: set[asyncio.Task[Any]] = set()
        # Coherence across instances (samvad.coherence): who hears of each
        # write, and what other instances wrote and erased.
        self._taps: list[Callable[[Write], None]] = []
        self.remote = RemoteWrites(ttl=REMOTE_WRITES_TTL, hold=REMOTE_ERASE_HOLD, timer=timer)
        # Told of every erased user here or elsewhere (None: maybe any user).
        self._erase_listeners: list[Callable[[str | None], None]] = []
        # The embedded emulator holds what it committed in its memory until an
        # export: journal confirmations wait, tagged with the number of exports
        # begun before them, for an export that began after them to complete.
        self._held: deque[tuple[int, list[int]]] = deque()
        self._exports_begun = 0
        self._export_lock = threading.Lock()
        self._exporter: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the journal and queue what it holds unconfirmed, then start the write-behind."""
        s = self.settings
        if s.journal and self.store.durable:
            journal = await asyncio.to_thread(
                Journal.open,
                s.journal_dir,
                config=JournalConfig(max_bytes=s.journal_max_bytes),
                clock=self.clock,
            )
            journal.start()
            self.journal = journal
            for record in journal.recovered:
                # Acknowledged before the last stop: queued again in their
                # original order, before anything new.
                self.writes.submit(record.write, journal_seq=record.seq, replay=True)
            journal.recovered = ()
        await self.writes.start()
        if s.emulator_export_dir is not None:
            await self._start_embedded()

    async def _start_embedded(self) -> None:
        s = self.settings
        if self.writes.mode is Mode.MEMORY:
            # Our own emulator, which just answered a read: a first call that
            # failed is a cold start, not an outage. Ready only once it answers.
            try:
                async with asyncio.timeout(EMBEDDED_START_WAIT):
                    await self.writes.reachable()
            except TimeoutError:
                logger.warning(
                    "the local Firestore emulator did not answer within %.0fs: memory-only mode",
                    EMBEDDED_START_WAIT,
                )
        if s.emulator_export_interval > 0:
            self._exporter = asyncio.create_task(
                self._export_periodically(s.emulator_export_interval),
                name="samvad-emulator-export",
            )

    async def close(self) -> int:
        """Flush pending writes within the shutdown deadline; returns how many were left.

        With the journal, writes left over are replayed at the next start.
        """
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._exporter is not None:
            self._exporter.cancel()
            await asyncio.gather(self._exporter, return_exceptions=True)
        left = await self.writes.close(self.settings.shutdown_flush_deadline)
        if self.journal is not None:
            if self.settings.emulator_export_dir is not None and self._held:
                await self.export()
            await self.journal.close()
        return left

    async def export(self) -> None:
        """Export the embedded emulator's data, then confirm in the journal what
        the export holds: every write the emulator committed before it began.

        A failed export (the emulator is gone) confirms nothing: those writes
        are replayed from the journal at the next start.
        """
        directory = self.settings.emulator_export_dir
        if directory is None:
            raise RuntimeError("Cannot export: no embedded emulator (emulator_export_dir).")
        self._exports_begun += 1
        begun = self._exports_begun
        try:
            await asyncio.to_thread(self._export_locked, directory)
        except Exception:
            logger.warning("exporting the local Firestore emulator's data failed", exc_info=True)
            return
        covered: list[int] = []
        while self._held and self._held[0][0] < begun:
            covered.extend(self._held.popleft()[1])
        if covered and self.journal is not None:
            self.journal.confirm(covered)

    def _export_locked(self, directory: Path) -> None:
        # One export at a time: a cancelled waiter leaves its thread running.
        host, project = self.settings.emulator_host, self.settings.project
        assert host is not None and project is not None
        with self._export_lock:
            export_data(host, project, directory)

    async def _export_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.export()

    @property
    def dead_letter_path(self) -> Path:
        """Where changes Firestore refused for their content are kept (JSON lines)."""
        return self.settings.data_dir / DEAD_LETTER_FILE

    def _keep_dead_letter(self, key: Key, write: Write, reason: str) -> None:
        # Runs in a worker thread (see samvad.writebehind.DeadLetter).
        record = {
            "at": to_iso(self.clock.now()),
            "document": "/".join(key),
            "reason": reason,
            "change": {"type": type(write).__name__, **_fields_of(write)},
        }
        # ASCII: a lone surrogate (one way to be refused) is kept as an escape.
        line = json.dumps(record, default=_json_value, ensure_ascii=True) + "\n"
        path = self.dead_letter_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="ascii") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _confirm_journal(self, seqs: list[int]) -> None:
        if self.journal is None:
            return
        if self.settings.emulator_export_dir is not None:
            self._held.append((self._exports_begun, seqs))
        else:
            self.journal.confirm(seqs)

    async def durable(self, receipt: WriteReceipt | None = None) -> None:
        """Return once every write submitted so far is in the journal on disk;
        with a ``receipt``, once the writes it holds are (records become durable
        in order, so that is its newest record and every one before it).

        Without a journal, at once. Raises
        :class:`~samvad.journal.JournalUnavailable` if one could not be written:
        such a write must not be acknowledged.
        """
        if self.journal is None:
            return
        if receipt is None:
            await self.journal.sync()
        elif receipt.record is not None:
            await self.journal.synced(receipt.record)

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
        """Where writes go right now (``memory`` during an outage)."""
        return self.writes.mode

    def status(self) -> PersistenceStatus:
        """What the write-behind is doing (mode, pending writes, lag, counters)."""
        return self.writes.status()

    def pending_interruptions(self) -> int:
        """Interruption records waiting to be written to the store."""
        return len(self._pending_fields(INTERRUPTIONS))

    def _pending_fields(self, collection: str, user_id: str | None = None) -> list[Write]:
        """The live unconfirmed writes to ``collection`` (of one user), oldest first."""
        return self.writes.pending_writes_where(
            lambda w: (
                isinstance(w, FieldsWrite)
                and w.collection == collection
                and (user_id is None or w.user_id == user_id)
            )
        )

    def cache_stats(self) -> dict[str, CacheStats]:
        """Hits, misses and entries of the ``states``, ``profiles`` and ``sessions`` caches."""
        return {
            name: CacheStats(
                hits=cache.hits, misses=cache.misses, entries=len(cache), bytes=cache.bytes
            )
            for name, cache in (
                ("states", self.states),
                ("profiles", self.profiles),
                ("sessions", self.sessions),
            )
        }

    def _submit(self, write: Write) -> None:
        journal = self.journal
        if journal is None:
            self.writes.submit(write)
        else:
            # Refused writes are refused before they are journalled: a record in
            # the journal is a write that will be replayed.
            self.writes.admit(write)
            record = journal.append(write)
            receipt = current_receipt.get()
            if receipt is not None:
                receipt.record = record
            self.writes.submit(write, journal_seq=journal.last_appended)
        for tap in self._taps:
            tap(write)

    # -- loading with the overlay ------------------------------------------

    def _read_doc(
        self, collection: str, doc_id: str, barriers: tuple[Barrier, ...]
    ) -> Awaitable[Read[Document | None]]:
        """The stored document and the unconfirmed writes to lay over it (other
        instances' first, then this one's)."""
        pending = partial(self.unconfirmed, (collection, doc_id))
        if self.remote.erased(barriers):
            return self._remotely_erased(pending)
        return self.writes.read(
            partial(self.store.get, collection, doc_id), barriers=barriers, pending=pending
        )

    @staticmethod
    def _overlay_fields(doc: Document | None, writes: list[Write]) -> Document | None:
        for write in writes:
            if isinstance(write, FieldsWrite):
                doc = write.result(doc)
        return doc

    def _overlay_profile(self, profile: Profile | None, writes: list[Write]) -> Profile | None:
        now: datetime | None = None
        for write in writes:
            if isinstance(write, ProfileWrite):
                if now is None:
                    now = self._now()  # one reading for the whole overlay
                profile = self._profile_with(profile, write, now)
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

    def _write_profile(
        self, write: ProfileWrite, now: datetime, *, adopted: Cached[Profile] | None = None
    ) -> None:
        """Queue ``write`` and apply it to the cached view.

        An uncached profile is not read to warm its view: the write's flush
        reads the stored profile in its transaction, and the profile it
        commits becomes the view at commit time, within the flush's linger of
        a first write (:meth:`_committed_uncached`). One known to be absent
        is made from the write at once.

        ``adopted``: the cached view, peeked after :meth:`_adopt_committed` by a
        caller that did both just before (nothing can run in between).
        """
        if adopted is None:
            self._adopt_committed()  # before the write joins the pending ones
        if self.journal is None and not self._taps:
            self.writes.submit(write)  # _submit's plain case, inlined: two a message
        else:
            self._submit(write)
        cached = adopted or self.profiles.peek(write.user_id)
        if cached is None:
            absent = self.profiles.absence(write.user_id)
            if absent is not None:
                # What a load would make of it now: the pending writes over nothing.
                view = self._overlay_profile(None, self.unconfirmed((PROFILES, write.user_id)))
                if view is not None:
                    self.profiles.put(write.user_id, view, complete=absent)
                else:
                    self.profiles.discard(write.user_id)
            return
        self.profiles.put(
            write.user_id,
            self._profile_with(cached.value, write, now),
            complete=cached.complete,
        )

    def _want_complete(self) -> bool:
        return self.writes.mode is _FIRESTORE

    def _forget_refused(self) -> None:
        """Drop the views of documents a change of which the store refused
        (set aside in the dead-letter): they showed what never landed — such
        as a session an instance in memory-only mode took for new while it
        was another user's. The next read loads what the store holds."""
        for collection, doc_id in self.writes.take_refused():
            if collection == STATES:
                self.states.invalidate(doc_id)
            elif collection == PROFILES:
                self.profiles.invalidate(doc_id)
            elif collection == SESSIONS:
                self.sessions.invalidate(doc_id)

    def retry_after(self) -> float:
        """Seconds until Firestore may be read again: the write-behind's next probe."""
        return self.writes.retry_after()

    # -- user state ----------------------------------------------------------

    async def get_state(self, user_id: str) -> UserState | None:
        """A user's state, or None when they have none (or, in memory-only mode,
        none that this instance knows of: :meth:`read_state` tells which)."""
        return (await self.read_state(user_id))[0]

    async def read_state(self, user_id: str) -> tuple[UserState | None, bool]:
        """:meth:`get_state`, and whether the answer is complete: False when it was
        built without Firestore, so that None does not mean there is no state."""
        self._forget_refused()
        return await self.states.lookup(
            user_id, self._state_loader(user_id), want_complete=self._want_complete()
        )

    def _state_loader(self, user_id: str) -> Loader[UserState]:
        async def load() -> tuple[UserState | None, bool]:
            read = await self._read_doc(STATES, user_id, (user_barrier(user_id),))
            doc = self._overlay_fields(read.value, read.writes)
            return (decode_state(user_id, doc) if doc is not None else None), read.complete

        return load

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
        self._warm(self.states, user_id, self._state_loader(user_id))
        return UserState(user_id=user_id, data=dict(data), updated_at=now, is_active=True)

    def _warm(self, cache: ViewCache[str, Any], key: str, load: Loader[Any]) -> None:
        """Load a view in the background after a write to an uncached document
        (one task: :meth:`ViewCache.prefetch`), kept until it ends.

        Whoever writes is likely to read next; and should Firestore go away in
        between, the complete view is already in memory.
        """
        self._forget_refused()
        task = cache.prefetch(key, load, want_complete=self._want_complete())
        if task is None:
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for background cache loads started by writes (for tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- profile and history -----------------------------------------------

    async def get_profile(self, user_id: str) -> Profile | None:
        """A user's profile with its bounded history, or None when they have none
        (or none that this instance knows of: :meth:`read_profile` tells which)."""
        return (await self.read_profile(user_id))[0]

    async def read_profile(self, user_id: str) -> tuple[Profile | None, bool]:
        """:meth:`get_profile`, and whether the answer is complete: False when it was
        built without Firestore (the stored history may hold more)."""
        self._forget_refused()
        self._adopt_committed()
        return await self.profiles.lookup(
            user_id, self._profile_loader(user_id), want_complete=self._want_complete()
        )

    def _profile_loader(self, user_id: str) -> Loader[Profile]:
        s = self.settings

        async def load() -> tuple[Profile | None, bool]:
            read = await self._read_doc(PROFILES, user_id, (user_barrier(user_id),))
            doc = read.value
            profile = (
                decode_profile(user_id, doc, cap=s.history_cap, max_bytes=s.history_max_bytes)
                if doc is not None
                else None
            )
            # Commits that came in during the read: this user's is dropped (its
            # write is in the overlay), the others' adopted, before the cache
            # takes this view in the same step.
            self._adopt_committed()
            return self._overlay_profile(profile, read.writes), read.complete

        return load

    async def recent_history(self, user_id: str, limit: int) -> tuple[Message, ...]:
        """The last ``limit`` messages of a user's history, oldest first."""
        profile = await self.get_profile(user_id)
        return profile.recent(limit) if profile is not None else ()

    def _cached(self, cache: ViewCache[str, V], key: str) -> tuple[V | None, bool] | None:
        """What a lookup in ``cache`` would answer (see :meth:`read_state`)
        when the cache holds it; None when it would have to load. For reads
        made for every message, without the coroutines of a lookup."""
        writes = self.writes
        if writes.refused:
            self._forget_refused()
        return cache.held(key, want_complete=writes.mode is _FIRESTORE)

    def held_state(self, user_id: str) -> tuple[UserState | None] | None:
        """:meth:`get_state`'s answer, in a 1-tuple, when the cache holds it;
        None when it would have to be loaded. The reply to every message reads
        the state."""
        held = self._cached(self.states, user_id)
        return None if held is None else (held[0],)

    def held_history(self, user_id: str, limit: int) -> tuple[Message, ...] | None:
        """:meth:`recent_history`'s answer when the cache holds the profile;
        None when it would have to be loaded (as :meth:`held_state`)."""
        writes = self.writes
        if writes.refused:
            self._forget_refused()
        if writes.committed:
            self._adopt_committed()
        held = self.profiles.held(user_id, want_complete=writes.mode is _FIRESTORE)
        if held is None:
            return None
        profile = held[0]
        return profile.recent(limit) if profile is not None else ()

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
        client_id: str | None = None,
    ) -> Message:
        """Append a message to a user's history; returns it with its id and timestamp."""
        now = self._now()
        if self.writes.committed:
            self._adopt_committed()
        cached = self.profiles.peek(user_id)
        if cached is not None:
            held = cached.value  # its newest(), inline
            if held.log_end > held.log_start:
                # Never older than the message before it, whatever the wall clock does.
                now = max(now, held.log[held.log_end - 1].timestamp)
        message = Message(
            id=message_id or new_message_id(now),
            role=role,
            content=content,
            timestamp=now,
            session_id=session_id,
            interrupted=interrupted,
            seq=seq,
            client_id=client_id,
        )
        self._write_profile(
            ProfileWrite(user_id=user_id, append=[message], cap=self.settings.history_cap),
            now,
            adopted=cached,
        )
        return message

    async def stored_message_ids(self, user_id: str) -> frozenset[str] | None:
        """The ids of the messages the store holds in ``user_id``'s history,
        read from it now (not from a view); None when it cannot answer."""
        try:
            doc = await self.store.get(PROFILES, user_id)
        except (StoreUnavailable, StoreRejected):
            return None
        history = doc.get("conversationHistory") if doc is not None else None
        if not isinstance(history, list):
            return frozenset()
        return frozenset(
            m["id"] for m in history if isinstance(m, dict) and isinstance(m.get("id"), str)
        )

    def store_again(self, user_id: str, message: Message) -> None:
        """Submit ``message``, already in the view, for the store once more.

        Stores merge messages by id, so this changes nothing where the store
        has it; where it does not — it was heard from another instance that
        died before flushing it — this instance writes it now.
        """
        self._write_profile(
            ProfileWrite(user_id=user_id, append=[message], cap=self.settings.history_cap),
            self._now(),
        )

    def set_preferences(self, user_id: str, preferences: Mapping[str, Any]) -> None:
        """Merge ``preferences`` into a user's profile (each top-level key replaced whole)."""
        write = ProfileWrite(
            user_id=user_id, preferences=dict(preferences), cap=self.settings.history_cap
        )
        self._write_profile(write, self._now())

    def _adopt_committed(self) -> None:
        """Adopt the profiles this instance's writes committed into the cached views.

        A commit merged what other instances appended: the view becomes it plus
        what this instance queued since, so instances converge at flush speed.
        Called before every change to the profile cache (see the module
        docstring); an uncached profile is left to its next load. (A commit
        that found no view became one at commit time, in
        :meth:`_committed_uncached`, and is not in the list any more.)
        """
        for committed in self.writes.take_committed_profiles():
            user_id = committed.user_id
            cached = self.profiles.peek(user_id)
            if cached is None:
                continue
            # Other instances' writes the commit may predate, then this one's.
            view = self._overlay_profile(committed, self.unconfirmed((PROFILES, user_id)))
            if view is not None:
                self.profiles.put(user_id, view, complete=cached.complete)

    def _committed_uncached(self, profile: Profile) -> None:
        """A profile write of this instance has just committed (on the event
        loop, right after the commit): a profile no view here holds gets one
        now, whole, as a load at this moment would make it (the transaction
        read the stored profile), with what this instance queued since laid
        over it. That is how a profile first written here gets its view,
        without a read of its own. Not while a load of it is in flight (its
        view follows) or another instance's erase of its user is under way.
        A cached view adopts the commit at its next operation
        (:meth:`_adopt_committed`); an adoption later than now could put back
        a view evicted meanwhile, older than the store."""
        user_id = profile.user_id
        profiles = self.profiles
        if (
            profiles.peek(user_id) is not None
            or profiles.loading(user_id)
            or self.remote.erased((user_barrier(user_id),))
        ):
            return
        key = (PROFILES, user_id)
        view = self._overlay_profile(profile, self.unconfirmed(key))
        if view is not None:
            profiles.put(user_id, view, complete=True)
            self.writes.adopted(key)

    # -- sessions ----------------------------------------------------------

    async def get_session(self, session_id: str) -> Session | None:
        """A session, or None when there is none (or none that this instance
        knows of: :meth:`read_session` tells which)."""
        return (await self.read_session(session_id))[0]

    async def read_session(self, session_id: str) -> tuple[Session | None, bool]:
        """:meth:`get_session`, and whether the answer is complete: False when it
        was built without Firestore, so that None does not mean there is none."""
        self._forget_refused()

        async def load() -> tuple[Session | None, bool]:
            read = await self._read_doc(SESSIONS, session_id, (session_barrier(session_id),))
            doc = read.value
            owner = doc.get("userId") if doc is not None else None
            if isinstance(owner, str) and self._erased((user_barrier(owner),)):
                # Its user's erase is pending: the stored session is gone.
                doc = None
            doc = self._overlay_fields(doc, read.writes)
            return (decode_session(session_id, doc) if doc is not None else None), read.complete

        return await self.sessions.lookup(session_id, load, want_complete=self._want_complete())

    def _write_session(
        self,
        session: Session,
        fields: Document,
        *,
        defaults: Document | None = None,
        merge: tuple[str, ...] = (),
        touch: bool = False,
        must_exist: bool = False,
    ) -> None:
        """Queue ``fields`` of ``session`` and cache ``session``.

        The fields are the ones the change is about (``merge``: maps merged
        key by key by the store). A change must not put back what this
        instance's view holds of fields another instance changed meanwhile:
        a touch or an end from a view taken before a metadata change
        elsewhere would revert it (and a touch would re-activate a session
        ended elsewhere); a save from that view would drop the other
        instance's metadata keys.
        """
        self._submit(
            FieldsWrite(
                collection=SESSIONS,
                doc_id=session.id,
                user_id=session.user_id,
                session_id=session.id,
                fields=fields,
                defaults=defaults if defaults is not None else {},
                touch=touch,
                # Only a save (re)creates a session; an update of one that was
                # erased meanwhile (on any instance) must not bring it back.
                must_exist=must_exist,
                merge=merge,
            )
        )
        cached = self.sessions.peek(session.id)
        if cached is None:
            self.sessions.put(session.id, session)
            return
        # A touch changes the activity times only: the view's size stays.
        size = self.sessions.size_of(session.id) if touch else None
        self.sessions.put(session.id, session, complete=cached.complete, size=size)

    def _expiry(self, now: datetime) -> datetime:
        return now + self._retention

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
        fields = encode_session(session)
        defaults = {"createdAt": fields.pop("createdAt")}
        # The metadata keys given, merged into the stored ones by the store; a
        # language not given stays what is stored (or this view's, for a new
        # document).
        fields["metadata"] = dict(metadata or {})
        if language is None:
            defaults["language"] = fields.pop("language")
        self._write_session(session, fields, defaults=defaults, merge=_MERGED)
        return session

    async def end_session(self, session_id: str) -> Session | None:
        """Mark a session ended; None when there is no such session."""
        existing = await self.get_session(session_id)
        if existing is None:
            return None
        now = self._now()
        session = msgspec.structs.replace(
            existing,
            status=SessionStatus.ENDED,
            ended_at=existing.ended_at or now,
            last_activity=now,
            expire_at=self._expiry(now),
        )
        self._write_session(session, _session_fields(session, _ENDED), must_exist=True)
        return session

    async def touch_session(self, session_id: str) -> Session | None:
        """Record activity on a session; flushed lazily (``touch_interval``)."""
        # A message touches its session: from the cache when it holds it.
        held = self._cached(self.sessions, session_id)
        existing = held[0] if held is not None else await self.get_session(session_id)
        if existing is None:
            return None
        now = self._now()
        session = msgspec.structs.replace(existing, last_activity=now, expire_at=self._expiry(now))
        self._write_session(
            session,
            {"lastActivity": now, "expireAt": session.expire_at},
            touch=True,
            must_exist=True,
        )
        return session

    async def mark_abandoned(self, session_id: str) -> Session | None:
        """Mark an active session ``abandoned`` (idle longer than allowed)."""
        existing = await self.get_session(session_id)
        if existing is None or existing.status is not SessionStatus.ACTIVE:
            return existing
        session = msgspec.structs.replace(existing, status=SessionStatus.ABANDONED)
        self._write_session(session, _session_fields(session, _STATUS), must_exist=True)
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
        self._forget_refused()
        limit = max(1, min(limit, _MAX_SESSIONS_LISTED))
        wb = self.writes

        def pending() -> list[Write]:
            return [*self.remote.session_writes(user_id), *self._pending_fields(SESSIONS, user_id)]

        if self.remote.erased((user_barrier(user_id),)):
            read: Read[Any] = await self._remotely_erased(pending)
        else:
            read = await wb.read(
                partial(
                    self.store.list_sessions,
                    user_id=user_id,
                    status=status,
                    limit=limit,
                    cursor=cursor,
                ),
                barriers=(user_barrier(user_id),),
                pending=pending,
            )
        rows: dict[str, Document] = {}
        next_cursor: SessionCursor | None = None
        if read.value is not None:
            stored, next_cursor = read.value
            rows = dict(stored)
        else:
            # Memory-only (or erased): what this instance knows of the user's sessions.
            for session_id, session in self.sessions.items():
                if session.user_id == user_id:
                    rows[session_id] = encode_session(session)
        for write in read.writes:
            assert isinstance(write, FieldsWrite)
            doc = write.result(rows.get(write.doc_id))
            if doc is not None:
                rows[write.doc_id] = doc
        sessions = [
            decode_session(session_id, doc)
            for session_id, doc in rows.items()
            if doc.get("userId") == user_id and not self._erased((session_barrier(session_id),))
        ]
        if status is not None:
            sessions = [s for s in sessions if s.status is status]
        sessions = [s for s in sessions if s.last_activity is not None]
        sessions.sort(key=lambda s: (s.last_activity, s.id), reverse=True)
        if cursor is not None:
            position = (cursor.last_activity, cursor.session_id)
            sessions = [s for s in sessions if (s.last_activity, s.id) < position]
        page = sessions[:limit]
        if not read.stored:
            next_cursor = None
            if len(sessions) > limit:
                last = page[-1]
                assert last.last_activity is not None
                next_cursor = SessionCursor(last_activity=last.last_activity, session_id=last.id)
        encoded = next_cursor.encode() if next_cursor is not None else None
        return SessionPage(sessions=tuple(page), next_cursor=encoded, complete=read.complete)

    async def active_sessions(self, user_id: str) -> tuple[Session, ...]:
        """A user's active sessions, most recent first (at most 100)."""
        page = await self.list_sessions(
            user_id, status=SessionStatus.ACTIVE, limit=_MAX_SESSIONS_LISTED
        )
        return page.sessions

    async def sweep_idle_sessions(self, *, limit: int = 500) -> int:
        """Mark active sessions idle longer than ``session_idle_timeout`` abandoned."""
        cutoff = self._now() - timedelta(seconds=self.settings.session_idle_timeout)

        def idle(session: Session | None) -> bool:
            return (
                session is not None
                and session.status is SessionStatus.ACTIVE
                and session.last_activity is not None
                and session.last_activity < cutoff
            )

        ids = {session_id for session_id, session in self.sessions.items() if idle(session)}
        read = await self.writes.read(partial(self.store.idle_sessions, before=cutoff, limit=limit))
        ids.update(session_id for session_id, _ in read.value or ())
        marked = 0
        for session_id in sorted(ids):
            if idle(await self.get_session(session_id)):
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
        session_ids.update(w.key[1] for w in self._pending_fields(SESSIONS, user_id))

        async def stored_session_ids() -> set[str]:
            ids: set[str] = set()
            cursor: SessionCursor | None = None
            while True:
                rows, cursor = await self.store.list_sessions(
                    user_id=user_id, status=None, limit=_MAX_SESSIONS_LISTED, cursor=cursor
                )
                ids.update(session_id for session_id, _ in rows)
                if cursor is None:
                    return ids

        read = await self.writes.read(stored_session_ids, barriers=(user_barrier(user_id),))
        session_ids.update(read.value or ())
        self._submit(Erase(EraseScope.USER, user_id))
        self.states.discard(user_id)
        self.profiles.discard(user_id)
        for session_id in session_ids:
            self.sessions.discard(session_id)
        self._tell_erased(user_id)
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

    # -- coherence across instances (samvad.coherence) --------------------------

    def add_write_tap(self, tap: Callable[[Write], None]) -> None:
        """Call ``tap`` with each write submitted here, right after it is queued.

        The write-behind goes on folding later writes into a queued one: a tap
        that keeps a write must copy it.
        """
        self._taps.append(tap)

    def unconfirmed(self, key: tuple[str, str]) -> list[Write]:
        """The writes of document ``key`` the store may not have yet: other
        instances' (heard of, perhaps never flushed: such an instance may have
        died) and this one's, oldest first."""
        return [*self.remote.writes(key), *self.writes.pending_writes(key)]

    def _erased(self, barriers: tuple[Barrier, ...]) -> bool:
        """An erase here or on another instance is pending for one of ``barriers``."""
        return self.writes.erased(barriers) or self.remote.erased(barriers)

    async def _remotely_erased(self, pending: Callable[[], list[Write]]) -> Read[Any]:
        # What the store holds is being erased by another instance: only what
        # was written since counts, as behind an erase of this instance's own.
        return Read(value=None, writes=pending(), stored=False, erased=True)

    def apply_remote(self, write: FieldsWrite | ProfileWrite) -> None:
        """Another instance made ``write``: lay it over the cached view, and over
        loads until that instance has surely flushed it."""
        # An instance announces its writes in order: one heard after its erase
        # of the same user was made after it, and counts.
        self.remote.add(write)
        if isinstance(write, ProfileWrite):
            self._adopt_committed()
            cached_profile = self.profiles.peek(write.user_id)
            if cached_profile is None:
                self.profiles.invalidate(write.user_id)  # perhaps cached as absent
                return
            view = self._profile_with(cached_profile.value, write, self._now())
            self.profiles.put(write.user_id, view, complete=cached_profile.complete)
            return
        if write.collection == STATES:
            cached_state = self.states.peek(write.doc_id)
            if cached_state is None:
                self.states.invalidate(write.doc_id)
                return
            state = cached_state.value
            doc = write.result(
                {**state.data, "updatedAt": state.updated_at, "isActive": state.is_active}
            )
            if doc is not None:
                self.states.put(
                    write.doc_id, decode_state(write.doc_id, doc), complete=cached_state.complete
                )
        elif write.collection == SESSIONS:
            cached_session = self.sessions.peek(write.doc_id)
            if cached_session is None:
                self.sessions.invalidate(write.doc_id)
                return
            doc = write.result(encode_session(cached_session.value))
            if doc is not None:
                self.sessions.put(
                    write.doc_id,
                    decode_session(write.doc_id, doc),
                    complete=cached_session.complete,
                )

    def invalidate_remote(self, collection: str, doc_id: str) -> None:
        """Another instance changed a document in a way it could not describe
        (too large to announce): read it again on next use."""
        caches: dict[str, ViewCache[str, Any]] = {
            STATES: self.states,
            PROFILES: self.profiles,
            SESSIONS: self.sessions,
        }
        cache = caches.get(collection)
        if cache is not None:
            cache.invalidate(doc_id)

    def remote_erase(self, scope: EraseScope, target_id: str) -> int:
        """Another instance is erasing a user or a session: serve nothing of it
        from here again, and drop what this instance would still write of it.

        Returns how many queued writes were dropped. Until :meth:`remote_erase_done`
        loads treat the stored documents as gone.
        """
        barrier = Erase(scope, target_id).barrier
        self.remote.erase(barrier)
        dropped = self.writes.forget(barrier)
        self._invalidate_erased(scope, target_id)
        logger.info(
            "erase of %s %s on another instance: %d writes dropped", scope.value, target_id, dropped
        )
        return dropped

    def remote_erase_done(self, scope: EraseScope, target_id: str) -> None:
        """The other instance's erase is done in the store."""
        self.remote.done(Erase(scope, target_id).barrier)
        # Anything loaded while it ran may have read what it then deleted.
        self._invalidate_erased(scope, target_id)

    def drop_caches(self) -> None:
        """Forget every cached view (what other instances did is not fully known)."""
        for cache in (self.states, self.profiles, self.sessions):
            cache.invalidate_all()
        self._tell_erased(None)

    def _invalidate_erased(self, scope: EraseScope, target_id: str) -> None:
        if scope is EraseScope.SESSION:
            self.sessions.invalidate(target_id)
            return
        self.states.invalidate(target_id)
        self.profiles.invalidate(target_id)
        for session_id, session in self.sessions.items():
            if session.user_id == target_id:
                self.sessions.invalidate(session_id)
        self._tell_erased(target_id)

    # -- records kept for a layer above (samvad.idempotency) --------------------

    def submit_record(self, write: FieldsWrite) -> None:
        """Queue (and journal) a write of a document no view here caches; it sits
        behind the barriers of its user, so an erase of the user drops it."""
        self._submit(write)

    async def read_record(self, collection: str, doc_id: str, user_id: str) -> Document | None:
        """A document of :meth:`submit_record`'s, with the unconfirmed writes laid over."""
        read = await self._read_doc(collection, doc_id, (user_barrier(user_id),))
        return self._overlay_fields(read.value, read.writes)

    def add_erase_listener(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener`` with a user id whenever that user is erased, here or on
        another instance, and with None when any user may have been (coherence lost)."""
        self._erase_listeners.append(listener)

    def _tell_erased(self, user_id: str | None) -> None:
        for listener in self._erase_listeners:
            listener(user_id)

    # -- stats -----------------------------------------------------------------

    async def counts(self) -> tuple[StoreCounts, bool]:
        """Aggregate counts and whether they come from the store (else from memory)."""
        read = await self.writes.read(self.store.counts)
        if read.value is not None:
            return read.value, True
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
