"""The write-behind queue's logic, over a store double and a manual clock."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samvad.clock import ManualClock, SystemClock
from samvad.documents import PROFILES, SESSIONS, STATES
from samvad.errors import BacklogFull
from samvad.models import Message, Mode, Profile, Role
from samvad.stores.base import StoreRejected, StoreUnavailable
from samvad.writebehind import WriteBehind, WriteBehindConfig, _joined, _split
from samvad.writes import Erase, EraseScope, FieldsWrite, Key, ProfileWrite, Write
from tests.support.stores import FlakyStore, settle

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)


def state(user: str, **fields: object) -> FieldsWrite:
    return FieldsWrite(collection=STATES, doc_id=user, user_id=user, fields=dict(fields))


def session(sid: str, user: str, **fields: object) -> FieldsWrite:
    return FieldsWrite(
        collection=SESSIONS,
        doc_id=sid,
        user_id=user,
        session_id=sid,
        fields={"userId": user, **fields},
    )


def message(user: str, i: int) -> ProfileWrite:
    return ProfileWrite(
        user_id=user,
        append=[Message(id=f"{user}-{i:03d}", role=Role.USER, content=f"m{i}", timestamp=T0)],
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


def make(store: FlakyStore, clock: ManualClock, **config: object) -> WriteBehind:
    defaults: dict[str, object] = {
        "flush_interval": 1.0,
        "linger": 0.0,
        "touch_interval": 30.0,
        "concurrency": 4,
        "probe_interval": 0.001,
        "probe_max_interval": 0.002,
    }
    defaults.update(config)
    return WriteBehind(store, config=WriteBehindConfig(**defaults), clock=clock)  # type: ignore[arg-type]


async def in_outage(store: FlakyStore, clock: ManualClock, **config: object) -> WriteBehind:
    """A started queue (:func:`make`) whose store is down, in memory-only mode."""
    queue = make(store, clock, **config)
    await queue.start()
    store.down = True
    queue.report_unavailable(RuntimeError("test"))
    return queue


@pytest.fixture
async def wb(store: FlakyStore, clock: ManualClock) -> AsyncIterator[WriteBehind]:
    queue = make(store, clock)
    await queue.start()
    yield queue
    await queue.close(1.0)


async def test_a_burst_to_one_document_becomes_one_write(
    wb: WriteBehind, store: FlakyStore
) -> None:
    for i in range(50):
        wb.submit(message("u1", i))
    await settle()
    assert store.log == [("profile", (PROFILES, "u1"))]
    stored = await store.get(PROFILES, "u1")
    assert stored is not None
    assert [m["id"] for m in stored["conversationHistory"]] == [f"u1-{i:03d}" for i in range(50)]


async def test_writes_to_one_document_are_spaced_by_the_flush_interval(
    wb: WriteBehind, store: FlakyStore, clock: ManualClock
) -> None:
    wb.submit(state("u1", a=1))
    await settle()
    assert len(store.log) == 1
    wb.submit(state("u1", a=2))
    wb.submit(state("u1", b=3))
    await settle()
    assert len(store.log) == 1, "a second write within the interval must wait"
    clock.advance(0.5)
    wb.wake()
    await settle()
    assert len(store.log) == 1
    clock.advance(0.5)
    wb.wake()
    await settle()
    assert len(store.log) == 2
    assert await store.get(STATES, "u1") == {"a": 2, "b": 3}


async def test_different_documents_are_not_held_back_by_each_other(
    wb: WriteBehind, store: FlakyStore
) -> None:
    for user in ("a", "b", "c"):
        wb.submit(state(user, x=1))
    await settle()
    assert {key for _, key in store.log} == {(STATES, "a"), (STATES, "b"), (STATES, "c")}


async def test_touch_writes_wait_for_the_touch_interval_unless_a_real_write_follows(
    wb: WriteBehind, store: FlakyStore, clock: ManualClock
) -> None:
    touch = session("s1", "u1", lastActivity=1)
    touch.touch = True
    wb.submit(touch)
    await settle()
    assert store.log == []
    clock.advance(29)
    wb.wake()
    await settle()
    assert store.log == []
    wb.submit(session("s1", "u1", status="ended"))
    await settle()
    assert store.log == [("fields", (SESSIONS, "s1"))]


async def test_a_write_arriving_while_its_document_is_in_flight_waits_and_keeps_order(
    wb: WriteBehind, store: FlakyStore, clock: ManualClock
) -> None:
    store.gate.clear()
    wb.submit(state("u1", v=1))
    await settle()
    wb.submit(state("u1", v=2))
    await settle()
    assert wb.status().pending_in_flight == 1
    store.gate.set()
    await settle()
    clock.advance(1)
    wb.wake()
    await settle()
    assert len(store.log) == 2
    assert await store.get(STATES, "u1") == {"v": 2}


async def test_erase_drops_queued_writes_of_the_user(wb: WriteBehind, store: FlakyStore) -> None:
    store.down = True
    wb.report_unavailable(RuntimeError("test"))
    wb.submit(state("u1", a=1))
    wb.submit(message("u1", 1))
    wb.submit(session("s1", "u1", status="active"))
    wb.submit(state("u2", a=1))
    wb.submit(Erase(EraseScope.USER, "u1"))
    assert {tuple(w.key) for w in wb.pending_writes_where(lambda w: True)} == {
        (STATES, "u2"),
        ("erase:user", "u1"),
    }
    store.down = False
    await asyncio.wait_for(wb.flush(), 5)
    assert await store.get(STATES, "u1") is None
    assert await store.get(PROFILES, "u1") is None
    assert await store.get(STATES, "u2") == {"a": 1}


async def test_erase_waits_for_an_in_flight_write_and_then_deletes_it(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.gate.clear()
    wb.submit(message("u1", 1))
    await settle()
    wb.submit(Erase(EraseScope.USER, "u1"))
    await settle()
    assert wb.status().pending_in_flight == 1, "the erase must not start before the write ends"
    store.gate.set()
    await asyncio.wait_for(wb.flush(), 5)
    assert store.log == [("profile", (PROFILES, "u1")), ("erase", ("erase:user", "u1"))]
    assert await store.get(PROFILES, "u1") is None


async def test_writes_after_an_erase_wait_for_it_and_survive_it(
    wb: WriteBehind, store: FlakyStore
) -> None:
    await store.write_fields(state("u1", old=True))
    store.gate.clear()
    wb.submit(Erase(EraseScope.USER, "u1"))
    await settle()
    wb.submit(state("u1", new=True))
    await settle()
    assert wb.erased((("user", "u1"),))
    store.gate.set()
    await asyncio.wait_for(wb.flush(), 5)
    assert await store.get(STATES, "u1") == {"new": True}
    assert [kind for kind, _ in store.log] == ["fields", "erase", "fields"]


async def test_a_failed_in_flight_write_covered_by_an_erase_is_not_retried(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.gate.clear()
    wb.submit(state("u1", a=1))
    await settle()
    wb.submit(Erase(EraseScope.USER, "u1"))
    store.rejecting.add((STATES, "u1"))
    store.gate.set()
    await asyncio.wait_for(wb.flush(), 5)
    assert wb.pending_count == 0
    assert await store.get(STATES, "u1") is None


async def test_session_erase_holds_back_later_writes_to_that_session_only(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.gate.clear()
    wb.submit(Erase(EraseScope.SESSION, "s1"))
    await settle()
    wb.submit(session("s1", "u1", status="active"))
    wb.submit(session("s2", "u1", status="active"))
    await settle()
    assert wb.erased((("session", "s1"),))
    assert not wb.erased((("session", "s2"),))
    store.gate.set()
    await asyncio.wait_for(wb.flush(), 5)
    assert await store.get(SESSIONS, "s1") == {"userId": "u1", "status": "active"}


async def test_outage_switches_to_memory_mode_keeps_writes_and_replays_in_order(
    wb: WriteBehind, store: FlakyStore, clock: ManualClock
) -> None:
    store.down = True
    wb.submit(state("a", v=1))
    await settle()
    assert wb.mode is Mode.MEMORY
    for user in ("b", "c", "d"):
        wb.submit(state(user, v=1))
    wb.submit(state("a", v=2))
    await settle()
    assert store.log == []
    status = wb.status()
    assert status.pending_documents == 4
    assert status.last_error == "StoreUnavailable"
    clock.advance(3)
    assert wb.status().oldest_pending_age == pytest.approx(3)
    store.down = False
    await asyncio.wait_for(wb.flush(), 5)
    assert wb.mode is Mode.FIRESTORE
    assert [key[1] for _, key in store.log] == ["a", "b", "c", "d"]
    assert await store.get(STATES, "a") == {"v": 2}


async def test_the_prober_reconnects_after_repeated_failures(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.down = True
    wb.submit(state("a", v=1))
    await asyncio.wait_for(store.reconnected.wait(), 5)
    assert store.pings >= 3
    store.down = False
    await asyncio.wait_for(wb.flush(), 5)


async def test_a_write_refused_for_its_content_is_set_aside_and_the_others_land(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.rejecting.add((STATES, "bad"))
    wb.submit(state("bad", v=1))
    wb.submit(state("good", v=1))
    await asyncio.wait_for(wb.flush(), 5)
    assert wb.mode is Mode.FIRESTORE, "a rejection is not an outage"
    assert await store.get(STATES, "good") == {"v": 1}
    assert wb.pending_count == 0, "nothing waits behind the refused write"
    assert wb.status().writes_set_aside == 1
    wb.submit(state("bad", v=2))  # later writes of the document are tried afresh
    await asyncio.wait_for(wb.flush(), 5)
    assert wb.status().writes_set_aside == 2


class PoisonStore(FlakyStore):
    """Refuses, like Firestore, any write holding the value ``POISON`` (and
    once, for ``flaky``, a refusal that does not repeat)."""

    def __init__(self) -> None:
        super().__init__()
        self.flaky_once = True

    def _refuse(self, values: object) -> None:
        text = repr(values)
        if "POISON" in text:
            raise StoreRejected("refused for its content (test)")
        if "flaky" in text and self.flaky_once:
            self.flaky_once = False
            raise StoreRejected("refused once (test)")

    async def write_fields(self, write: FieldsWrite) -> None:
        self._refuse(write.fields)
        await super().write_fields(write)

    async def write_profile(self, write: ProfileWrite, *, now: datetime) -> Profile:
        self._refuse((write.preferences, [m.content for m in write.append]))
        return await super().write_profile(write, now=now)


async def test_only_the_poisoned_parts_of_a_coalesced_write_are_set_aside(
    clock: ManualClock,
) -> None:
    store = PoisonStore()
    kept: list[tuple[tuple[str, str], Write, str]] = []
    queue = WriteBehind(
        store,
        config=WriteBehindConfig(linger=0.0),
        clock=clock,
        dead_letter=lambda key, write, reason: kept.append((key, write, reason)),
    )
    await queue.start()
    store.gate.clear()  # everything below coalesces into one write per document
    queue.submit(state("u1", mood="calm", bad="POISON", flaky=1))
    queue.submit(message("u1", 0))
    queue.submit(ProfileWrite(user_id="u1", preferences={"voice": "POISON", "speed": 2}))
    queue.submit(message("u1", 1))
    store.gate.set()
    await asyncio.wait_for(queue.flush(), 5)

    assert await store.get(STATES, "u1") == {"mood": "calm", "flaky": 1}
    profile = await store.get(PROFILES, "u1") or {}
    assert [m["content"] for m in profile["conversationHistory"]] == ["m0", "m1"]
    assert profile["preferences"] == {"speed": 2}
    assert [(key, write) for key, write, _ in kept] == [
        (
            (STATES, "u1"),
            FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"bad": "POISON"}),
        ),
        ((PROFILES, "u1"), ProfileWrite(user_id="u1", preferences={"voice": "POISON"})),
    ]
    assert all("refused for its content" in reason for _, _, reason in kept)
    assert queue.status().writes_set_aside == 2
    await queue.close(1)


async def test_an_outage_while_isolating_keeps_the_parts_not_yet_written(
    clock: ManualClock,
) -> None:
    store = PoisonStore()
    queue = WriteBehind(store, config=WriteBehindConfig(linger=0.0), clock=clock)
    await queue.start()
    store.gate.clear()
    queue.submit(state("u1", a="POISON", b=1, c=2))
    await settle()
    store.down = True
    store.gate.set()
    await settle()
    assert queue.mode is Mode.MEMORY
    assert queue.pending_count == 1
    store.down = False
    await asyncio.wait_for(queue.flush(), 5)
    assert await store.get(STATES, "u1") == {"b": 1, "c": 2}
    await queue.close(1)


async def test_the_pending_bound_refuses_new_documents_but_not_updates_or_erases(
    store: FlakyStore, clock: ManualClock
) -> None:
    queue = await in_outage(store, clock, max_pending=2)
    queue.submit(state("a", v=1))
    queue.submit(state("b", v=1))
    with pytest.raises(BacklogFull):
        queue.submit(state("c", v=1))
    queue.submit(state("a", v=2))
    queue.submit(Erase(EraseScope.USER, "b"))
    assert queue.pending_count == 2
    store.down = False
    assert await queue.close(5) == 0
    assert await store.get(STATES, "a") == {"v": 2}
    assert await store.get(STATES, "b") is None


async def test_the_byte_bound_refuses_every_write_but_erases_until_the_backlog_drains(
    store: FlakyStore, clock: ManualClock
) -> None:
    three = message("a", 0)
    three.absorb(message("a", 1))
    three.absorb(message("a", 2))
    queue = await in_outage(store, clock, max_pending_bytes=three.approx_bytes())
    accepted = 0
    with pytest.raises(BacklogFull):
        for i in range(10):  # folded into one entry, each adds its bytes
            queue.submit(message("a", i))
            accepted += 1
    assert 1 <= accepted <= 3, "counted never less than the truth"
    assert queue.pending_bytes >= three.approx_bytes()
    assert queue.pending_count == 1
    with pytest.raises(BacklogFull):
        queue.submit(state("b", v=1))  # at the bound every write is refused...
    queue.submit(Erase(EraseScope.USER, "c"))  # ...but never an erase
    assert queue.status().pending_bytes == queue.pending_bytes
    store.down = False
    assert await queue.close(5) == 0
    assert queue.pending_bytes == 0
    stored = await store.get(PROFILES, "a")
    assert stored is not None
    assert [m["id"] for m in stored["conversationHistory"]] == [
        f"a-{i:03d}" for i in range(accepted)
    ]


async def test_messages_folded_into_one_write_are_counted_exactly_and_trims_recounted(
    store: FlakyStore, clock: ManualClock
) -> None:
    # Appends add exactly what they carry (no recount needed); a fold that
    # trims the history overcounts until the estimate doubles, never less
    # than the truth, and at most twice it once counted again.
    queue = await in_outage(store, clock)
    folded = message("a", 0)
    queue.submit(message("a", 0))
    for i in range(1, 50):
        queue.submit(message("a", i))
        folded.absorb(message("a", i))
        assert queue.pending_bytes == folded.approx_bytes()
    folded = ProfileWrite(user_id="b", cap=3)
    for i in range(200):
        write = message("b", i)
        write.cap = 3
        queue.submit(write)
        folded.absorb(message("b", i))
        truth = folded.approx_bytes()
        held = queue.pending_bytes - queue.pending_writes((PROFILES, "a"))[0].approx_bytes()
        assert truth <= held <= 2 * truth + message("b", i).approx_bytes()
    store.down = False
    assert await queue.close(5) == 0
    assert queue.pending_bytes == 0


async def test_an_erase_frees_the_bytes_of_the_writes_it_drops(
    store: FlakyStore, clock: ManualClock
) -> None:
    queue = await in_outage(store, clock)
    queue.submit(message("a", 0))
    queue.submit(state("a", v=1))
    queue.submit(state("b", v=1))
    before = queue.pending_bytes
    queue.submit(Erase(EraseScope.USER, "a"))
    assert (
        queue.pending_bytes
        == before
        - message("a", 0).approx_bytes()
        - state("a", v=1).approx_bytes()
        + Erase(EraseScope.USER, "a").approx_bytes()
    )
    store.down = False
    assert await queue.close(5) == 0
    assert queue.pending_bytes == 0


async def test_close_flushes_pending_writes_ignoring_the_interval(
    store: FlakyStore, clock: ManualClock
) -> None:
    queue = make(store, clock, linger=60.0)
    await queue.start()
    queue.submit(state("a", v=1))
    queue.submit(message("a", 1))
    assert await queue.close(5) == 0
    assert len(store.log) == 2


async def test_close_reports_what_it_could_not_flush_by_the_deadline(
    store: FlakyStore, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    queue = make(store, clock)
    await queue.start()
    store.down = True
    queue.submit(state("a", v=1))
    queue.submit(message("b", 1))
    assert await queue.close(0.05) == 2
    assert "user_states/a" in caplog.text
    assert "m1" not in caplog.text, "content must never be logged"
    with pytest.raises(RuntimeError, match="closed"):
        queue.submit(state("a", v=2))


async def test_start_with_the_store_down_begins_in_memory_mode(
    store: FlakyStore, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    store.down = True
    queue = make(store, clock)
    await queue.start()
    assert queue.mode is Mode.MEMORY
    queue.submit(state("a", v=1))
    store.down = False
    await asyncio.wait_for(queue.flush(), 5)
    assert queue.mode is Mode.FIRESTORE
    assert sum("Firestore unavailable" in r.message for r in caplog.records) == 1
    await queue.close(1)


async def test_counters_track_writes_by_collection(wb: WriteBehind, store: FlakyStore) -> None:
    wb.submit(state("a", v=1))
    wb.submit(message("a", 1))
    await asyncio.wait_for(wb.flush(), 5)
    assert wb.writes_by_collection == {STATES: 1, PROFILES: 1}
    assert wb.status().writes_issued == 2


async def test_a_write_submitted_during_a_flush_waits_an_interval_from_its_end(
    wb: WriteBehind, store: FlakyStore, clock: ManualClock
) -> None:
    clock.advance(5)  # the document's last flush is long past
    store.gate.clear()
    wb.submit(state("u1", v=1))
    await settle()
    assert wb.status().pending_in_flight == 1
    wb.submit(state("u1", v=2))  # due at once by the old flush; the new one is in flight
    clock.advance(0.3)
    store.gate.set()
    await settle()
    assert len(store.log) == 1, "the next write waits a whole interval after the flush"
    clock.advance(0.9)
    wb.wake()
    await settle()
    assert len(store.log) == 1
    clock.advance(0.1)
    wb.wake()
    await settle()
    assert len(store.log) == 2
    assert await store.get(STATES, "u1") == {"v": 2}


async def test_flush_still_writes_a_document_held_back_by_its_interval(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.gate.clear()
    wb.submit(state("u1", v=1))
    await settle()
    wb.submit(state("u1", v=2))
    store.gate.set()
    await asyncio.wait_for(wb.flush(), 5)
    assert len(store.log) == 2
    assert await store.get(STATES, "u1") == {"v": 2}


class OneDocumentFails(FlakyStore):
    """Writes to ``failing`` keys raise StoreUnavailable once ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[tuple[str, str]] = set()
        self.fail = asyncio.Event()
        self.fail.set()
        self.answered = asyncio.Event()

    async def ping(self) -> None:
        await super().ping()
        self.answered.set()  # the prober switches back to Firestore mode next

    async def _enter(self, key: tuple[str, str]) -> None:
        if key in self.failing:
            await self.fail.wait()
            if key in self.failing:
                raise StoreUnavailable("this document is stuck (test)")
        await super()._enter(key)


async def recovered(store: OneDocumentFails, wb: WriteBehind) -> None:
    store.answered.clear()
    await asyncio.wait_for(store.answered.wait(), 5)
    await settle()
    assert wb.mode is Mode.FIRESTORE


async def stuck_while_others_land(
    store: OneDocumentFails, wb: WriteBehind, clock: ManualClock
) -> None:
    """Make ``stuck`` fail again while another write lands: backed off alone."""
    store.failing.add((STATES, "stuck"))
    wb.submit(state("stuck", v=1))
    await settle()
    assert wb.mode is Mode.MEMORY, "a first failure is taken for an outage"
    store.fail.clear()  # its next attempt hangs, then fails...
    await recovered(store, wb)
    clock.advance(2)
    wb.submit(state("ok", v=1))  # ...while another write succeeds
    await settle()
    assert (STATES, "ok") in [key for _, key in store.log]
    store.fail.set()
    await settle()
    assert wb.mode is Mode.FIRESTORE, "the store answers: not an outage"


async def test_a_document_failing_again_while_others_succeed_is_backed_off_alone(
    clock: ManualClock,
) -> None:
    store = OneDocumentFails()
    wb = make(store, clock)
    await wb.start()
    try:
        await stuck_while_others_land(store, wb, clock)
        assert wb.status().pending_documents == 1
        store.failing.clear()
        # Past any attempt's backoff: the queue times its retries by this
        # clock, but waits for them in real time, so a slow machine may
        # have made one more (failing) attempt above.
        clock.advance(WriteBehindConfig().retry_max_backoff)
        wb.wake()
        await settle()
        assert await store.get(STATES, "stuck") == {"v": 1}
        assert wb.status().pending_documents == 0
    finally:
        await wb.close(1.0)


@pytest.mark.parametrize("draw", [0.5, 1.0])
async def test_a_document_backed_off_alone_waits_half_to_all_of_its_doubling_delay(
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    draw: float,
) -> None:
    # Two instances whose transactions on one document abort each other
    # would retry in step forever on a fixed delay: the draw spreads them.
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return draw

    monkeypatch.setattr("samvad.writebehind.random.uniform", uniform)
    store = OneDocumentFails()
    wb = make(store, clock)
    await wb.start()
    try:
        await stuck_while_others_land(store, wb, clock)
    finally:
        store.failing.clear()
        await wb.close(1.0)
    retries = [
        record.getMessage()
        for record in caplog.records
        if "answers other writes but failed again" in record.getMessage()
    ]
    assert retries, "the isolated document was backed off"
    for text in retries:
        attempt = int(text.split("(attempt ")[1].split(",")[0])
        nominal = min(WriteBehindConfig().retry_max_backoff, 0.5 * 2**attempt)
        assert text.endswith(f"retrying in {nominal * draw:.1f}s"), text
    assert (0.5, 1.0) in draws


async def test_writes_failing_right_after_a_recovery_still_mean_an_outage(
    clock: ManualClock,
) -> None:
    store = OneDocumentFails()
    wb = make(store, clock)
    await wb.start()
    try:
        store.down = True
        wb.submit(state("a", v=1))
        await settle()
        assert wb.mode is Mode.MEMORY
        store.gate.clear()  # the replayed write will wait in flight
        store.down = False
        await recovered(store, wb)
        store.down = True  # down again before any write succeeded
        store.gate.set()
        await settle()
        assert wb.mode is Mode.MEMORY
        store.down = False
        await asyncio.wait_for(wb.flush(), 5)
        assert [key[1] for _, key in store.log] == ["a"]
    finally:
        await wb.close(1.0)


async def test_a_deferred_touch_is_not_replay_lag_until_it_is_overdue(
    wb: WriteBehind, clock: ManualClock
) -> None:
    touch = session("s1", "u1", lastActivity=1)
    touch.touch = True
    wb.submit(touch)
    clock.advance(20)
    status = wb.status()
    assert status.oldest_pending_age == pytest.approx(20)
    assert status.replay_lag == 0.0
    clock.advance(15)
    assert wb.status().replay_lag == pytest.approx(5)


async def test_a_write_joining_a_deferred_touch_starts_its_lag_from_then(
    wb: WriteBehind, store: FlakyStore, clock: ManualClock
) -> None:
    store.gate.clear()  # nothing completes: the entry stays pending
    touch = session("s1", "u1", lastActivity=1)
    touch.touch = True
    wb.submit(touch)
    clock.advance(20)
    wb.submit(session("s1", "u1", status="ended"))
    clock.advance(1)
    status = wb.status()
    assert status.oldest_pending_age == pytest.approx(21)
    assert status.replay_lag == pytest.approx(1)
    store.gate.set()


async def test_a_retried_erase_absorbing_a_later_one_lowers_the_barrier(
    wb: WriteBehind, store: FlakyStore, clock: ManualClock
) -> None:
    store.gate.clear()
    wb.submit(Erase(EraseScope.USER, "u1"))
    await settle()
    assert wb.status().pending_in_flight == 1
    wb.submit(Erase(EraseScope.USER, "u1"))  # queued beside the one in flight
    store.rejecting.add(("erase:user", "u1"))
    store.gate.set()
    await settle()
    assert wb.pending_count == 1, "the failed erase took the queued one in"
    store.rejecting.clear()
    clock.advance(1)
    wb.wake()
    await settle()
    assert not wb.erased((("user", "u1"),)), "one retry satisfies both erases"
    wb.submit(state("u1", after=True))
    await asyncio.wait_for(wb.flush(), 5)
    assert await store.get(STATES, "u1") == {"after": True}


async def test_read_returns_the_stored_value_with_the_writes_to_lay_over_it(
    wb: WriteBehind, store: FlakyStore
) -> None:
    await store.write_fields(state("u1", stored=1))
    store.gate.clear()
    wb.submit(state("u1", pending=2))
    read = await wb.read(
        lambda: store.get(STATES, "u1"),
        barriers=(("user", "u1"),),
        pending=lambda: wb.pending_writes((STATES, "u1")),
    )
    assert read.value == {"stored": 1}
    assert read.stored and not read.erased and read.complete
    # Listed before and after the read: laying a write over twice is harmless.
    assert read.writes and all(
        isinstance(w, FieldsWrite) and w.fields == {"pending": 2} for w in read.writes
    )
    store.gate.set()


async def test_read_keeps_a_write_confirmed_while_it_runs(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.gate.clear()
    wb.submit(state("u1", v=1))
    await settle()
    answer = asyncio.Event()

    async def slow_get() -> object:
        await answer.wait()
        return None  # the snapshot predates the write's commit

    reading = asyncio.create_task(
        wb.read(slow_get, pending=lambda: wb.pending_writes((STATES, "u1")))
    )
    await settle()
    store.gate.set()
    await asyncio.wait_for(wb.flush(), 5)
    answer.set()
    read = await reading
    assert [w.key for w in read.writes] == [(STATES, "u1")]


async def test_read_reads_again_behind_an_erase_that_came_in_during_it(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.gate.clear()  # the erase stays pending
    answers: list[asyncio.Event] = []

    async def fetch() -> int:
        answer = asyncio.Event()
        answers.append(answer)
        await answer.wait()
        return len(answers)

    reading = asyncio.create_task(wb.read(fetch))
    await settle()
    wb.submit(Erase(EraseScope.USER, "someone"))
    answers[0].set()
    await settle()
    assert len(answers) == 2, "the first answer may predate the erase: read again"
    answers[1].set()
    read = await reading
    assert read.value == 2 and read.stored
    store.gate.set()


async def test_read_behind_a_pending_erase_does_not_touch_the_store(
    wb: WriteBehind, store: FlakyStore
) -> None:
    wb.submit(state("u1", old=1))
    store.gate.clear()
    await settle()  # the old write is in flight
    wb.submit(Erase(EraseScope.USER, "u1"))
    wb.submit(state("u1", new=2))
    calls = 0

    async def fetch() -> None:
        nonlocal calls
        calls += 1

    read = await wb.read(
        fetch, barriers=(("user", "u1"),), pending=lambda: wb.pending_writes((STATES, "u1"))
    )
    assert calls == 0
    assert read.erased and read.complete and not read.stored and read.value is None
    assert [w.fields for w in read.writes if isinstance(w, FieldsWrite)] == [{"new": 2}]
    store.gate.set()


async def test_read_in_memory_mode_or_on_a_store_error_never_raises(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.down = True
    read = await wb.read(lambda: store.get(STATES, "u1"))
    assert wb.mode is Mode.MEMORY
    assert not read.stored and not read.complete and read.value is None
    reads = store.reads
    store.down = False
    read = await wb.read(lambda: store.get(STATES, "u1"))
    assert not read.stored and store.reads == reads, "memory mode does not wait on the store"
    await asyncio.wait_for(wb.flush(), 5)


async def test_a_committed_profile_is_kept_for_the_layer_above_to_take(
    wb: WriteBehind, store: FlakyStore
) -> None:
    await store.write_profile(message("u1", 0), now=T0)  # another instance's message
    wb.submit(message("u1", 1))
    await asyncio.wait_for(wb.flush(), 5)
    committed = wb.take_committed_profiles()
    assert [[m.id for m in p.history] for p in committed] == [["u1-000", "u1-001"]]
    assert wb.take_committed_profiles() == (), "taking them empties the list"


async def test_an_erase_drops_a_commit_not_yet_taken(wb: WriteBehind, store: FlakyStore) -> None:
    wb.submit(message("u1", 1))
    wb.submit(message("u2", 1))
    await asyncio.wait_for(wb.flush(), 5)
    wb.submit(Erase(EraseScope.USER, "u1"))
    assert [p.user_id for p in wb.take_committed_profiles()] == ["u2"]


async def test_a_profile_committed_while_its_user_is_being_erased_is_not_kept(
    wb: WriteBehind, store: FlakyStore
) -> None:
    store.gate.clear()
    wb.submit(message("u1", 1))
    await settle()  # in flight
    wb.submit(Erase(EraseScope.USER, "u1"))
    wb.take_committed_profiles()
    store.gate.set()
    await asyncio.wait_for(wb.flush(), 5)
    assert wb.take_committed_profiles() == ()


# -- folding writes that merge maps --------------------------------------------------------

_MAPS = st.dictionaries(st.sampled_from("abc"), st.integers(0, 3), max_size=3)
_FIELD_WRITES = st.dictionaries(
    st.sampled_from(["metadata", "lang"]),
    st.tuples(_MAPS | st.none(), st.booleans()),  # merged key by key (maps only), or whole
    min_size=1,
).map(
    lambda parts: FieldsWrite(
        collection=SESSIONS,
        doc_id="s1",
        user_id="u1",
        fields={name: value for name, (value, _) in parts.items()},
        merge=tuple(
            name for name, (value, merged) in sorted(parts.items()) if merged and value is not None
        ),
    )
)


@settings(max_examples=400, deadline=None)
@given(
    st.none() | st.fixed_dictionaries({}, optional={"metadata": _MAPS | st.none(), "lang": _MAPS}),
    st.lists(_FIELD_WRITES, min_size=2, max_size=4),
)
def test_writes_folded_into_one_make_the_document_they_make_one_by_one(
    stored: dict[str, object] | None, writes: list[FieldsWrite]
) -> None:
    one_by_one = stored
    for write in writes:
        one_by_one = write.apply_to(one_by_one)
    folded = copy.deepcopy(writes[0])
    for write in writes[1:]:
        folded.absorb(copy.deepcopy(write))
    assert folded.apply_to(stored) == one_by_one


def test_the_parts_of_a_refused_write_keep_what_it_may_do() -> None:
    # Written one by one to find the refused one: an update of a session that
    # must exist stays one, and a merged map stays merged.
    write = FieldsWrite(
        collection=SESSIONS,
        doc_id="s1",
        user_id="u1",
        session_id="s1",
        fields={"status": "ended", "metadata": {"a": 1}},
        defaults={"createdAt": datetime(2025, 1, 9, tzinfo=UTC)},
        must_exist=True,
        merge=("metadata",),
    )
    parts = _split(write)
    assert [(p.fields, p.must_exist, p.merge, p.defaults) for p in parts] == [  # type: ignore[union-attr]
        ({"status": "ended"}, True, (), write.defaults),
        ({"metadata": {"a": 1}}, True, ("metadata",), write.defaults),
    ]
    assert _joined(parts) == write


class Contended(FlakyStore):
    """Two writers of one document abort each other, as Firestore transactions
    contending for a document's lock can: a write that finds another in flight
    on its document (or sees one arrive while it holds it) fails, unavailable."""

    def __init__(self) -> None:
        super().__init__()
        self.holding: dict[Key, int] = {}
        self.clashed: set[Key] = set()

    async def _enter(self, key: Key) -> None:
        await super()._enter(key)
        self.holding[key] = self.holding.get(key, 0) + 1
        if self.holding[key] > 1:
            self.clashed.add(key)
        try:
            await asyncio.sleep(0.005)
        finally:
            self.holding[key] -= 1
        if key in self.clashed:
            if not self.holding[key]:
                self.clashed.discard(key)
            raise StoreUnavailable("aborted: the document is locked by another writer (test)")


async def test_two_instances_that_lose_the_store_together_do_not_stay_in_step() -> None:
    """Both fail on one document, both fall back to memory and probe: were their
    probes as regular as a clock, both would come back, replay and abort each
    other again, forever. Jittered probes part them, and both writes land."""
    store = Contended()
    config = {"probe_interval": 0.05, "probe_max_interval": 0.05, "flush_interval": 0.01}
    queues = [make(store, SystemClock(), **config) for _ in range(2)]  # type: ignore[arg-type]
    for queue in queues:
        await queue.start()
    try:
        for n, queue in enumerate(queues):
            queue.submit(state("shared", **{f"from{n}": n}))
        await asyncio.wait_for(asyncio.gather(*(queue.flush() for queue in queues)), 10)
        assert await store.get(STATES, "shared") == {"from0": 0, "from1": 1}
        assert store.pings > 0, "the writers never fell back to memory: nothing was tested"
    finally:
        for queue in queues:
            await queue.close(1.0)
