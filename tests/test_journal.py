"""The write-ahead journal, on real files (and one real ``kill -9``)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.documents import SESSIONS
from samvad.errors import BacklogFull, BadRequest
from samvad.journal import (
    BATCH_END,
    CONFIRMED_FILE,
    HEADER_SIZE,
    Journal,
    JournalConfig,
    JournalCorrupt,
    JournalInUse,
    JournalUnavailable,
    decode_write,
    encode_write,
    frame,
)
from samvad.models import Message, Role
from samvad.persistence import Persistence, WriteReceipt, current_receipt
from samvad.stores.memory import MemoryStore
from samvad.writes import Erase, EraseScope, FieldsWrite, ProfileWrite, Write
from tests.support.stores import FlakyStore

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 1, 10, 17, 0, 0, 123000, tzinfo=UTC)


def state_write(user: str, n: int) -> FieldsWrite:
    return FieldsWrite(
        collection="user_states",
        doc_id=user,
        user_id=user,
        fields={"n": n, "updatedAt": T0, "isActive": True},
    )


def message_write(user: str, n: int) -> ProfileWrite:
    message = Message(id=f"m{n:05d}", role=Role.USER, content=f"message {n}", timestamp=T0, seq=n)
    return ProfileWrite(user_id=user, append=[message])


class FsyncProbe:
    """``os.fsync`` that records which thread called it on what, and can hold or fail."""

    def __init__(self) -> None:
        self.files = 0
        self.dirs = 0
        self.threads: set[int] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail: OSError | None = None

    def __call__(self, fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.dirs += 1
            os.fsync(fd)
            return
        self.threads.add(threading.get_ident())
        self.files += 1
        self.entered.set()
        self.release.wait(timeout=30)
        if self.fail is not None:
            raise self.fail
        os.fsync(fd)

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()


OpenJournal = Callable[..., Journal]


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
async def opened(journal_dir: Path) -> AsyncIterator[OpenJournal]:
    """Open journals on ``journal_dir`` (started), closed at the end of the test."""
    journals: list[Journal] = []

    def open_journal(**options: object) -> Journal:
        config = options.pop("config", JournalConfig(checkpoint_interval=0))
        journal = Journal.open(journal_dir, config=config, **options)  # type: ignore[arg-type]
        journal.start()
        journals.append(journal)
        return journal

    yield open_journal
    for journal in journals:
        await journal.close()


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


async def append_all(journal: Journal, writes: list[Write]) -> list[int]:
    futures = [journal.append(write) for write in writes]
    return list(await asyncio.gather(*futures))


# -- encoding --------------------------------------------------------------------


def test_every_write_type_round_trips_with_timestamps_and_awkward_values() -> None:
    tricky = {"$date": "2025-01-01", "nested": {"list": [1, 2.5, None, True, "ॐ"]}}
    writes: list[Write] = [
        FieldsWrite(
            collection="sessions",
            doc_id="s1",
            user_id="u1",
            fields={"metadata": tricky, "lastActivity": T0},
            session_id="s1",
            defaults={"createdAt": T0},
            touch=True,
        ),
        FieldsWrite(
            collection="sessions",
            doc_id="s1",
            user_id="u1",
            fields={"status": "ended", "endedAt": T0, "metadata": {"a": 1}},
            session_id="s1",
            must_exist=True,
            merge=("metadata",),
        ),
        ProfileWrite(
            user_id="u1",
            append=[
                Message(
                    id="m1",
                    role=Role.ASSISTANT,
                    content="partial",
                    timestamp=T0,
                    session_id="s1",
                    interrupted=True,
                    seq=7,
                ),
                Message(
                    id="m2", role=Role.USER, content="hi", timestamp=T0, seq=8, client_id="c-8"
                ),
            ],
            preferences={"voice": "calm"},
            cap=50,
        ),
        Erase(EraseScope.USER, "u1"),
        Erase(EraseScope.SESSION, "s1"),
    ]
    for write in writes:
        assert decode_write(encode_write(write)) == write


def test_a_fields_write_journalled_before_must_exist_was_kept_reads_as_one_that_may_create() -> (
    None
):
    # The record as versions before it wrote it: seven fields after the tag.
    old = msgspec.msgpack.encode(["f", "sessions", "s1", "u1", {"n": 1}, "s1", {}, False])
    assert decode_write(old) == FieldsWrite(
        collection="sessions", doc_id="s1", user_id="u1", fields={"n": 1}, session_id="s1"
    )


def test_a_value_msgpack_cannot_hold_is_a_bad_request() -> None:
    write = FieldsWrite(collection="user_states", doc_id="u", user_id="u", fields={"n": 2**70})
    with pytest.raises(BadRequest):
        encode_write(write)


# -- appending and recovering ---------------------------------------------------


async def test_appended_writes_come_back_in_order_after_a_restart(
    opened: OpenJournal, journal_dir: Path
) -> None:
    journal = opened()
    writes: list[Write] = []
    for n in range(50):
        writes.append(state_write("u1", n))
        writes.append(message_write("u2", n))
    writes.append(Erase(EraseScope.USER, "u1"))
    seqs = await append_all(journal, writes)
    assert seqs == list(range(1, len(writes) + 1))
    await journal.close()

    again = opened()
    assert [r.seq for r in again.recovered] == seqs
    assert [r.write for r in again.recovered] == writes
    # Numbering goes on after the recovered records.
    assert await again.append(state_write("u3", 0)) == len(writes) + 1


async def test_the_write_is_serialised_when_appended_not_when_written(
    opened: OpenJournal,
) -> None:
    journal = opened()
    write = state_write("u1", 1)
    future = journal.append(write)
    write.fields["n"] = 999  # the write-behind coalesces into the same object later
    await future
    await journal.close()
    assert opened().recovered[0].write == state_write("u1", 1)


async def test_writers_wait_for_the_fsync_which_runs_off_the_event_loop(
    opened: OpenJournal,
) -> None:
    probe = FsyncProbe()
    journal = opened(fsync=probe)
    probe.hold()
    future = journal.append(state_write("u1", 1))
    assert await asyncio.to_thread(probe.entered.wait, 30)
    await asyncio.sleep(0)  # let any premature resolution reach the loop
    assert not future.done(), "acknowledged before the fsync returned"
    probe.release.set()
    assert await future == 1
    assert threading.get_ident() not in probe.threads
    assert probe.threads == {journal.writer_thread_id}


async def test_writes_queued_during_an_fsync_share_the_next_one(opened: OpenJournal) -> None:
    probe = FsyncProbe()
    journal = opened(fsync=probe)
    probe.hold()
    first = journal.append(state_write("u0", 0))
    assert await asyncio.to_thread(probe.entered.wait, 30)
    rest = [journal.append(message_write("u1", n)) for n in range(200)]
    probe.release.set()
    await asyncio.gather(first, *rest)

    stats = journal.stats()
    assert probe.files == 2, "one fsync for the first record, one for the 200 behind it"
    assert stats.batches == 2
    assert stats.records_appended == 201
    assert stats.bytes_appended == sum(p.stat().st_size for p in segments(journal.directory))


async def test_a_batch_is_bounded_in_records(opened: OpenJournal) -> None:
    probe = FsyncProbe()
    journal = opened(fsync=probe, config=JournalConfig(max_batch_records=10))
    probe.hold()
    first = journal.append(state_write("u0", 0))
    assert await asyncio.to_thread(probe.entered.wait, 30)
    rest = [journal.append(state_write("u1", n)) for n in range(25)]
    probe.release.set()
    await asyncio.gather(first, *rest)
    assert probe.files == 1 + 3


async def test_a_caller_that_gives_up_waiting_does_not_unjournal_its_write(
    opened: OpenJournal,
) -> None:
    probe = FsyncProbe()
    journal = opened(fsync=probe)
    probe.hold()
    future = journal.append(state_write("u1", 1))
    future.cancel()
    probe.release.set()
    await journal.close()
    assert [r.seq for r in opened().recovered] == [1]


# -- torn and corrupt files -----------------------------------------------------------


async def write_batches(opened: OpenJournal, batches: int, per_batch: int) -> Path:
    """Append ``batches`` batches of ``per_batch`` records; return the segment file."""
    probe = FsyncProbe()
    journal = opened(fsync=probe)
    n = 0
    for _ in range(batches):
        probe.hold()
        futures = [journal.append(state_write("u1", n + i)) for i in range(per_batch)]
        n += per_batch
        probe.release.set()
        await asyncio.gather(*futures)
    await journal.close()
    assert journal.stats().batches == batches
    [segment] = segments(journal.directory)
    return segment


def record_offsets(segment: Path) -> list[int]:
    data = segment.read_bytes()
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        length = int.from_bytes(data[pos + 8 : pos + 12], "little")
        pos += HEADER_SIZE + length
    return offsets


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE + 3])
async def test_a_torn_last_record_is_truncated_and_its_batch_dropped(
    opened: OpenJournal, cut: int
) -> None:
    segment = await write_batches(opened, batches=3, per_batch=1)
    offsets = record_offsets(segment)
    with segment.open("r+b") as handle:
        handle.truncate(offsets[2] + cut)

    journal = opened()

    assert [r.seq for r in journal.recovered] == [1, 2]
    assert segment.stat().st_size == offsets[2], "the torn tail is cut off"
    assert await journal.append(state_write("u1", 9)) == 3


async def test_an_incomplete_last_batch_is_dropped_whole(opened: OpenJournal) -> None:
    segment = await write_batches(opened, batches=2, per_batch=3)
    size = segment.stat().st_size
    # Two records of a third batch reached the disk, its batch end did not.
    payload = encode_write(state_write("u1", 99))
    with segment.open("ab") as handle:
        handle.write(frame(7, payload) + frame(8, payload))

    journal = opened()

    assert [r.seq for r in journal.recovered] == [1, 2, 3, 4, 5, 6]
    assert segment.stat().st_size == size


async def test_garbage_after_the_last_batch_is_dropped(opened: OpenJournal) -> None:
    segment = await write_batches(opened, batches=2, per_batch=2)
    size = segment.stat().st_size
    with segment.open("ab") as handle:
        handle.write(b"\x00" * 4096)

    assert [r.seq for r in opened().recovered] == [1, 2, 3, 4]
    assert segment.stat().st_size == size


async def test_a_bad_checksum_in_the_last_batch_is_a_torn_tail(opened: OpenJournal) -> None:
    segment = await write_batches(opened, batches=2, per_batch=2)
    offsets = record_offsets(segment)
    flip_byte(segment, offsets[3] + HEADER_SIZE + 1)

    assert [r.seq for r in opened().recovered] == [1, 2]
    assert segment.stat().st_size == offsets[2]


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


async def test_a_corrupt_record_before_a_complete_batch_names_file_and_offset(
    opened: OpenJournal, journal_dir: Path
) -> None:
    segment = await write_batches(opened, batches=3, per_batch=2)
    offsets = record_offsets(segment)
    flip_byte(segment, offsets[2] + HEADER_SIZE + 2)
    size = segment.stat().st_size

    with pytest.raises(JournalCorrupt) as caught:
        Journal.open(journal_dir)

    assert caught.value.path == segment
    assert caught.value.offset == offsets[2]
    assert str(segment) in str(caught.value)
    assert f"offset {offsets[2]}" in str(caught.value)
    assert segment.stat().st_size == size, "a damaged journal is never truncated"


async def test_a_corrupt_length_is_reported_not_taken_for_a_torn_tail(
    opened: OpenJournal, journal_dir: Path
) -> None:
    segment = await write_batches(opened, batches=3, per_batch=1)
    offsets = record_offsets(segment)
    # A length that points past the end of the file, in the first record.
    with segment.open("r+b") as handle:
        handle.seek(offsets[0] + 8)
        handle.write((10_000_000).to_bytes(4, "little"))

    with pytest.raises(JournalCorrupt) as caught:
        Journal.open(journal_dir)
    assert caught.value.offset == 0


async def test_damage_in_an_older_segment_is_reported(
    opened: OpenJournal, journal_dir: Path
) -> None:
    journal = opened(config=JournalConfig(segment_bytes=HEADER_SIZE + 1, checkpoint_interval=0))
    for n in range(3):
        await journal.append(state_write("u1", n))
    await journal.close()
    first = segments(journal_dir)[0]
    flip_byte(first, HEADER_SIZE + 1)

    with pytest.raises(JournalCorrupt) as caught:
        Journal.open(journal_dir)
    assert caught.value.path == first


def test_an_empty_directory_is_a_fresh_journal(journal_dir: Path) -> None:
    journal = Journal.open(journal_dir)
    assert journal.recovered == ()
    assert journal_dir.is_dir()
    asyncio.run(journal.close())


async def test_one_process_at_a_time_has_a_journal_directory(opened: OpenJournal) -> None:
    journal = opened()
    with pytest.raises(JournalInUse, match="in use by another process"):
        Journal.open(journal.directory)
    await journal.close()
    assert opened().recovered == ()


# -- confirmations, segments and the bound ---------------------------------------------


async def test_only_a_confirmed_prefix_is_forgotten(opened: OpenJournal, journal_dir: Path) -> None:
    journal = opened()
    await append_all(journal, [state_write("u1", n) for n in range(6)])

    journal.confirm([1, 2, 4, 6])
    assert journal.confirmed_through == 2
    journal.confirm([3])
    assert journal.confirmed_through == 4
    await journal.checkpoint()
    assert (journal_dir / CONFIRMED_FILE).read_text().strip() == "4"
    await journal.close()

    assert [r.seq for r in opened().recovered] == [5, 6]


async def test_confirmed_segments_are_deleted_and_their_space_freed(
    opened: OpenJournal, journal_dir: Path
) -> None:
    record = HEADER_SIZE + len(encode_write(state_write("u1", 0)))
    journal = opened(config=JournalConfig(segment_bytes=2 * record, checkpoint_interval=0))
    seqs = await append_all(journal, [state_write("u1", 0)])
    for n in range(1, 8):
        seqs += await append_all(journal, [state_write("u1", n)])
    assert len(segments(journal_dir)) == 4
    assert journal.stats().live_bytes == 8 * record

    journal.confirm(seqs[:5])
    await journal.checkpoint()
    assert len(segments(journal_dir)) == 2, "the two segments of records 1-4 are gone"
    assert journal.stats().live_bytes == 4 * record

    journal.confirm(seqs[5:])
    await journal.checkpoint()
    assert segments(journal_dir) == []
    assert journal.stats().live_bytes == 0
    await journal.close()
    assert opened().recovered == ()


async def test_at_the_bound_writes_are_refused_before_they_are_acknowledged(
    opened: OpenJournal,
) -> None:
    record = HEADER_SIZE + len(encode_write(state_write("u1", 0)))
    erase = HEADER_SIZE + len(encode_write(Erase(EraseScope.USER, "u1")))
    journal = opened(
        config=JournalConfig(
            max_bytes=3 * record, erase_reserve=erase, segment_bytes=record, checkpoint_interval=0
        )
    )
    seqs = await append_all(journal, [state_write("u1", n) for n in range(3)])

    with pytest.raises(BacklogFull):
        journal.append(state_write("u1", 3))
    # An erasure still gets in (it is what lets data go), once.
    await journal.append(Erase(EraseScope.USER, "u1"))
    with pytest.raises(BacklogFull):
        journal.append(Erase(EraseScope.USER, "u2"))
    assert journal.stats().records_appended == 4, "nothing refused was written"

    journal.confirm([*seqs, 4])
    await journal.checkpoint()
    assert await journal.append(state_write("u1", 4)) == 5


async def test_a_failed_fsync_fails_the_batch_and_every_later_write(
    opened: OpenJournal, journal_dir: Path
) -> None:
    probe = FsyncProbe()
    journal = opened(fsync=probe)
    assert await journal.append(state_write("u1", 1)) == 1
    probe.fail = OSError(5, "Input/output error")

    with pytest.raises(JournalUnavailable):
        await journal.append(state_write("u1", 2))
    with pytest.raises(JournalUnavailable):
        journal.append(state_write("u1", 3))
    assert JournalUnavailable.status_code == 503


async def test_the_checkpoint_waits_for_its_interval_on_the_injected_clock(
    opened: OpenJournal, journal_dir: Path
) -> None:
    clock = ManualClock()
    journal = opened(clock=clock, config=JournalConfig(checkpoint_interval=10))
    await journal.append(state_write("u1", 0))
    journal.confirm([1])
    # Two more round trips through the writer thread: had it checkpointed
    # after the first, the file would exist by the time the second returns.
    await journal.append(state_write("u1", 1))
    await journal.append(state_write("u1", 2))
    assert not (journal_dir / CONFIRMED_FILE).exists()

    clock.advance(10)
    await journal.append(state_write("u1", 3))
    await journal.append(state_write("u1", 4))
    assert (journal_dir / CONFIRMED_FILE).read_text().strip() == "1"


async def test_a_stale_checkpoint_replays_confirmed_records_again_in_order(
    opened: OpenJournal, journal_dir: Path
) -> None:
    journal = opened()
    await append_all(journal, [state_write("u1", n) for n in range(4)])
    journal.confirm([1, 2])
    await journal.checkpoint()
    await journal.close()
    (journal_dir / CONFIRMED_FILE).write_text("not a number\n")

    assert [r.seq for r in opened().recovered] == [1, 2, 3, 4]


# -- a real crash ------------------------------------------------------------------

_CRASHER = """
import asyncio, os, signal, sys
from pathlib import Path
from tests.test_journal import message_write
from samvad.journal import Journal

async def main() -> None:
    journal = Journal.open(Path(sys.argv[1]))
    journal.start()
    pending = set()
    acked = 0
    for n in range(int(sys.argv[2])):
        pending.add(journal.append(message_write("u1", n)))
        if len(pending) >= 50:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            acked += len(done)
    if pending:
        done, _ = await asyncio.wait(pending)
        acked += len(done)
    print(acked, flush=True)
    # More writes on their way to the disk when the process dies.
    for n in range(int(sys.argv[2]), int(sys.argv[2]) + 500):
        journal.append(message_write("u1", n))
    await asyncio.sleep(0)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_every_acknowledged_write_survives_kill_9(journal_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(journal_dir), "2000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -9, result.stderr
    assert result.stdout.strip() == "2000"

    recovered = [r.write for r in Journal.open(journal_dir).recovered]

    assert recovered[:2000] == [message_write("u1", n) for n in range(2000)]
    # Of the unacknowledged writes, whatever made it is a prefix, in order.
    assert recovered[2000:] == [message_write("u1", n) for n in range(2000, len(recovered))]


def test_batch_end_flag_marks_the_last_record_of_a_batch() -> None:
    # The on-disk format other tests rely on.
    record = frame(1, b"x", BATCH_END)
    assert record[:4] == b"\xd5SJ1"
    assert record[HEADER_SIZE - 1] == BATCH_END


def test_the_journal_is_on_by_default_in_the_data_dir_and_can_be_turned_off() -> None:
    default = Settings.from_env({})
    assert default.journal is True
    assert default.journal_dir == Path(".samvad", "journal")
    custom = Settings.from_env({"SAMVAD_DATA_DIR": "var/samvad", "SAMVAD_JOURNAL": "off"})
    assert custom.journal is False
    assert custom.journal_dir == Path("var/samvad", "journal")


# -- wired into the persistence layer ---------------------------------------------


def journalled(tmp_path: Path) -> Settings:
    return Settings(
        store="memory",
        journal=True,
        data_dir=tmp_path / "data",
        flush_linger=0.0,
        shutdown_flush_deadline=0.0,
        retry_max_backoff=0.01,
    )


async def test_writes_left_unflushed_are_replayed_in_order_at_the_next_start(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    store = FlakyStore()
    store.down = True
    first = Persistence(store, settings=journalled(tmp_path), clock=clock)
    await first.start()
    first.save_state("u1", {"n": 1})
    for n in range(5):
        first.append_message("u1", role=Role.USER, content=f"m{n}")
    first.save_state("u1", {"n": 2})
    await first.durable()
    assert await first.close() == 2  # the store never answered

    store.down = False
    second = Persistence(store, settings=journalled(tmp_path), clock=clock)
    await second.start()
    await asyncio.wait_for(second.writes.flush(), 10)
    assert (await store.get("user_states", "u1") or {})["n"] == 2
    profile = await store.get("user_profiles", "u1") or {}
    assert [m["content"] for m in profile["conversationHistory"]] == [f"m{n}" for n in range(5)]
    await second.close()

    assert second.journal is not None and second.journal.stats().unconfirmed == 0
    third = Persistence(store, settings=journalled(tmp_path), clock=clock)
    await third.start()
    assert third.writes.pending_count == 0, "confirmed writes are not replayed again"
    await third.close()


async def test_a_replayed_session_update_does_not_recreate_a_session_erased_meanwhile(
    tmp_path: Path,
) -> None:
    # Updates of a session must not re-create it (must_exist): also when they
    # come back from the journal after a restart, and the session was erased
    # in between by an instance this one never heard from.
    clock = ManualClock()
    store = FlakyStore()
    first = Persistence(store, settings=journalled(tmp_path), clock=clock)
    await first.start()
    for session_id in ("touched", "ended", "abandoned"):
        await first.save_session(session_id, user_id="u1", metadata={"topic": "private"})
    await asyncio.wait_for(first.writes.flush(), 10)
    store.down = True
    await first.touch_session("touched")
    await first.end_session("ended")
    await first.mark_abandoned("abandoned")
    await first.durable()
    assert await first.close() == 3  # the store never answered

    store.down = False
    for session_id in ("touched", "ended", "abandoned"):
        await store.erase(Erase(EraseScope.SESSION, session_id))  # elsewhere
    second = Persistence(store, settings=journalled(tmp_path), clock=clock)
    await second.start()
    assert second.writes.pending_count == 3
    await asyncio.wait_for(second.writes.flush(), 10)
    for session_id in ("touched", "ended", "abandoned"):
        assert await store.get(SESSIONS, session_id) is None
    await second.close()


async def test_an_erase_makes_the_writes_it_drops_moot_for_the_journal(tmp_path: Path) -> None:
    clock = ManualClock()
    store = FlakyStore()
    store.down = True
    p = Persistence(store, settings=journalled(tmp_path), clock=clock)
    await p.start()
    p.save_state("u1", {"n": 1})
    p.append_message("u1", role=Role.USER, content="gone")
    await p.erase_user("u1")
    await p.durable()
    journal = p.journal
    assert journal is not None
    assert journal.stats().unconfirmed == 1, "only the erase itself waits for the store"

    store.down = False
    await asyncio.wait_for(p.writes.flush(), 10)
    assert journal.stats().unconfirmed == 0
    await p.close()


async def test_a_write_refused_at_the_backlog_bound_is_not_journalled(tmp_path: Path) -> None:
    clock = ManualClock()
    store = FlakyStore()
    store.down = True
    settings = journalled(tmp_path).replace(max_pending_documents=1)
    p = Persistence(store, settings=settings, clock=clock)
    await p.start()
    p.save_state("u1", {"n": 1})
    with pytest.raises(BacklogFull):
        p.save_state("u2", {"n": 1})
    await p.durable()
    assert p.journal is not None and p.journal.stats().records_appended == 1
    await p.close()


async def test_without_a_durable_store_or_when_off_there_is_no_journal(tmp_path: Path) -> None:
    clock = ManualClock()
    memory = Persistence(MemoryStore(), settings=journalled(tmp_path), clock=clock)
    off = Persistence(
        FlakyStore(), settings=journalled(tmp_path).replace(journal=False), clock=clock
    )
    for p in (memory, off):
        await p.start()
        p.save_state("u1", {"n": 1})
        await p.durable()
        assert p.journal is None
        await p.close()
    assert not (tmp_path / "data" / "journal").exists()


class _Gate:
    """``os.fsync`` of journal files that waits for a permit for each call."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)

    def __call__(self, fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            self.entered.release()
            self.permits.acquire(timeout=30)
        os.fsync(fd)


async def test_synced_waits_for_its_record_not_for_records_appended_after_it(
    opened: OpenJournal,
) -> None:
    gate = _Gate()
    journal = opened(fsync=gate)
    first = journal.append(state_write("u1", 1))
    assert await asyncio.to_thread(gate.entered.acquire, True, 30)  # its batch's fsync
    later = journal.append(state_write("u2", 1))  # the next batch
    gate.permits.release()  # the first batch only
    await journal.synced(first)
    assert await asyncio.to_thread(gate.entered.acquire, True, 30)
    assert not later.done(), "the later record's fsync is still held"
    gate.permits.release()
    await journal.synced(later)
    assert first.result() == 1 and later.result() == 2


async def test_a_receipt_holds_the_newest_write_of_its_context_only(tmp_path: Path) -> None:
    p = Persistence(FlakyStore(), settings=journalled(tmp_path), clock=ManualClock())
    await p.start()
    receipt = WriteReceipt()
    p.save_state("u0", {"n": 0})  # before the request
    token = current_receipt.set(receipt)
    try:
        p.save_state("u1", {"n": 1})
        p.append_message("u1", role=Role.USER, content="hello")
    finally:
        current_receipt.reset(token)
    p.save_state("u2", {"n": 2})  # after it
    assert receipt.record is not None
    await p.durable(receipt)
    assert receipt.record.result() == 3, "the request's newest record"
    await p.durable(WriteReceipt())  # a request that wrote nothing waits for nothing
    await p.close()


# A profile write as the journal of f2d7049 wrote it (messages were frozen
# dataclasses then, msgspec structs since): a journal left by an older
# version must replay after an upgrade, and an older version must read ours.
_RECORD_BEFORE_STRUCTS = bytes.fromhex(
    "95a170a275319288a26964a430316132a4726f6c65a475736572a7636f6e74656e74a668c3a96c6c6f"
    "a974696d657374616d70d7ff6cb808006b0ccb0baa73657373696f6e5f6964a173ab696e746572727570"
    "746564c2a373657103a9636c69656e745f6964a2633188a26964a178a4726f6c65a9617373697374616e"
    "74a7636f6e74656e74a26f6ba974696d657374616d70d7ff6cf511006b0ccb0baa73657373696f6e5f69"
    "64c0ab696e746572727570746564c3a3736571c0a9636c69656e745f6964c081a1700164"
)


def test_a_profile_write_journalled_by_an_earlier_version_reads_the_same() -> None:
    at = datetime(2026, 11, 30, 1, 2, 3, 456_000, tzinfo=UTC)
    write = ProfileWrite(
        user_id="u1",
        append=[
            Message(
                id="01a2",
                role=Role.USER,
                content="héllo",
                timestamp=at,
                session_id="s",
                seq=3,
                client_id="c1",
            ),
            Message(
                id="x",
                role=Role.ASSISTANT,
                content="ok",
                timestamp=at.replace(microsecond=457_000),
                interrupted=True,
            ),
        ],
        preferences={"p": 1},
        cap=100,
    )
    assert decode_write(_RECORD_BEFORE_STRUCTS) == write
    assert encode_write(write) == _RECORD_BEFORE_STRUCTS
