"""One contract, every backend: the memory store and the Firestore store (on the
real emulator) must behave the same."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from samvad.documents import IDEMPOTENCY_KEYS, INTERRUPTIONS, PROFILES, SESSIONS, STATES
from samvad.firestore_client import make_client
from samvad.models import Message, Role, SessionStatus
from samvad.stores.base import (
    HistoryBounds,
    SessionCursor,
    Store,
    StoreRejected,
    StoreUnavailable,
)
from samvad.stores.firestore import FirestoreStore
from samvad.stores.memory import MemoryStore
from samvad.writes import Erase, EraseScope, FieldsWrite, ProfileWrite

T0 = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)
BOUNDS = HistoryBounds(cap=5, max_bytes=4096)


@pytest.fixture(params=["memory", pytest.param("firestore", marks=pytest.mark.firestore)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        backend: Store = MemoryStore(bounds=BOUNDS)
    else:
        host = request.getfixturevalue("firestore_emulator")
        project = request.getfixturevalue("firestore_project")
        # A deadline well past the emulator's lock waits: three contending
        # profile writers (test_concurrent_profile_writes_lose_nothing) wait
        # about 2 s each, and a 5 s deadline once cut the last one short on a
        # busy machine. The contract is about what is stored, not how fast.
        backend = FirestoreStore(
            lambda: make_client(project=project, emulator_host=host), bounds=BOUNDS, deadline=15.0
        )
    async with backend:
        yield backend


def fields(collection: str, doc_id: str, user: str, **values: object) -> FieldsWrite:
    session_id = doc_id if collection == SESSIONS else None
    return FieldsWrite(
        collection=collection, doc_id=doc_id, user_id=user, session_id=session_id, fields=values
    )


def msg(i: int, content: str = "hi", *, session: str | None = None) -> Message:
    return Message(
        id=f"m{i:04d}",
        role=Role.USER if i % 2 == 0 else Role.ASSISTANT,
        content=content,
        timestamp=T0 + timedelta(seconds=i),
        session_id=session,
    )


def session_doc(user: str, *, status: str = "active", at: int = 0) -> dict[str, object]:
    return {
        "userId": user,
        "status": status,
        "isActive": status == "active",
        "lastActivity": T0 + timedelta(seconds=at),
    }


async def test_get_of_a_missing_document_is_none(store: Store) -> None:
    assert await store.get(STATES, "nobody") is None


async def test_ping_answers(store: Store) -> None:
    await store.ping()


async def test_fields_replace_top_level_values_whole_and_keep_the_others(store: Store) -> None:
    await store.write_fields(fields(STATES, "u1", "u1", ctx={"a": 1, "b": 2}, lang="en"))
    await store.write_fields(fields(STATES, "u1", "u1", ctx={"a": 9}))
    assert await store.get(STATES, "u1") == {"ctx": {"a": 9}, "lang": "en"}


async def test_field_names_with_dots_and_unicode_are_literal(store: Store) -> None:
    await store.write_fields(fields(STATES, "u1", "u1", **{"a.b": 1, "naïve key": "✓"}))
    await store.write_fields(fields(STATES, "u1", "u1", **{"a.b": 2}))
    assert await store.get(STATES, "u1") == {"a.b": 2, "naïve key": "✓"}


async def test_defaults_are_written_only_where_missing(store: Store) -> None:
    first = fields(SESSIONS, "s1", "u1", userId="u1")
    first.defaults = {"createdAt": T0}
    await store.write_fields(first)
    second = fields(SESSIONS, "s1", "u1", userId="u1", language="hi")
    second.defaults = {"createdAt": T0 + timedelta(days=1)}
    await store.write_fields(second)
    assert await store.get(SESSIONS, "s1") == {"userId": "u1", "createdAt": T0, "language": "hi"}


@pytest.mark.parametrize("with_defaults", [False, True])
async def test_merged_maps_take_the_keys_given_and_keep_the_stored_ones(
    store: Store, with_defaults: bool
) -> None:
    def merging(**values: object) -> FieldsWrite:
        write = fields(SESSIONS, "s1", "u1", userId="u1", **values)
        write.merge = ("metadata",)
        if with_defaults:
            write.defaults = {"createdAt": T0}
        return write

    await store.write_fields(merging(metadata={"a": 1, "b": {"x": 1}}))  # creates it
    await store.write_fields(merging(metadata={"b": {"y": 2}, "c": 3}, lang="hi"))
    doc = await store.get(SESSIONS, "s1")
    assert doc is not None
    # Key by key at the top of the map; each key's value replaced whole.
    assert doc["metadata"] == {"a": 1, "b": {"y": 2}, "c": 3}
    assert doc["lang"] == "hi"
    # Not named in merge: replaced whole as ever.
    await store.write_fields(fields(SESSIONS, "s1", "u1", metadata={"z": 0}))
    assert (await store.get(SESSIONS, "s1") or {})["metadata"] == {"z": 0}


@pytest.mark.parametrize("with_defaults", [False, True])
async def test_a_must_exist_write_never_creates_the_document(
    store: Store, with_defaults: bool
) -> None:
    update = fields(SESSIONS, "s1", "u1", status="ended")
    update.must_exist = True
    if with_defaults:
        update.defaults = {"createdAt": T0}
    await store.write_fields(update)
    assert await store.get(SESSIONS, "s1") is None
    await store.write_fields(fields(SESSIONS, "s1", "u1", userId="u1", status="active"))
    await store.write_fields(update)
    doc = await store.get(SESSIONS, "s1")
    assert doc is not None
    assert doc["status"] == "ended"


async def test_a_write_of_another_user_never_changes_a_session_they_do_not_own(
    store: Store,
) -> None:
    # What an instance in memory-only mode may submit for a session id it
    # could not look up: a create by "intruder" of u1's session.
    await store.write_fields(fields(SESSIONS, "s1", "u1", userId="u1", status="active", x=1))
    takeover = fields(SESSIONS, "s1", "intruder", userId="intruder", metadata={"y": 2})
    takeover.defaults = {"createdAt": T0}
    with pytest.raises(StoreRejected):
        await store.write_fields(takeover)
    ended = fields(SESSIONS, "s1", "intruder", status="ended")
    ended.must_exist = True
    ended.defaults = {"createdAt": T0}
    with pytest.raises(StoreRejected):
        await store.write_fields(ended)
    assert await store.get(SESSIONS, "s1") == {"userId": "u1", "status": "active", "x": 1}
    # Its owner writes on, and a session nobody has is anybody's to create.
    mine = fields(SESSIONS, "s1", "u1", status="ended")
    mine.defaults = {"createdAt": T0}
    await store.write_fields(mine)
    fresh = fields(SESSIONS, "s2", "intruder", userId="intruder")
    fresh.defaults = {"createdAt": T0}
    await store.write_fields(fresh)
    assert (await store.get(SESSIONS, "s1") or {})["status"] == "ended"
    assert (await store.get(SESSIONS, "s2") or {})["userId"] == "intruder"


async def test_timestamps_round_trip_as_utc(store: Store) -> None:
    await store.write_fields(fields(STATES, "u1", "u1", updatedAt=T0))
    doc = await store.get(STATES, "u1")
    assert doc is not None
    assert doc["updatedAt"] == T0
    assert doc["updatedAt"].utcoffset() == timedelta(0)


async def test_profile_appends_in_order_and_applies_the_cap(store: Store) -> None:
    profile = await store.write_profile(
        ProfileWrite(user_id="u1", append=[msg(i) for i in range(3)]), now=T0
    )
    assert [m.id for m in profile.history] == ["m0000", "m0001", "m0002"]
    assert profile.created_at == T0
    later = T0 + timedelta(minutes=1)
    profile = await store.write_profile(
        ProfileWrite(user_id="u1", append=[msg(i) for i in range(3, 8)]), now=later
    )
    assert [m.id for m in profile.history] == [f"m{i:04d}" for i in range(3, 8)]
    assert (profile.created_at, profile.last_updated) == (T0, later)
    doc = await store.get(PROFILES, "u1")
    assert doc is not None
    assert doc["historyLength"] == 5
    assert doc["userId"] == "u1"
    assert [m["id"] for m in doc["conversationHistory"]] == [f"m{i:04d}" for i in range(3, 8)]
    assert doc["conversationHistory"][0]["role"] == "assistant"
    assert doc["conversationHistory"][0]["timestamp"] == T0 + timedelta(seconds=3)


async def test_profile_replay_of_the_same_messages_is_idempotent(store: Store) -> None:
    write = ProfileWrite(user_id="u1", append=[msg(0), msg(1)])
    await store.write_profile(write, now=T0)
    profile = await store.write_profile(write, now=T0)
    assert [m.id for m in profile.history] == ["m0000", "m0001"]


async def test_profile_is_bounded_in_bytes(store: Store) -> None:
    big = "x" * 1500
    profile = await store.write_profile(
        ProfileWrite(user_id="u1", append=[msg(i, big) for i in range(5)]), now=T0
    )
    assert profile.history_bytes <= BOUNDS.max_bytes
    assert [m.id for m in profile.history] == ["m0003", "m0004"]


async def test_profile_preferences_merge_and_message_flags_survive(store: Store) -> None:
    flagged = Message(
        id="mx",
        role=Role.ASSISTANT,
        content="Our rates start at",
        timestamp=T0,
        session_id="s1",
        interrupted=True,
        seq=7,
    )
    await store.write_profile(
        ProfileWrite(user_id="u1", append=[flagged], preferences={"language": "en", "speed": 1.0}),
        now=T0,
    )
    profile = await store.write_profile(
        ProfileWrite(user_id="u1", preferences={"speed": 1.5}), now=T0
    )
    assert profile.preferences == {"language": "en", "speed": 1.5}
    assert profile.history == (flagged,)


async def test_a_stored_profile_is_not_aliased_by_its_writer_or_its_readers(
    store: Store,
) -> None:
    preferences: dict[str, object] = {"voice": {"speed": 1.0}}
    write = ProfileWrite(user_id="u1", append=[msg(0)], preferences=preferences)
    await store.write_profile(write, now=T0)
    preferences["voice"] = {"speed": 9.0}  # the writer changes what it wrote...
    write.append.append(msg(1))
    doc = await store.get(PROFILES, "u1")
    assert doc is not None
    doc["preferences"]["voice"]["speed"] = 7.0  # ...and a reader what it read
    doc["conversationHistory"].clear()
    again = await store.get(PROFILES, "u1")
    assert again is not None
    assert again["preferences"] == {"voice": {"speed": 1.0}}
    assert [m["id"] for m in again["conversationHistory"]] == ["m0000"]


async def test_erasing_a_user_deletes_everything_of_theirs_only(store: Store) -> None:
    await store.write_fields(fields(STATES, "u1", "u1", a=1))
    await store.write_fields(fields(STATES, "u2", "u2", a=1))
    await store.write_profile(ProfileWrite(user_id="u1", append=[msg(0)]), now=T0)
    for i in range(3):
        await store.write_fields(fields(SESSIONS, f"s{i}", "u1", **session_doc("u1", at=i)))
    await store.write_fields(fields(SESSIONS, "other", "u2", **session_doc("u2")))
    await store.write_fields(
        FieldsWrite(
            collection=INTERRUPTIONS,
            doc_id="i1",
            user_id="u1",
            session_id="s0",
            fields={"userId": "u1", "sessionId": "s0"},
        )
    )
    counts = await store.erase(Erase(EraseScope.USER, "u1"))
    assert (counts.sessions, counts.interruptions) == (3, 1)
    for collection, doc_id in [
        (STATES, "u1"),
        (PROFILES, "u1"),
        (SESSIONS, "s0"),
        (INTERRUPTIONS, "i1"),
    ]:
        assert await store.get(collection, doc_id) is None
    assert await store.get(STATES, "u2") == {"a": 1}
    assert await store.get(SESSIONS, "other") is not None


async def test_erasing_a_user_deletes_their_idempotency_records_only(store: Store) -> None:
    for doc_id, user in [("k1", "u1"), ("k2", "u1"), ("k3", "u2")]:
        record = {"userId": user, "status": 200, "body": "{}", "expireAt": T0}
        await store.write_fields(fields(IDEMPOTENCY_KEYS, doc_id, user, **record))
    await store.erase(Erase(EraseScope.USER, "u1"))
    assert await store.get(IDEMPOTENCY_KEYS, "k1") is None
    assert await store.get(IDEMPOTENCY_KEYS, "k2") is None
    assert await store.get(IDEMPOTENCY_KEYS, "k3") == {
        "userId": "u2",
        "status": 200,
        "body": "{}",
        "expireAt": T0,
    }


async def test_erasing_a_session_deletes_it_and_its_interruptions(store: Store) -> None:
    await store.write_fields(fields(SESSIONS, "s1", "u1", **session_doc("u1")))
    await store.write_fields(fields(SESSIONS, "s2", "u1", **session_doc("u1")))
    for i, sid in enumerate(["s1", "s1", "s2"]):
        await store.write_fields(
            FieldsWrite(
                collection=INTERRUPTIONS,
                doc_id=f"i{i}",
                user_id="u1",
                session_id=sid,
                fields={"userId": "u1", "sessionId": sid},
            )
        )
    counts = await store.erase(Erase(EraseScope.SESSION, "s1"))
    assert (counts.sessions, counts.interruptions) == (1, 2)
    assert await store.get(SESSIONS, "s1") is None
    assert await store.get(SESSIONS, "s2") is not None
    assert (await store.erase(Erase(EraseScope.SESSION, "s1"))).sessions == 0


async def test_list_sessions_orders_newest_first_and_pages_with_a_cursor(store: Store) -> None:
    for i in range(5):
        status = "ended" if i == 2 else "active"
        await store.write_fields(
            fields(SESSIONS, f"s{i}", "u1", **session_doc("u1", status=status, at=i))
        )
    await store.write_fields(fields(SESSIONS, "x", "u2", **session_doc("u2", at=10)))
    rows, cursor = await store.list_sessions(user_id="u1", status=None, limit=2)
    assert [r[0] for r in rows] == ["s4", "s3"]
    assert cursor is not None
    cursor = SessionCursor.decode(cursor.encode())
    rows, cursor = await store.list_sessions(user_id="u1", status=None, limit=2, cursor=cursor)
    assert [r[0] for r in rows] == ["s2", "s1"]
    assert cursor is not None
    rows, cursor = await store.list_sessions(user_id="u1", status=None, limit=2, cursor=cursor)
    assert [r[0] for r in rows] == ["s0"]
    assert cursor is None
    rows, _ = await store.list_sessions(user_id="u1", status=SessionStatus.ACTIVE, limit=10)
    assert [r[0] for r in rows] == ["s4", "s3", "s1", "s0"]
    assert rows[0][1]["lastActivity"] == T0 + timedelta(seconds=4)


async def test_sessions_with_equal_activity_page_by_id(store: Store) -> None:
    for sid in ["a", "b", "c"]:
        await store.write_fields(fields(SESSIONS, sid, "u1", **session_doc("u1", at=0)))
    rows, cursor = await store.list_sessions(user_id="u1", status=None, limit=2)
    assert [r[0] for r in rows] == ["c", "b"]
    rows, _ = await store.list_sessions(user_id="u1", status=None, limit=2, cursor=cursor)
    assert [r[0] for r in rows] == ["a"]


async def test_idle_sessions_are_the_active_ones_older_than_the_cutoff(store: Store) -> None:
    await store.write_fields(fields(SESSIONS, "old", "u1", **session_doc("u1", at=0)))
    await store.write_fields(fields(SESSIONS, "older", "u2", **session_doc("u2", at=-5)))
    await store.write_fields(fields(SESSIONS, "new", "u1", **session_doc("u1", at=100)))
    await store.write_fields(fields(SESSIONS, "ended", "u1", **session_doc("u1", status="ended")))
    rows = await store.idle_sessions(before=T0 + timedelta(seconds=50), limit=10)
    assert [r[0] for r in rows] == ["older", "old"]


async def test_counts_are_aggregations(store: Store) -> None:
    await store.write_fields(fields(STATES, "u1", "u1", isActive=True))
    await store.write_fields(fields(STATES, "u2", "u2", isActive=False))
    await store.write_profile(ProfileWrite(user_id="u1", append=[msg(0)]), now=T0)
    await store.write_fields(fields(SESSIONS, "s1", "u1", **session_doc("u1")))
    await store.write_fields(fields(SESSIONS, "s2", "u1", **session_doc("u1", status="ended")))
    counts = await store.counts()
    assert (counts.active_users, counts.active_sessions, counts.total_profiles) == (1, 1, 1)
    assert counts.total_interruptions == 0


_CONTENDED_ATTEMPTS = 5


@pytest.mark.timeout(300)  # each failed attempt waits out 10 lock timeouts, about 21 s
async def test_concurrent_profile_writes_lose_nothing(store: Store) -> None:
    async def writer(i: int) -> None:
        # Under contention the emulator can abort a transaction more often
        # than the library tries it (10 attempts, CI 2026-11-30): the write is
        # then reported unavailable, and its caller (the write-behind) writes
        # it again after a backoff. What the contract promises is that the
        # writes that succeed, retried or not, all land, each message once.
        # Writers that fail together retry together, and the library's own
        # attempts keep them in step (each waits out the same lock): on a cold
        # emulator all three failed every attempt 0.05-0.3 s apart. Backing
        # off with full jitter, growing, as the write-behind does, sets them
        # apart.
        for attempt in range(_CONTENDED_ATTEMPTS):
            try:
                await store.write_profile(
                    ProfileWrite(user_id="u1", append=[msg(i)]), now=T0 + timedelta(seconds=i)
                )
                return
            except StoreUnavailable:
                if attempt == _CONTENDED_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(random.uniform(0, 2.0 * 2**attempt))

    # Three writers: the emulator makes each conflicting transaction wait
    # about 2 s for the document's lock, so more only makes the test slow.
    await asyncio.gather(*(writer(i) for i in range(3)))
    doc = await store.get(PROFILES, "u1")
    assert doc is not None
    assert sorted(m["id"] for m in doc["conversationHistory"]) == [f"m{i:04d}" for i in range(3)]


# -- queries by field (the ADK session service's reads and erasures) ---------


async def test_select_returns_the_documents_matching_every_field_in_id_order(
    store: Store,
) -> None:
    await store.write_fields(fields("adk_x", "b", "u1", app="a1", owner="u1", n=1))
    await store.write_fields(fields("adk_x", "a", "u1", app="a1", owner="u1", n=2))
    await store.write_fields(fields("adk_x", "c", "u2", app="a1", owner="u2", n=3))
    await store.write_fields(fields("adk_x", "d", "u1", app="a2", owner="u1", n=4))
    await store.write_fields(fields("adk_x", "e", "u1", owner="u1", n=5))  # no app at all
    rows = await store.select("adk_x", where={"app": "a1", "owner": "u1"})
    assert rows == [
        ("a", {"app": "a1", "owner": "u1", "n": 2}),
        ("b", {"app": "a1", "owner": "u1", "n": 1}),
    ]
    assert [doc_id for doc_id, _ in await store.select("adk_x", where={"app": "a1"})] == [
        "a",
        "b",
        "c",
    ]
    assert await store.select("adk_x", where={"app": "nobody"}) == []


async def test_select_matches_field_names_with_dots_literally(store: Store) -> None:
    await store.write_fields(fields("adk_x", "a", "u1", **{"a.b": "v", "a": {"b": "w"}}))
    assert [r[0] for r in await store.select("adk_x", where={"a.b": "v"})] == ["a"]
    assert await store.select("adk_x", where={"a.b": "w"}) == []


async def test_delete_where_deletes_only_the_matching_documents(store: Store) -> None:
    for i in range(7):
        user = "u1" if i % 2 == 0 else "u2"
        await store.write_fields(fields("adk_x", f"d{i}", user, owner=user))
    assert await store.delete_where("adk_x", where={"owner": "u1"}) == 4
    assert [r[0] for r in await store.select("adk_x", where={"owner": "u2"})] == ["d1", "d3", "d5"]
    assert await store.select("adk_x", where={"owner": "u1"}) == []
    assert await store.delete_where("adk_x", where={"owner": "u1"}) == 0


@pytest.mark.firestore
async def test_writes_that_settle_left_open_transactions_together_take_each_off_once(
    firestore_emulator: str, firestore_project: str
) -> None:
    """After an outage each write first rolls back the transactions that the
    outage left open (``FirestoreStore._settle_orphans``); concurrent writes
    do so together. Each id comes off the list once it has been rolled back,
    by whichever write rolled it back, and never one that nobody has: four
    writes over three left-open ids (unknown to the emulator, which answers
    them as transactions already gone) all land."""
    store = FirestoreStore(
        lambda: make_client(project=firestore_project, emulator_host=firestore_emulator),
        bounds=BOUNDS,
        deadline=15.0,
    )
    async with store:
        store._orphans.extend([b"left-open-1", b"left-open-2", b"left-open-3"])
        await asyncio.gather(
            *(
                store.write_profile(ProfileWrite(user_id=f"u{i}", append=[msg(i)]), now=T0)
                for i in range(4)
            )
        )
        assert not store._orphans
        for i in range(4):
            doc = await store.get(PROFILES, f"u{i}")
            assert doc is not None
            assert [m["id"] for m in doc["conversationHistory"]] == [f"m{i:04d}"]
