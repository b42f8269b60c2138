"""The write-behind queue: memory answers, Firestore catches up.

A caller's write lands here and returns at once. A background dispatcher
flushes writes to the store:

* **Coalescing** — one entry per document; a burst of writes to one document
  becomes one store write, at most one per ``flush_interval`` per document.
* **Order** — a document's writes are applied in the order they were made,
  never two at once; documents are flushed in order of their oldest pending
  write, and after an outage replay resumes in that order.
* **Barriers** — an erase drops the writes it covers (queued ones at once; one
  in flight is void and not retried if it fails), waits for covered writes in
  flight, and holds back later writes of the same user or session until it is
  done. The bookkeeping is :class:`samvad.barriers.Barriers`.
* **Outage** — a store that cannot be reached switches the queue to memory-only
  mode: nothing is dispatched, writes keep accumulating (bounded by
  ``max_pending`` documents and ``max_pending_bytes``), a prober pings the
  store with backoff, and the first successful ping replays everything. No
  store error ever reaches a caller.
* **Poison** — a change the store refuses for its content never holds up
  anything else. A refused write is split into its parts (each field; each
  message and preference), written part by part, and a part refused twice is
  *set aside*: logged with its document key, counted, and handed to
  ``dead_letter`` to keep; every other part lands. Erasures are not set aside
  (they are retried with backoff): an erase cannot be refused for content.
* **Shutdown** — :meth:`close` flushes what is pending within a deadline.
* **Reads** — :meth:`WriteBehind.read` reads the store consistently with the
  queue: not while an erase of what it reads is pending, again if an erase
  comes in during the read, and with the writes to lay over the answer (those
  pending before the read included, though they may be confirmed meanwhile).
* **Journal** — a write may carry the sequence number of its write-ahead
  journal record (``samvad.journal``); an entry keeps the numbers of every
  write folded into it and hands them to ``confirm`` once the store has them
  (or once an erase made them moot), so the journal can forget them.
* **Commits** — the profile each profile write committed (other instances'
  appends merged in) is kept for the layer above to take
  (:meth:`WriteBehind.take_committed_profiles`) unless an erase covers it.
  The queue calls nothing above it; ``on_flush`` only observes (metrics).
* **Durable messages** — after each profile write a durable store committed,
  the messages it carried are handed to the :data:`DurableObserver` set with
  :meth:`WriteBehind.observe_durable` (what the WebSocket ``durable`` frames
  tell clients). A document's writes commit in order, so a session's messages
  are reported in sequence order. Messages set aside as poison are reported
  too: they are in the dead-letter, and sending them again would not help.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from samvad.barriers import Barriers
from samvad.clock import Clock, SystemClock
from samvad.config import Settings
from samvad.errors import BacklogFull
from samvad.models import Message, Mode, PersistenceStatus, Profile
from samvad.stores.base import Store, StoreRejected, StoreUnavailable
from samvad.writes import Barrier, Erase, FieldsWrite, Key, ProfileWrite, Write

__all__ = [
    "CommitObserver",
    "DurableObserver",
    "FlushObserver",
    "Read",
    "WriteBehind",
    "WriteBehindConfig",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DeadLetter = Callable[[Key, Write, str], None]
"""Keeps a change the store refused for its content (document key, the change,
the reason). Called in a worker thread: it may do blocking I/O."""

Confirm = Callable[[list[int]], None]
"""Told the journal sequence numbers of writes that no longer need replaying."""

CommitObserver = Callable[[Profile], None]
"""Told each profile a profile write has just committed (on the event loop,
right after the commit, before anything else runs); no I/O."""

DurableObserver = Callable[[Sequence[Message]], None]
"""Told the messages a profile write has just committed to a durable store.

Called on the event loop after the commit; it must only take note (no I/O)."""

FlushObserver = Callable[[str, float, bool], None]
"""Called after every store write with (collection or operation, seconds, succeeded).

An observability hook (metrics): it must not act on the persistence layer."""

#: Store reads tried when erases keep coming in during them.
_READ_ATTEMPTS = 3


@dataclass(slots=True)
class _Entry:
    key: Key
    write: Write
    seq: int
    first_at: float
    due_at: float
    #: From when a wait counts as lag: at once for a write, ``touch_interval``
    #: later for a touch (meant to wait), or when a write joins a touch.
    lag_from: float = 0.0
    attempts: int = 0
    #: For an erase in flight: the mark :meth:`Barriers.erase_started` gave it.
    erase_mark: int = -1
    #: Journal sequence numbers of the writes folded into this entry.
    journal: list[int] = field(default_factory=list)
    #: Estimated memory of ``write`` (counted in ``WriteBehind.pending_bytes``).
    bytes: int = 0
    #: ``bytes`` as last counted in full, plus what exact folds added since
    #: (see ``WriteBehind._grow``).
    counted: int = 0


@dataclass(frozen=True, slots=True)
class Read(Generic[T]):
    """What :meth:`WriteBehind.read` found: the store's answer (None when it was
    not read or an erase covers it) and the unconfirmed writes to lay over it."""

    value: T | None
    writes: list[Write]
    #: The store answered, and its answer counts.
    stored: bool
    #: An erase is pending: what the store holds is gone, only ``writes`` count.
    erased: bool

    @property
    def complete(self) -> bool:
        """A view built from this read does not wait on the store any more."""
        return self.stored or self.erased


@dataclass(frozen=True, slots=True)
class WriteBehindConfig:
    """Timing and bounds of the queue (see ``samvad.config.Settings``)."""

    flush_interval: float = 1.0
    linger: float = 0.05
    touch_interval: float = 30.0
    concurrency: int = 32
    max_pending: int = 100_000
    max_pending_bytes: int = 256 * 1024 * 1024
    retry_max_backoff: float = 30.0
    probe_interval: float = 1.0
    probe_max_interval: float = 10.0
    reconnect_after_failed_probes: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> WriteBehindConfig:
        """The queue's timing and bounds as the operator configured them."""
        return cls(
            flush_interval=settings.flush_interval,
            linger=settings.flush_linger,
            touch_interval=settings.touch_interval,
            concurrency=settings.flush_concurrency,
            max_pending=settings.max_pending_documents,
            max_pending_bytes=settings.max_pending_bytes,
            retry_max_backoff=settings.retry_max_backoff,
            probe_interval=settings.probe_interval,
            probe_max_interval=settings.probe_max_interval,
        )


@dataclass(slots=True)
class _Counters:
    writes_issued: int = 0
    write_failures: int = 0
    set_aside: int = 0
    by_collection: Counter[str] = field(default_factory=Counter)


class WriteBehind:
    """Coalescing, ordered, outage-tolerant background writer for one store."""

    def __init__(
        self,
        store: Store,
        *,
        config: WriteBehindConfig | None = None,
        clock: Clock | None = None,
        on_flush: FlushObserver | None = None,
        confirm: Confirm | None = None,
        dead_letter: DeadLetter | None = None,
        on_commit: CommitObserver | None = None,
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._config = config or WriteBehindConfig()
        self._clock = clock or SystemClock()
        self._on_flush = on_flush
        self._confirm = confirm
        self._dead_letter = dead_letter
        self._on_durable: DurableObserver | None = None

        self._queued: dict[Key, _Entry] = {}
        self._inflight: dict[Key, _Entry] = {}
        #: Estimated memory of every queued and in-flight write.
        self.pending_bytes = 0
        self._heap: list[tuple[float, int, Key]] = []
        self._parked: set[Key] = set()
        self._last_flush: dict[Key, float] = {}
        self._last_prune = self._clock.monotonic()
        self._seq = itertools.count()
        self._barriers = Barriers()
        #: The newest committed profile per document not yet taken, with the
        #: barriers its write sat behind (an erase drops it). Read-only to
        #: others (emptied by :meth:`take_committed_profiles`): a caller that
        #: finds it empty skips the call, as every message does.
        self.committed: dict[Key, tuple[Profile, tuple[Barrier, ...]]] = {}
        #: Documents a change of which was set aside since the last take
        #: (:meth:`take_refused`; read-only to others, as :attr:`committed`).
        self.refused: set[Key] = set()

        #: ``memory`` while the store is unreachable (nothing is dispatched).
        #: Others only read it (a plain attribute, not a property: every
        #: message reads it).
        self.mode = Mode.FIRESTORE
        self._mode_since = self._clock.now()
        self._last_error: str | None = None
        self._counters = _Counters()
        self._urgent = 0
        self._closed = False
        #: Store writes that succeeded since the queue last left memory-only mode.
        self._ok_since_recovery = 0

        self._wake = asyncio.Event()
        self._reachable = asyncio.Event()
        self._reachable.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._runner: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        #: ``clock.monotonic()`` of the prober's next ping (memory-only mode).
        self._next_probe_at = 0.0
        self._flushes: set[asyncio.Task[None]] = set()

    # -- public API --------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatcher, after finding out whether the store answers."""
        if self._runner is not None:
            raise RuntimeError("The write-behind queue is already started.")
        self._runner = asyncio.create_task(self._run(), name="samvad-write-behind")
        try:
            await self._store.ping()
        except (StoreUnavailable, StoreRejected) as exc:
            self.report_unavailable(exc)
        else:
            if self._store.durable:
                logger.info("Firestore mode: writes go to the %s store", self._store.name)
            else:
                logger.warning("Memory-only store: data is lost when the process ends")

    def observe_durable(self, observer: DurableObserver | None) -> None:
        """Tell ``observer`` the messages each profile write commits (None: stop).

        Nothing is told with a store that is not durable (the memory store).
        """
        self._on_durable = observer if self._store.durable else None

    def admit(self, write: Write) -> None:
        """Raise :class:`BacklogFull` if :meth:`submit` would refuse ``write``.

        Erasures are always admitted. At the bound in documents a write that
        would add a document is refused; at the bound in bytes every write is
        (a write folded into a queued one still adds what it carries).
        """
        if self._closed:
            raise RuntimeError("Cannot submit a write once the write-behind queue is closed.")
        if isinstance(write, Erase):
            return
        queued = self._queued
        if self.pending_bytes >= self._config.max_pending_bytes or (
            len(queued) + len(self._inflight) >= self._config.max_pending
            and write.key not in queued
        ):
            raise BacklogFull("Too many writes are waiting for Firestore; try again shortly.")

    def submit(self, write: Write, *, journal_seq: int | None = None, replay: bool = False) -> None:
        """Queue ``write``; returns at once. Raises :class:`BacklogFull` at the bound.

        ``journal_seq`` is the write's journal record; ``replay`` (a write
        acknowledged before a restart) bypasses the bound.
        """
        key = write.key
        queued = self._queued
        entry = queued.get(key)
        if not replay and (
            entry is None or self._closed or self.pending_bytes >= self._config.max_pending_bytes
        ):
            # admit() decides; a write folded into a queued one under the
            # bytes bound always passes (two a WebSocket message, inline).
            self.admit(write)
        now = self._clock.monotonic()
        if isinstance(write, Erase):
            moot = self._submit_erase(write)
            entry = queued.get(key)
            if moot:
                # The erase deletes whatever these writes did: nothing to replay.
                self._confirmed(moot)
        if entry is not None:
            if journal_seq is not None:
                entry.journal.append(journal_seq)
            added = entry.write.absorb(write)  # type: ignore[arg-type]  # same key, same type
            if added is not None:  # _grow's exact case, inline
                self.pending_bytes += added
                entry.bytes += added
                entry.counted += added
            else:
                self._grow(entry, write, added)
            if not write.touch:
                if now < entry.lag_from:
                    entry.lag_from = now
                # A write can bring the entry's turn forward only when that is
                # later than a write of now could be due (it waits as a touch).
                if entry.due_at > now + self._config.linger:
                    due = self._due(key, now, touch=False)
                    if due < entry.due_at:
                        entry.due_at = due
                        heapq.heappush(self._heap, (due, entry.seq, key))
                        self._wake.set()
            return
        seq = next(self._seq)
        entry = _Entry(
            key=key,
            write=write,
            seq=seq,
            first_at=now,
            due_at=self._due(key, now, write.touch),
            lag_from=now + (self._config.touch_interval if write.touch else 0.0),
            journal=[] if journal_seq is None else [journal_seq],
        )
        self._resize(entry)
        self._queued[key] = entry
        self._empty.clear()
        heapq.heappush(self._heap, (entry.due_at, seq, key))
        self._wake.set()

    def _resize(self, entry: _Entry) -> None:
        """Count ``entry``'s write in full (linear in its size)."""
        size = entry.write.approx_bytes()
        self.pending_bytes += size - entry.bytes
        entry.bytes = entry.counted = size

    def _grow(self, entry: _Entry, later: Write, added: int | None) -> None:
        """Count ``later``, just folded into ``entry``, in time linear in ``later``.

        ``added``: what the fold added, when the write knows it exactly (a
        history appended to): counted as if counted in full. Otherwise folding
        may have trimmed a history or replaced fields, so adding overcounts;
        once the estimate has doubled since the last full count, count again
        (amortized constant time per write, never less than the truth).
        A touch re-sends a session's fields unchanged but for its activity
        times: folded into a write of that session, it adds nothing.
        """
        if added is not None:
            self.pending_bytes += added
            entry.bytes += added
            entry.counted += added
            return
        if later.touch and entry.counted:
            return
        size = entry.bytes + later.approx_bytes()
        if size > 2 * entry.counted:
            self._resize(entry)
            return
        self.pending_bytes += size - entry.bytes
        entry.bytes = size

    def _gone(self, entry: _Entry) -> None:
        """``entry`` left the queue for good (written, dropped or void)."""
        self.pending_bytes -= entry.bytes
        entry.bytes = 0

    def pending_writes(self, key: Key) -> list[Write]:
        """The live writes for ``key`` not yet confirmed by the store (in flight first).

        A write in flight that an erase submitted after it covers is not live:
        the erase will delete whatever it leaves behind.
        """
        writes: list[Write] = []
        inflight = self._inflight.get(key)
        if inflight is not None and not self._covered(inflight):
            writes.append(inflight.write)
        queued = self._queued.get(key)
        if queued is not None:
            writes.append(queued.write)
        return writes

    def pending_writes_where(self, predicate: Callable[[Write], bool]) -> list[Write]:
        """Every live unconfirmed write that ``predicate`` accepts, oldest first."""
        entries = [e for e in self._inflight.values() if not self._covered(e)]
        entries.extend(self._queued.values())
        entries.sort(key=lambda entry: entry.seq)
        return [entry.write for entry in entries if predicate(entry.write)]

    def _covered(self, entry: _Entry) -> bool:
        """True when an erase submitted after ``entry`` covers it (an erase covers none)."""
        return self._barriers.covers(entry.write.barriers, entry.seq)

    def erased(self, barriers: tuple[Barrier, ...]) -> bool:
        """True while an erase covering any of ``barriers`` has not completed."""
        return self._barriers.raised(barriers)

    def forget(self, barrier: Barrier) -> int:
        """Drop the queued writes and kept commits behind ``barrier``, without an
        erase of the store; returns how many writes were dropped.

        For an erase another instance made (``samvad.coherence``): it deletes
        what is in the store, and what this instance still holds of the erased
        user or session must never be written after it. A write in flight is
        left to land (it may race the other instance's erase).
        """
        dropped = 0
        for key, entry in list(self._queued.items()):
            if barrier in entry.write.barriers:
                del self._queued[key]
                self._parked.discard(key)
                self._gone(entry)
                dropped += 1
        for key, (_, barriers) in list(self.committed.items()):
            if barrier in barriers:
                del self.committed[key]
        if not self._queued and not self._inflight:
            self._empty.set()
        return dropped

    def take_refused(self) -> tuple[Key, ...]:
        """The documents a change of which the store refused and that was set
        aside since the last call: a view built with that change is wrong."""
        if not self.refused:
            return ()
        keys = tuple(self.refused)
        self.refused.clear()
        return keys

    def adopted(self, key: Key) -> None:
        """The profile just committed for ``key`` is in a view already: nothing
        for :meth:`take_committed_profiles` to hand over again."""
        self.committed.pop(key, None)

    def take_committed_profiles(self) -> tuple[Profile, ...]:
        """The profiles committed since the last call, the newest per user.

        What a profile write's transaction committed includes what other
        instances appended; a profile an erase submitted since covers is left
        out. Taking them empties the list.
        """
        if not self.committed:
            return ()
        profiles = tuple(profile for profile, _ in self.committed.values())
        self.committed.clear()
        return profiles

    async def read(
        self,
        fetch: Callable[[], Awaitable[T]],
        *,
        barriers: tuple[Barrier, ...] = (),
        pending: Callable[[], list[Write]] = list,
    ) -> Read[T]:
        """Read the store with ``fetch``, consistently with the queue.

        Not in memory-only mode, nor behind a pending erase of ``barriers``; a
        store error switches to memory-only mode and is never raised; an erase
        submitted during the read makes it read again behind the erase.
        ``pending`` lists the unconfirmed writes to lay over the answer; those
        listed before the read are kept (they may be confirmed, and leave the
        queue, while it runs: laying a write over its own result is harmless).
        """
        value: T | None = None
        stored = False
        before: list[Write] = []
        for _attempt in range(_READ_ATTEMPTS):
            epoch = self._barriers.epoch
            before = pending()
            value, stored = None, False
            if self.mode is Mode.MEMORY or self._barriers.raised(barriers):
                break
            try:
                value = await fetch()
            except (StoreUnavailable, StoreRejected) as exc:
                self.report_unavailable(exc)
                break
            stored = True
            if self._barriers.epoch == epoch:
                break
            # An erase came in during the read: read again behind it.
        if self._barriers.raised(barriers):
            # Only what was written after the erase counts.
            return Read(value=None, writes=pending(), stored=False, erased=True)
        return Read(value=value, writes=[*before, *pending()], stored=stored, erased=False)

    async def reachable(self) -> None:
        """Return once the queue is in ``firestore`` mode (at once if it is)."""
        await self._reachable.wait()

    def retry_after(self) -> float:
        """Seconds until the store may be read again: until the prober's next
        ping in memory-only mode (one probe interval if none is scheduled), 0
        while the store is in use."""
        if self.mode is Mode.FIRESTORE:
            return 0.0
        wait = self._next_probe_at - self._clock.monotonic()
        return wait if wait > 0 else self._config.probe_interval

    @property
    def pending_count(self) -> int:
        return len(self._queued) + len(self._inflight)

    def report_unavailable(self, exc: BaseException) -> None:
        """A reader saw the store fail: switch to memory-only mode (once)."""
        self._last_error = type(exc).__name__
        if self.mode is Mode.MEMORY:
            return
        self.mode = Mode.MEMORY
        self._reachable.clear()
        self._mode_since = self._clock.now()
        self._ok_since_recovery = 0
        logger.warning(
            "Firestore unavailable (%s): serving from memory, %d writes pending; probing",
            type(exc).__name__,
            self.pending_count,
        )
        if not self._closed:
            self._start_prober()

    def status(self) -> PersistenceStatus:
        now = self._clock.monotonic()
        oldest = now
        lag_start = now
        for entry in (*self._queued.values(), *self._inflight.values()):
            oldest = min(oldest, entry.first_at)
            # A touch is meant to wait ``touch_interval``: only the time past
            # that counts as lag, or a steady stream of session activity would
            # show as a 30 s backlog.
            lag_start = min(lag_start, entry.lag_from)
        return PersistenceStatus(
            mode=self.mode if self._store.durable else Mode.MEMORY,
            backend=self._store.name,
            pending_documents=self.pending_count,
            pending_in_flight=len(self._inflight),
            oldest_pending_age=max(0.0, now - oldest),
            replay_lag=max(0.0, now - lag_start),
            writes_issued=self._counters.writes_issued,
            write_failures=self._counters.write_failures,
            mode_since=self._mode_since,
            last_error=self._last_error,
            writes_set_aside=self._counters.set_aside,
            pending_bytes=self.pending_bytes,
        )

    @property
    def writes_by_collection(self) -> dict[str, int]:
        """Store writes issued so far, per collection (or erase operation)."""
        return dict(self._counters.by_collection)

    def wake(self) -> None:
        """Re-evaluate due times now (after moving a manual clock in tests)."""
        self._wake.set()

    async def flush(self) -> None:
        """Flush everything pending now, ignoring intervals, and return when nothing is left.

        In memory-only mode this waits for the store to come back; bound it
        with ``asyncio.timeout``.
        """
        self._urgent += 1
        self._reschedule_all()
        try:
            await self._empty.wait()
        finally:
            self._urgent -= 1

    async def close(self, deadline: float) -> int:
        """Flush within ``deadline`` seconds, stop, and return how many writes were left.

        Writes left over are logged by document key (never by content): they
        are lost with the process.
        """
        if self._closed:
            return self.pending_count
        self._urgent += 1
        self._reschedule_all()
        if self.mode is Mode.MEMORY:
            self._start_prober()
        try:
            async with asyncio.timeout(deadline):
                await self._empty.wait()
        except TimeoutError:
            pass
        self._closed = True
        for task in [self._runner, self._prober, *self._flushes]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in [self._runner, self._prober, *self._flushes] if t is not None),
            return_exceptions=True,
        )
        left = self.pending_count
        if left:
            keys = sorted({"/".join(key) for key in (*self._queued, *self._inflight)})
            logger.error(
                "Shutdown deadline passed with %d writes not in Firestore: %s",
                left,
                ", ".join(keys[:50]),
            )
        return left

    # -- scheduling ----------------------------------------------------------

    def _due(self, key: Key, now: float, touch: bool) -> float:
        due = now + (self._config.touch_interval if touch else self._config.linger)
        last = self._last_flush.get(key)
        if last is not None:
            due = max(due, last + self._config.flush_interval)
        return due

    def _submit_erase(self, erase: Erase) -> list[int]:
        """Drop the queued writes and commits ``erase`` covers and mark the point
        in the order before which every write it covers is void (also those in
        flight). Returns the journal numbers of the writes dropped."""
        barrier = erase.barrier
        dropped: list[int] = []
        for key, entry in list(self._queued.items()):
            if barrier in entry.write.barriers:
                del self._queued[key]
                self._parked.discard(key)
                self._gone(entry)
                dropped.extend(entry.journal)
        for key, (_, barriers) in list(self.committed.items()):
            if barrier in barriers:
                del self.committed[key]
        self._barriers.erase_submitted(barrier, next(self._seq))
        return dropped

    def _confirmed(self, seqs: list[int]) -> None:
        if seqs and self._confirm is not None:
            try:
                self._confirm(seqs)
            except Exception:
                # Only the journal's space is at stake: it replays them again.
                logger.exception("confirming journal records failed")

    def _reschedule_all(self) -> None:
        """Make every queued write due now, in submission order."""
        now = self._clock.monotonic()
        for entry in self._queued.values():
            entry.due_at = min(entry.due_at, now)
        self._heap = [(entry.due_at, entry.seq, key) for key, entry in self._queued.items()]
        heapq.heapify(self._heap)
        self._parked.clear()
        self._wake.set()

    def _blocked(self, entry: _Entry) -> bool:
        if entry.key in self._inflight:
            return True
        write = entry.write
        if isinstance(write, Erase):
            return self._barriers.erase_must_wait(write.barrier)
        return self._barriers.raised(write.barriers)

    def _dispatch_ready(self) -> float | None:
        """Launch due writes; return seconds until the next one is due (None: nothing)."""
        if self.mode is Mode.MEMORY:
            return None
        now = self._clock.monotonic()
        heap = self._heap
        while heap and len(self._inflight) < self._config.concurrency:
            due, seq, key = heap[0]
            entry = self._queued.get(key)
            if entry is None or entry.seq != seq or entry.due_at != due:
                heapq.heappop(heap)
                continue
            if due > now and not self._urgent:
                return due - now
            heapq.heappop(heap)
            if self._blocked(entry):
                self._parked.add(key)
                continue
            self._launch(entry)
        return None

    def _launch(self, entry: _Entry) -> None:
        write = entry.write
        if isinstance(write, Erase):
            entry.erase_mark = self._barriers.erase_started(write.barrier)
        else:
            self._barriers.writes_started(write.barriers)
        del self._queued[entry.key]
        self._inflight[entry.key] = entry
        task = asyncio.create_task(self._flush_one(entry), name="samvad-flush")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def _unpark(self) -> None:
        for key in self._parked:
            entry = self._queued.get(key)
            if entry is not None:
                heapq.heappush(self._heap, (entry.due_at, entry.seq, key))
        self._parked.clear()

    async def _run(self) -> None:
        while True:
            try:
                delay = self._dispatch_ready()
                self._wake.clear()
                if delay is None:
                    await self._wake.wait()
                else:
                    try:
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception:
                # The dispatcher must outlive any bug in one pass, or every
                # later write would wait forever.
                logger.exception("write-behind dispatcher pass failed; continuing")
                await asyncio.sleep(0.1)

    # -- flushing ----------------------------------------------------------

    async def _flush_one(self, entry: _Entry) -> None:
        write = entry.write
        started = self._clock.monotonic()
        label = write.key[0]
        try:
            try:
                result = await self._apply(write)
            except StoreRejected as exc:
                if isinstance(write, Erase):
                    raise
                self._observe(label, started, ok=False)
                self._last_error = type(exc).__name__
                started = self._clock.monotonic()
                result = await self._isolate(entry)
        except asyncio.CancelledError:
            self._requeue(entry, transient=True, cancelled=True)
            raise
        except StoreUnavailable as exc:
            self._observe(label, started, ok=False)
            self._requeue(entry, transient=True, exc=exc)
        except StoreRejected as exc:
            self._observe(label, started, ok=False)
            self._requeue(entry, transient=False, exc=exc)
        except Exception as exc:
            logger.exception("write to %s failed unexpectedly", "/".join(write.key))
            self._observe(label, started, ok=False)
            self._requeue(entry, transient=False, exc=exc)
        else:
            self._observe(label, started, ok=True)
            if self.mode is Mode.FIRESTORE:
                self._ok_since_recovery += 1
            self._done(entry)
            if isinstance(result, Profile) and not self._barriers.raised(write.barriers):
                self.committed[write.key] = (result, write.barriers)
                if self._on_commit is not None:
                    try:
                        self._on_commit(result)
                    except Exception:
                        logger.exception("the commit observer failed")
            if (
                isinstance(write, ProfileWrite)
                and write.append
                and self._on_durable is not None
                and not self._barriers.raised(write.barriers)
            ):
                try:
                    self._on_durable(write.append)
                except Exception:
                    logger.exception("the durable-messages observer failed")
        finally:
            self._after_flush()

    async def _isolate(self, entry: _Entry) -> Profile | None:
        """The store refused ``entry``'s write: write its parts one by one, set
        aside those refused twice, and return the last profile committed.

        Should the store become unreachable meanwhile, the entry keeps the
        parts not yet written and :class:`StoreUnavailable` propagates.
        """
        parts = _split(entry.write)
        result: Profile | None = None
        while parts:
            part = parts[0]
            try:
                try:
                    outcome = await self._apply(part)
                except StoreRejected:
                    # Once more on its own: a refusal that repeats is about the content.
                    outcome = await self._apply(part)
            except StoreRejected as exc:
                await self._set_aside(entry.key, part, exc)
                outcome = None
            except StoreUnavailable:
                entry.write = _joined(parts)
                raise
            if isinstance(outcome, Profile):
                result = outcome
            parts.pop(0)
        return result

    async def _set_aside(self, key: Key, write: Write, exc: StoreRejected) -> None:
        self._counters.set_aside += 1
        self.refused.add(key)
        logger.error(
            "Firestore refused a change to %s for its content (%s): set aside in the "
            "dead-letter; the document's other changes go on",
            "/".join(key),
            type(exc.__cause__ or exc).__name__,
        )
        if self._dead_letter is None:
            return
        reason = f"{type(exc.__cause__ or exc).__name__}: {exc.__cause__ or exc}"
        try:
            await asyncio.to_thread(self._dead_letter, key, write, reason)
        except Exception:
            logger.exception(
                "keeping the dead-letter record of a change to %s failed", "/".join(key)
            )

    async def _apply(self, write: Write) -> Profile | None:
        if isinstance(write, FieldsWrite):
            await self._store.write_fields(write)
            return None
        if isinstance(write, ProfileWrite):
            return await self._store.write_profile(write, now=self._clock.now())
        await self._store.erase(write)
        return None

    def _observe(self, label: str, started: float, *, ok: bool) -> None:
        if ok:
            self._counters.writes_issued += 1
            self._counters.by_collection[label] += 1
        else:
            self._counters.write_failures += 1
        if self._on_flush is not None:
            self._on_flush(label, self._clock.monotonic() - started, ok)

    def _release(self, entry: _Entry) -> None:
        del self._inflight[entry.key]
        self._barriers.writes_ended(entry.write.barriers)

    def _done(self, entry: _Entry) -> None:
        self._release(entry)
        self._gone(entry)
        now = self._clock.monotonic()
        self._last_flush[entry.key] = now
        queued = self._queued.get(entry.key)
        if queued is not None and not isinstance(queued.write, Erase):
            # Submitted while this write was in flight, its due time was
            # reckoned from the flush before: keep one interval from this one,
            # so a document is never written twice within the interval.
            due = now + self._config.flush_interval
            if queued.due_at < due:
                queued.due_at = due
                heapq.heappush(self._heap, (due, queued.seq, queued.key))
        if now - self._last_prune > max(self._config.flush_interval, 1.0):
            # Only flushes within the last interval still space writes out.
            self._last_prune = now
            horizon = now - self._config.flush_interval
            self._last_flush = {k: t for k, t in self._last_flush.items() if t > horizon}
        write = entry.write
        if isinstance(write, Erase):
            self._barriers.erase_done(write.barrier, entry.erase_mark)
        self._confirmed(entry.journal)

    def _requeue(
        self,
        entry: _Entry,
        *,
        transient: bool,
        exc: BaseException | None = None,
        cancelled: bool = False,
    ) -> None:
        self._release(entry)
        key, write = entry.key, entry.write
        if self._covered(entry):
            # Erased while in flight: the erase waited for this write, which
            # failed; the write is simply gone, as the erase asked.
            self._gone(entry)
            self._confirmed(entry.journal)
            return
        if exc is not None:
            self._last_error = type(exc).__name__
        newer = self._queued.pop(key, None)
        if newer is not None:
            write.absorb(newer.write)  # type: ignore[arg-type]  # same key, same type
            entry.journal.extend(newer.journal)
            self._gone(newer)
        self._resize(entry)
        failed_before = entry.attempts > 0
        entry.attempts += 1
        now = self._clock.monotonic()
        # A write that fails again while other writes have succeeded since the
        # store came back is this document's trouble (say, a lock left behind by
        # a transaction the outage cut off), not an outage: back it off alone
        # rather than stop every write and replay the whole queue for it.
        isolated = transient and not cancelled and failed_before and self._ok_since_recovery > 0
        if (transient or cancelled) and not isolated:
            entry.due_at = now
        else:
            # Half to all of the doubling delay, at random, as the probe's: two
            # instances whose transactions on one document abort each other
            # would otherwise retry in step, and abort each other again.
            backoff = min(self._config.retry_max_backoff, 0.5 * 2 ** min(entry.attempts, 16))
            backoff *= random.uniform(0.5, 1.0)
            entry.due_at = now + backoff
            logger.warning(
                "%s the write to %s (attempt %d, %s); retrying in %.1fs",
                "Firestore answers other writes but failed again on"
                if isolated
                else "Firestore rejected",
                "/".join(key),
                entry.attempts,
                type(exc).__name__ if exc else "cancelled",
                backoff,
            )
        # It keeps its sequence number, so the heap puts it back at its
        # original place in the submission order.
        self._queued[key] = entry
        heapq.heappush(self._heap, (entry.due_at, entry.seq, key))
        if transient and not cancelled and exc is not None and not isolated:
            self.report_unavailable(exc)

    def _after_flush(self) -> None:
        self._unpark()
        if not self._queued and not self._inflight:
            self._empty.set()
        self._wake.set()

    # -- outage ------------------------------------------------------------

    def _start_prober(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe(), name="samvad-firestore-probe")

    async def _probe(self) -> None:
        delay = self._config.probe_interval
        failures = 0
        while self.mode is Mode.MEMORY:
            # Half to all of the delay, at random: instances that lost the
            # store together (two contending for one document's lock, whose
            # transactions abort each other) would otherwise probe, come
            # back and replay in step, and clash again, for as long as they run.
            wait = delay * random.uniform(0.5, 1.0)
            self._next_probe_at = self._clock.monotonic() + wait
            await asyncio.sleep(wait)
            try:
                await self._store.ping()
            except (StoreUnavailable, StoreRejected) as exc:
                failures += 1
                self._last_error = type(exc).__name__
                delay = min(delay * 2, self._config.probe_max_interval)
                if failures % self._config.reconnect_after_failed_probes == 0:
                    try:
                        await self._store.reconnect()
                    except Exception:
                        logger.warning("reconnecting to Firestore failed", exc_info=True)
            except Exception:
                logger.exception("Firestore probe failed unexpectedly")
                delay = min(delay * 2, self._config.probe_max_interval)
            else:
                self._recovered()

    def _recovered(self) -> None:
        outage = (self._clock.now() - self._mode_since).total_seconds()
        self.mode = Mode.FIRESTORE
        self._reachable.set()
        self._mode_since = self._clock.now()
        logger.warning(
            "Firestore reachable again after %.1fs: replaying %d pending writes in order",
            outage,
            self.pending_count,
        )
        self._reschedule_all()


def _split(write: Write) -> list[Write]:
    """``write`` as parts that each change one field, message or preference.

    Applied in any order the parts make the same document as ``write``: fields
    are set whole and independently, messages merged by id, preferences by key.
    """
    if isinstance(write, FieldsWrite) and len(write.fields) > 1:
        return [
            FieldsWrite(
                collection=write.collection,
                doc_id=write.doc_id,
                user_id=write.user_id,
                fields={name: value},
                session_id=write.session_id,
                defaults=dict(write.defaults),
                touch=write.touch,
                must_exist=write.must_exist,
                merge=(name,) if name in write.merge else (),
            )
            for name, value in write.fields.items()
        ]
    if isinstance(write, ProfileWrite) and len(write.append) + len(write.preferences) > 1:
        parts: list[Write] = [
            ProfileWrite(user_id=write.user_id, append=[message], cap=write.cap)
            for message in write.append
        ]
        parts.extend(
            ProfileWrite(user_id=write.user_id, preferences={name: value}, cap=write.cap)
            for name, value in write.preferences.items()
        )
        return parts
    return [write]


def _joined(parts: list[Write]) -> Write:
    """The parts of a write not yet written, as one write again."""
    joined = parts[0]
    for part in parts[1:]:
        joined.absorb(part)  # type: ignore[arg-type]  # parts of one write: same type
    return joined
