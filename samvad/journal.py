"""The write-ahead journal: a write is on local disk before it is acknowledged.

The write-behind queue keeps acknowledged writes in memory until Firestore has
them; a ``kill -9`` would lose them. The journal closes that gap:

* **Append** — :meth:`Journal.append` serialises a write (msgpack) on the
  caller's thread, gives it the next sequence number and returns a future.
  A dedicated writer thread takes every record queued since its last pass,
  writes them with one ``write`` and makes them durable with one ``fsync``
  (*group commit*), then resolves all their futures at once. The caller
  acknowledges only after its future resolves; the event loop never waits on
  the disk.
* **Records** — ``magic | crc32 | length | seq | flags | payload``. The CRC
  covers everything after it. The last record of each batch carries the
  ``BATCH_END`` flag: only complete batches can have been acknowledged.
* **Recovery** — :meth:`Journal.open` scans the segment files. Records not yet
  confirmed come back in their original order (:attr:`Journal.recovered`). A
  torn tail — an incomplete last batch, however it was cut — is truncated: none
  of it was acknowledged. Damage anywhere else, or damage followed by a
  complete batch, raises :class:`JournalCorrupt` naming the file and offset:
  acknowledged writes are at stake and an operator must decide.
* **Confirmation** — :meth:`Journal.confirm` marks records Firestore has.
  The journal keeps "confirmed through N" (every record ``<= N`` confirmed),
  writes it to the ``confirmed`` file from time to time and deletes segment
  files whose records are all confirmed. A stale ``confirmed`` file means that
  some confirmed records are replayed again, in order. For this instance that
  changes nothing: every write is idempotent (fields are set, messages merged
  by id, erasures repeatable) and its later writes are replayed after them.
  Another instance's change made in between to the same fields, or its
  erasure, can be undone by such a replay: hence a checkpoint within
  ``checkpoint_interval`` (50 ms) of each confirmation, not less often.
* **Bound** — live segments plus queued records never exceed ``max_bytes``.
  At the bound a new write is refused with :class:`~samvad.errors.BacklogFull`
  (HTTP 503) *before* it is acknowledged; nothing journalled is ever dropped.
  Erasures may use a reserve above the bound, because they are what lets a
  user's data go.
* **Failure** — a failed ``write`` or ``fsync`` fails that batch with
  :class:`JournalUnavailable` (503) and every later append too: after a failed
  ``fsync`` Linux may have dropped the dirty pages, so nothing more written to
  that file can be trusted. A restart recovers what is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from samvad.clock import Clock, SystemClock
from samvad.errors import BacklogFull, BadRequest, SamvadError
from samvad.models import Message
from samvad.writes import Erase, EraseScope, FieldsWrite, ProfileWrite, Write

__all__ = [
    "BATCH_END",
    "CONFIRMED_FILE",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "SEGMENT_SUFFIX",
    "Journal",
    "JournalConfig",
    "JournalCorrupt",
    "JournalInUse",
    "JournalStats",
    "JournalUnavailable",
    "Recovered",
    "decode_write",
    "encode_write",
    "frame",
]

logger = logging.getLogger(__name__)

MAGIC = b"\xd5SJ1"
"""First four bytes of every record."""

BATCH_END = 0x01
"""Flag of the last record of a group commit."""

# magic, crc32 (of everything after it), payload length, sequence number, flags
_HEADER = struct.Struct("<4sIIQB")
_CRC_COVERED = struct.Struct("<IQB")
HEADER_SIZE = _HEADER.size
MAX_RECORD_BYTES = 16 * 1024 * 1024
"""No record is larger (a request body is bounded far below this)."""

SEGMENT_SUFFIX = ".wal"
CONFIRMED_FILE = "confirmed"


class JournalCorrupt(Exception):
    """A journal file is damaged where acknowledged writes live.

    The message names the file and the byte offset of the first damaged record.
    """

    def __init__(self, path: Path, offset: int, problem: str) -> None:
        super().__init__(
            f"write-ahead journal {path} is damaged at byte offset {offset}: {problem}. "
            "Records after that point may hold acknowledged writes; move the file aside "
            "to start without them, or restore it from a backup"
        )
        self.path = path
        self.offset = offset


class JournalInUse(Exception):
    """Another process has the journal directory open."""


class JournalUnavailable(SamvadError):
    """The journal could not write to its disk; writes are refused until a restart."""

    status_code = 503
    close_code = 1013
    code = "journal_unavailable"


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """Bounds of the journal (see ``samvad.config.Settings``)."""

    #: Live journal bytes at most; beyond it writes are refused (erasures
    #: may use ``erase_reserve`` more).
    max_bytes: int = 256 * 1024 * 1024
    #: A segment file is closed and a new one begun once it is this large.
    segment_bytes: int = 8 * 1024 * 1024
    #: Above ``max_bytes``, room kept for erasures.
    erase_reserve: int = 1024 * 1024
    #: Records per group commit at most, so one fsync stays small.
    max_batch_records: int = 2048
    #: Seconds between writes of the ``confirmed`` file (0: whenever it moves).
    #: What a process crash replays although Firestore has it: keep it short
    #: (a write and a rename off the event loop, 20 a second at most).
    checkpoint_interval: float = 0.05

    def __post_init__(self) -> None:
        if self.segment_bytes < HEADER_SIZE or self.max_bytes < HEADER_SIZE:
            raise ValueError("Journal bounds must hold at least one record header.")
        if self.max_batch_records < 1:
            raise ValueError("A journal batch must hold at least one record.")


@dataclass(frozen=True, slots=True)
class Recovered:
    """An unconfirmed write found on disk at start, with its sequence number."""

    seq: int
    write: Write


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counters for ``/metrics``, ``/healthz`` and the benchmarks."""

    records_appended: int
    bytes_appended: int
    batches: int
    fsyncs: int
    live_bytes: int
    segments: int
    confirmed_through: int
    unconfirmed: int


# -- encoding -----------------------------------------------------------------


class _FieldsRecord(msgspec.Struct, tag="f", array_like=True):
    collection: str
    doc_id: str
    user_id: str
    fields: dict[str, Any]
    session_id: str | None
    defaults: dict[str, Any]
    touch: bool
    # Last, with defaults: a record journalled before they were kept reads as
    # what such a write was taken for then.
    must_exist: bool = False
    merge: tuple[str, ...] = ()


class _ProfileRecord(msgspec.Struct, tag="p", array_like=True):
    user_id: str
    append: list[Message]
    preferences: dict[str, Any]
    cap: int


class _EraseRecord(msgspec.Struct, tag="e", array_like=True):
    scope: EraseScope
    target_id: str


_Record = _FieldsRecord | _ProfileRecord | _EraseRecord
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Record)


def encode_write(write: Write) -> bytes:
    """``write`` as msgpack; datetimes become msgpack timestamps, so nothing is ambiguous.

    Raises :class:`~samvad.errors.BadRequest` for a value msgpack cannot hold
    (an integer beyond 64 bits, a string with a lone surrogate), which
    Firestore would refuse too.
    """
    record: _Record
    if isinstance(write, FieldsWrite):
        record = _FieldsRecord(
            write.collection,
            write.doc_id,
            write.user_id,
            write.fields,
            write.session_id,
            write.defaults,
            write.touch,
            write.must_exist,
            write.merge,
        )
    elif isinstance(write, ProfileWrite):
        record = _ProfileRecord(write.user_id, write.append, write.preferences, write.cap)
    else:
        record = _EraseRecord(write.scope, write.target_id)
    try:
        return _encoder.encode(record)
    except (OverflowError, TypeError, UnicodeEncodeError) as exc:
        # Never echo the value (it may be content): name the kind of problem.
        raise BadRequest(f"a value cannot be stored ({type(exc).__name__})") from exc


def decode_write(payload: bytes) -> Write:
    """The write :func:`encode_write` made ``payload`` from (fresh, mutable objects)."""
    record = _decoder.decode(payload)
    if isinstance(record, _FieldsRecord):
        return FieldsWrite(
            collection=record.collection,
            doc_id=record.doc_id,
            user_id=record.user_id,
            fields=record.fields,
            session_id=record.session_id,
            defaults=record.defaults,
            touch=record.touch,
            must_exist=record.must_exist,
            merge=record.merge,
        )
    if isinstance(record, _ProfileRecord):
        return ProfileWrite(
            user_id=record.user_id,
            append=record.append,
            preferences=record.preferences,
            cap=record.cap,
        )
    return Erase(record.scope, record.target_id)


def frame(seq: int, payload: bytes, flags: int = 0) -> bytes:
    """One record as it is stored: header and payload."""
    covered = _CRC_COVERED.pack(len(payload), seq, flags)
    crc = zlib.crc32(payload, zlib.crc32(covered))
    return _HEADER.pack(MAGIC, crc, len(payload), seq, flags) + payload


def _with_flags(record: bytes, flags: int) -> bytes:
    """``record`` re-framed with ``flags`` (the batch end is known only when batching)."""
    _magic, _crc, length, seq, _old = _HEADER.unpack_from(record)
    return frame(seq, record[HEADER_SIZE : HEADER_SIZE + length], flags)


# -- reading segment files ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parsed:
    offset: int
    seq: int
    flags: int
    payload: bytes


def _parse_at(data: bytes, pos: int) -> _Parsed | str:
    """The record at ``pos``, or why there is none."""
    if len(data) - pos < HEADER_SIZE:
        return "incomplete record header"
    magic, crc, length, seq, flags = _HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return "no record starts here"
    if length > MAX_RECORD_BYTES:
        return f"record length {length} exceeds {MAX_RECORD_BYTES}"
    end = pos + HEADER_SIZE + length
    if end > len(data):
        return "record extends past the end of the file"
    payload = data[pos + HEADER_SIZE : end]
    if zlib.crc32(payload, zlib.crc32(_CRC_COVERED.pack(length, seq, flags))) != crc:
        return "checksum mismatch"
    return _Parsed(pos, seq, flags, payload)


def _read_segment(path: Path, *, last: bool) -> tuple[list[_Parsed], int | None]:
    """The complete batches of one segment, and where to truncate a torn tail (or None)."""
    data = path.read_bytes()
    records: list[_Parsed] = []
    complete = 0  # records in complete batches
    good_end = 0  # offset just after the last complete batch
    pos = 0
    damage: tuple[int, str] | None = None
    while pos < len(data):
        parsed = _parse_at(data, pos)
        if isinstance(parsed, str):
            damage = (pos, parsed)
            break
        if records and parsed.seq <= records[-1].seq:
            damage = (pos, f"sequence number {parsed.seq} after {records[-1].seq}")
            break
        records.append(parsed)
        pos += HEADER_SIZE + len(parsed.payload)
        if parsed.flags & BATCH_END:
            complete, good_end = len(records), pos
    if damage is None and complete == len(records):
        return records, None
    where, problem = damage if damage is not None else (good_end, "incomplete last batch")
    if not last:
        # Segments are closed only after a complete, fsynced batch.
        raise JournalCorrupt(path, where, problem)
    if damage is not None and _complete_batch_after(data, damage[0]):
        raise JournalCorrupt(path, damage[0], problem + ", and a complete batch follows")
    return records[:complete], good_end


def _complete_batch_after(data: bytes, pos: int) -> bool:
    """Whether a valid batch-end record starts anywhere after ``pos``."""
    start = data.find(MAGIC, pos + 1)
    while start != -1:
        parsed = _parse_at(data, start)
        if isinstance(parsed, _Parsed) and parsed.flags & BATCH_END:
            return True
        start = data.find(MAGIC, start + 1)
    return False


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def _fsync_dir(directory: Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    last_seq: int
    size: int


@dataclass(slots=True)
class _Pending:
    seq: int
    record: bytes
    erase: bool
    future: asyncio.Future[int]


@dataclass(slots=True)
class _Counters:
    records: int = 0
    bytes: int = 0
    batches: int = 0
    fsyncs: int = 0


@dataclass(slots=True)
class _State:
    """What the writer thread and the loop share; guarded by ``Journal._lock``."""

    queue: list[_Pending] = field(default_factory=list)
    live_bytes: int = 0
    stopping: bool = False
    #: Callers of :meth:`Journal.checkpoint` waiting for the writer.
    checkpoints: list[asyncio.Future[None]] = field(default_factory=list)
    failed: BaseException | None = None
    confirmed_through: int = 0


class Journal:
    """A write-ahead journal in one directory; build it with :meth:`open`."""

    def __init__(
        self,
        directory: Path,
        *,
        lock: int,
        config: JournalConfig,
        clock: Clock,
        fsync: Callable[[int], None],
        segments: list[_Segment],
        recovered: list[Recovered],
        confirmed_through: int,
        next_seq: int,
    ) -> None:
        # Private: use Journal.open(), which reads the directory.
        self.directory = directory
        self._lock_fd: int | None = lock
        self._config = config
        self._clock = clock
        self._fsync = fsync
        self._segments = segments  # sealed segments, oldest first; the writer's
        self._active: _Segment | None = None
        self._fd: int | None = None
        self._next_seq = next_seq
        #: Unconfirmed writes found on disk, oldest first: replay them, then confirm.
        self.recovered: tuple[Recovered, ...] = tuple(recovered)
        # Unconfirmed sequence numbers in order, and those confirmed out of order.
        self._outstanding: deque[int] = deque(r.seq for r in recovered)
        self._confirmed_early: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._state = _State(
            live_bytes=sum(s.size for s in segments),
            confirmed_through=confirmed_through,
        )
        self._checkpointed = confirmed_through
        self._last_checkpoint = clock.monotonic()
        self._counters = _Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last_future: asyncio.Future[int] | None = None
        #: Ident of the writer thread (tests check that the disk is written off the loop).
        self.writer_thread_id: int | None = None

    # -- opening ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        config: JournalConfig | None = None,
        clock: Clock | None = None,
        fsync: Callable[[int], None] = os.fsync,
    ) -> Journal:
        """Open (or create) the journal in ``directory`` and recover what it holds.

        Blocking file I/O: call it through ``asyncio.to_thread`` from a loop.
        Truncates a torn tail; raises :class:`JournalCorrupt` for damage that
        may hide acknowledged writes.
        """
        config = config or JournalConfig()
        clock = clock or SystemClock()
        directory.mkdir(parents=True, exist_ok=True)
        lock = _lock(directory)
        try:
            return cls._recover(directory, config, clock, fsync, lock)
        except BaseException:
            os.close(lock)
            raise

    @classmethod
    def _recover(
        cls,
        directory: Path,
        config: JournalConfig,
        clock: Clock,
        fsync: Callable[[int], None],
        lock: int,
    ) -> Journal:
        (directory / (CONFIRMED_FILE + ".tmp")).unlink(missing_ok=True)
        confirmed = _read_checkpoint(directory / CONFIRMED_FILE)
        paths = sorted(directory.glob("*" + SEGMENT_SUFFIX))
        segments: list[_Segment] = []
        recovered: list[Recovered] = []
        last_seq = confirmed
        previous: int | None = None
        for index, path in enumerate(paths):
            records, truncate_at = _read_segment(path, last=index == len(paths) - 1)
            if truncate_at is not None:
                logger.warning(
                    "journal %s: discarding a torn, unacknowledged tail at byte offset %d "
                    "(%d bytes)",
                    path.name,
                    truncate_at,
                    path.stat().st_size - truncate_at,
                )
                with path.open("r+b") as handle:
                    handle.truncate(truncate_at)
                    handle.flush()
                    fsync(handle.fileno())
            if records and previous is not None and records[0].seq <= previous:
                raise JournalCorrupt(
                    path, 0, f"sequence number {records[0].seq} repeats an earlier segment's"
                )
            if records:
                previous = records[-1].seq
            for parsed in records:
                if parsed.seq > confirmed:
                    try:
                        write = decode_write(parsed.payload)
                    except (msgspec.DecodeError, ValueError) as exc:
                        raise JournalCorrupt(
                            path, parsed.offset, f"undecodable record: {exc}"
                        ) from exc
                    recovered.append(Recovered(parsed.seq, write))
            if not records:
                path.unlink()
                continue
            last_seq = max(last_seq, records[-1].seq)
            segment = _Segment(path, records[0].seq, records[-1].seq, path.stat().st_size)
            if segment.last_seq <= confirmed:
                path.unlink()
            else:
                segments.append(segment)
        _fsync_dir(directory, fsync)
        if recovered:
            logger.warning(
                "journal: %d writes not confirmed by Firestore before the last stop; replaying",
                len(recovered),
            )
        return cls(
            directory,
            lock=lock,
            config=config,
            clock=clock,
            fsync=fsync,
            segments=segments,
            recovered=recovered,
            confirmed_through=confirmed,
            next_seq=last_seq + 1,
        )

    # -- running ---------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread; futures resolve on the running event loop."""
        if self._thread is not None:
            raise RuntimeError("The journal is already started.")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="samvad-journal", daemon=True)
        self._thread.start()

    def append(self, write: Write) -> asyncio.Future[int]:
        """Journal ``write``; the future resolves to its sequence number once it is on disk.

        Serialises ``write`` now (later changes to the object are not
        journalled). Raises :class:`~samvad.errors.BacklogFull` at the bound
        and :class:`JournalUnavailable` after a disk failure, before anything
        is queued.
        """
        if self._loop is None:
            raise RuntimeError("Cannot append to a journal that is not started.")
        payload = encode_write(write)
        size = HEADER_SIZE + len(payload)
        if size > MAX_RECORD_BYTES:
            raise BadRequest("a write is too large to journal")
        erase = isinstance(write, Erase)
        limit = self._config.max_bytes + (self._config.erase_reserve if erase else 0)
        future: asyncio.Future[int] = self._loop.create_future()
        with self._lock:
            state = self._state
            if state.failed is not None:
                raise JournalUnavailable("The write-ahead journal cannot write to its disk.")
            if state.stopping:
                raise RuntimeError("Cannot append to a journal that is closing.")
            if state.live_bytes + size > limit:
                raise BacklogFull(
                    "Too many writes are waiting for Firestore (journal full); try again shortly."
                )
            seq = self._next_seq
            self._next_seq += 1
            state.live_bytes += size
            state.queue.append(_Pending(seq, frame(seq, payload), erase, future))
            self._outstanding.append(seq)
            self._wake.notify()
        self._last_future = future
        return future

    @property
    def last_appended(self) -> int:
        """The sequence number of the newest record (0 before the first)."""
        return self._next_seq - 1

    async def sync(self) -> None:
        """Return once every record appended so far is on disk.

        Raises :class:`JournalUnavailable` if one of them could not be written.
        Records become durable in order, so waiting for the newest is enough.
        """
        future = self._last_future
        if future is None:
            return
        if not future.done():
            await asyncio.shield(future)
        elif not future.cancelled() and future.exception() is not None:
            raise JournalUnavailable("The write-ahead journal cannot write to its disk.")

    async def synced(self, record: asyncio.Future[int]) -> None:
        """Return once ``record`` (a future :meth:`append` returned) is on disk,
        and every record before it.

        Raises :class:`JournalUnavailable` if it could not be written.
        """
        if not record.done():
            await asyncio.shield(record)
        elif not record.cancelled() and record.exception() is not None:
            raise JournalUnavailable("The write-ahead journal cannot write to its disk.")

    def confirm(self, seqs: Iterable[int]) -> None:
        """Mark records Firestore has; their space is freed once all before them are too."""
        outstanding, early = self._outstanding, self._confirmed_early
        if not outstanding:
            return
        first = outstanding[0]
        early.update(seq for seq in seqs if seq >= first)
        moved = False
        while outstanding and outstanding[0] in early:
            early.discard(outstanding.popleft())
            moved = True
        if moved:
            through = outstanding[0] - 1 if outstanding else self._next_seq - 1
            with self._lock:
                self._state.confirmed_through = through
                self._wake.notify()

    @property
    def confirmed_through(self) -> int:
        """Every record with a sequence number up to this one is confirmed."""
        return self._state.confirmed_through

    def stats(self) -> JournalStats:
        with self._lock:
            return JournalStats(
                records_appended=self._counters.records,
                bytes_appended=self._counters.bytes,
                batches=self._counters.batches,
                fsyncs=self._counters.fsyncs,
                live_bytes=self._state.live_bytes,
                segments=len(self._segments) + (self._active is not None),
                confirmed_through=self._state.confirmed_through,
                unconfirmed=len(self._outstanding),
            )

    async def checkpoint(self) -> None:
        """Record the confirmations and delete fully confirmed segments now."""
        if self._loop is None or self._thread is None:
            raise RuntimeError("Cannot checkpoint a journal that is not running.")
        future: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            self._state.checkpoints.append(future)
            self._wake.notify()
        await future

    async def close(self) -> None:
        """Write what is queued, record the confirmations, stop the thread. Idempotent."""
        thread = self._thread
        with self._lock:
            self._state.stopping = True
            self._wake.notify()
        if thread is not None:
            await asyncio.to_thread(thread.join)
            self._thread = None
        else:
            self._close_files()

    # -- the writer thread --------------------------------------------------------

    def _run(self) -> None:
        self.writer_thread_id = threading.get_ident()
        try:
            while True:
                with self._lock:
                    state = self._state
                    while not (
                        state.queue or state.stopping or state.checkpoints or self._checkpoint_due()
                    ):
                        if state.confirmed_through > self._checkpointed:
                            # Confirmations moved; the checkpoint is due later.
                            self._wake.wait(timeout=max(self._config.checkpoint_interval, 0.01))
                        else:
                            self._wake.wait()
                    batch = state.queue[: self._config.max_batch_records]
                    del state.queue[: len(batch)]
                    stopping = state.stopping and not state.queue
                    failed = state.failed
                    checkpoints, state.checkpoints = state.checkpoints, []
                if batch and failed is None:
                    self._commit(batch)
                elif batch:
                    self._settle(batch, failed)
                if stopping or checkpoints or self._checkpoint_due():
                    self._housekeep(seal=bool(stopping or checkpoints))
                if checkpoints:
                    self._call_soon(_release, checkpoints)
                if stopping:
                    return
        except BaseException as exc:
            logger.exception("the journal's writer thread failed")
            with self._lock:
                self._state.failed = self._state.failed or exc
                queue, self._state.queue = self._state.queue, []
                checkpoints, self._state.checkpoints = self._state.checkpoints, []
            self._settle(queue, exc)
            self._call_soon(_release, checkpoints)
        finally:
            self._close_files()

    def _checkpoint_due(self) -> bool:
        return (
            self._state.confirmed_through > self._checkpointed
            and self._clock.monotonic() - self._last_checkpoint >= self._config.checkpoint_interval
        )

    def _commit(self, batch: list[_Pending]) -> None:
        batch[-1].record = _with_flags(batch[-1].record, BATCH_END)
        data = b"".join(p.record for p in batch)
        try:
            if self._active is None:
                self._open_segment(batch[0].seq)
            assert self._active is not None and self._fd is not None
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._fsync(self._fd)
        except OSError as exc:
            logger.error(
                "journal: writing %d records failed (%s); refusing writes until a restart",
                len(batch),
                type(exc).__name__,
            )
            with self._lock:
                self._state.failed = exc
                # What this batch reserved stays counted: the file's state is unknown.
            self._settle(batch, exc)
            return
        self._active.last_seq = batch[-1].seq
        self._active.size += len(data)
        with self._lock:
            # The BATCH_END flag did not change the record's size.
            self._counters.records += len(batch)
            self._counters.bytes += len(data)
            self._counters.batches += 1
            self._counters.fsyncs += 1
        self._settle(batch, None)
        if self._active.size >= self._config.segment_bytes:
            self._seal()

    def _settle(self, batch: list[_Pending], error: BaseException | None) -> None:
        """Resolve the batch's futures on the loop, with one call for the whole batch."""
        if batch:
            self._call_soon(_resolve, [p.future for p in batch], [p.seq for p in batch], error)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(callback, *args)

    def _open_segment(self, first_seq: int) -> None:
        path = self.directory / _segment_name(first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # The new file's directory entry must be durable before its records are.
        _fsync_dir(self.directory, self._fsync)
        with self._lock:
            self._counters.fsyncs += 1
        self._active = _Segment(path, first_seq, first_seq - 1, 0)

    def _seal(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._active is not None and self._active.size > 0:
            self._segments.append(self._active)
        self._active = None

    def _housekeep(self, *, seal: bool) -> None:
        """Write the checkpoint and delete segments whose records are all confirmed."""
        through = self._state.confirmed_through
        try:
            if through > self._checkpointed:
                _write_checkpoint(self.directory / CONFIRMED_FILE, through)
                self._checkpointed = through
            self._last_checkpoint = self._clock.monotonic()
            active = self._active
            if (
                active is not None
                and active.last_seq <= through
                and (seal or active.size >= self._config.segment_bytes // 4)
            ):
                # Everything in it is confirmed: start afresh rather than keep
                # a file of dead records growing.
                self._seal()
            freed = 0
            while self._segments and self._segments[0].last_seq <= through:
                segment = self._segments.pop(0)
                segment.path.unlink(missing_ok=True)
                freed += segment.size
            if freed:
                with self._lock:
                    self._state.live_bytes -= freed
        except OSError:
            # Only space is at stake: the records stay until the next attempt.
            logger.warning("journal housekeeping failed; will retry", exc_info=True)

    def _close_files(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the directory for the next process
            self._lock_fd = None


def _resolve(
    futures: list[asyncio.Future[int]], seqs: list[int], error: BaseException | None
) -> None:
    for future, seq in zip(futures, seqs, strict=True):
        if future.done():
            continue  # the caller gave up waiting
        if error is None:
            future.set_result(seq)
        else:
            future.set_exception(
                JournalUnavailable("The write-ahead journal cannot write to its disk.")
            )


def _lock(directory: Path) -> int:
    """Take the journal directory for this process, or fail naming it."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalInUse(
            f"write-ahead journal {directory} is in use by another process: give each "
            "server its own SAMVAD_DATA_DIR"
        ) from None
    return fd


def _release(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _read_checkpoint(path: Path) -> int:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    try:
        return int(text.strip())
    except ValueError:
        # Replaying confirmed writes again is harmless; losing unconfirmed ones is not.
        logger.warning("journal: %s is unreadable; replaying every record on disk", path.name)
        return 0


def _write_checkpoint(path: Path, through: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{through}\n")
    # No fsync: the page cache outlives a crash of the process (what the
    # checkpoint is for); after a crash of the machine confirmed records are
    # replayed again (see the module's docstring). Rename keeps the file whole.
    os.replace(tmp, path)
