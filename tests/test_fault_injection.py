"""Firestore cut mid-run and restored (a TCP proxy in front of the real emulator,
which keeps its data): callers see no error, reads and writes keep working in
memory, and everything acknowledged is in Firestore afterwards, in order, with
the cap applied."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from google.cloud.firestore import AsyncClient

from samvad.config import Settings
from samvad.documents import PROFILES, SESSIONS, STATES
from samvad.firestore_client import make_client
from samvad.models import Message, Mode, Role
from samvad.persistence import Persistence
from samvad.stores.base import HistoryBounds, StoreUnavailable
from samvad.stores.firestore import FirestoreStore
from samvad.writes import ProfileWrite
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.firestore

SETTINGS = Settings(
    flush_interval=0.05,
    flush_linger=0.0,
    firestore_deadline=1.0,
    probe_interval=0.05,
    probe_max_interval=0.2,
    shutdown_flush_deadline=30.0,
)


@pytest.fixture
async def persistence(
    fault_proxy: FaultProxy, firestore_project: str
) -> AsyncIterator[Persistence]:
    store = FirestoreStore(
        lambda: make_client(project=firestore_project, emulator_host=fault_proxy.host_port),
        bounds=HistoryBounds(cap=SETTINGS.history_cap, max_bytes=SETTINGS.history_max_bytes),
        deadline=SETTINGS.firestore_deadline,
    )
    async with store, Persistence(store, settings=SETTINGS) as p:
        yield p


def store_at(
    host_port: str, project: str, *, deadline: float, kind: type[FirestoreStore] = FirestoreStore
) -> FirestoreStore:
    """A store of ``project`` reached at ``host_port`` (the fault proxy or the emulator)."""
    return kind(lambda: make_client(project=project, emulator_host=host_port), deadline=deadline)


async def doc(client: AsyncClient, collection: str, doc_id: str) -> dict[str, object] | None:
    snapshot = await client.collection(collection).document(doc_id).get()
    return snapshot.to_dict() if snapshot.exists else None


async def answering(store: FirestoreStore, *, within: float) -> None:
    """Ping ``store`` until Firestore answers, as the prober does."""
    async with asyncio.timeout(within):
        while True:
            try:
                await store.ping()
                return
            except StoreUnavailable:
                await asyncio.sleep(0.1)


async def wait_for_mode(p: Persistence, mode: Mode) -> None:
    # Polling a state the queue reaches on its own (probe intervals of 50 ms);
    # the timeout only bounds a failure.
    async with asyncio.timeout(30):
        while p.mode is not mode:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_cut_mid_run_loses_nothing_and_replays_in_order(
    persistence: Persistence, fault_proxy: FaultProxy, firestore_client: AsyncClient
) -> None:
    p = persistence
    p.save_state("alice", {"language": "en", "topic": "loans"})
    for i in range(10):
        p.append_message("alice", role=Role.USER, content=f"before {i}")
    await p.save_session("s-alice", user_id="alice", language="en")
    await asyncio.wait_for(p.writes.flush(), 30)
    await p.settle()  # the views the writes warmed are in memory
    assert (await doc(firestore_client, PROFILES, "alice")) is not None

    fault_proxy.cut()
    # Writes keep landing in memory (none raises, each is served below and
    # replayed after the restore); the first flush attempt discovers the
    # outage. (How fast they return is a benchmark's business: a bound on
    # the wall clock here failed once on a loaded machine at 1.0017 s.)
    for i in range(150):
        p.append_message(
            "alice", role=Role.USER if i % 2 else Role.ASSISTANT, content=f"during {i}"
        )
    p.save_state("alice", {"topic": "insurance"})
    p.save_state("bob", {"language": "hi"})
    p.append_message("bob", role=Role.USER, content="namaste")
    await p.save_session("s-bob", user_id="bob", language="hi")
    await p.end_session("s-alice")
    await wait_for_mode(p, Mode.MEMORY)

    # Reads are served from memory, including data never read before the cut.
    state = await p.get_state("alice")
    assert state is not None and state.data == {"language": "en", "topic": "insurance"}
    bob = await p.get_state("bob")
    assert bob is not None and bob.data == {"language": "hi"}
    profile = await p.get_profile("alice")
    assert profile is not None and len(profile.history) == 100
    assert profile.history[-1].content == "during 149"
    ended = await p.get_session("s-alice")
    assert ended is not None and not ended.is_active
    status = p.status()
    assert status.mode is Mode.MEMORY and status.pending_documents >= 5
    assert status.last_error is not None

    fault_proxy.restore()
    await wait_for_mode(p, Mode.FIRESTORE)
    await asyncio.wait_for(p.writes.flush(), 60)

    stored = await doc(firestore_client, PROFILES, "alice")
    assert stored is not None
    contents = [m["content"] for m in stored["conversationHistory"]]  # type: ignore[index]
    assert contents == [f"during {i}" for i in range(50, 150)]
    assert stored["historyLength"] == 100
    assert await doc(firestore_client, STATES, "alice") == {
        "language": "en",
        "topic": "insurance",
        "updatedAt": state.updated_at,
        "isActive": True,
    }
    bob_profile = await doc(firestore_client, PROFILES, "bob")
    assert bob_profile is not None
    assert [m["content"] for m in bob_profile["conversationHistory"]] == ["namaste"]  # type: ignore[index]
    session_alice = await doc(firestore_client, SESSIONS, "s-alice")
    assert session_alice is not None and session_alice["status"] == "ended"
    session_bob = await doc(firestore_client, SESSIONS, "s-bob")
    assert session_bob is not None and session_bob["userId"] == "bob"
    assert p.status().pending_documents == 0


@pytest.mark.parametrize("operation", ["read", "transaction"])
async def test_a_call_in_flight_when_the_prober_reconnects_is_an_outage(
    fault_proxy: FaultProxy, firestore_project: str, operation: str
) -> None:
    """grpc.aio fails the calls of a channel closed under them with a bare
    ``CancelledError``. The prober's reconnect closes the old channel: a read
    cut so reached its caller as a cancellation once in CI (a save_session
    during an outage, in the cut-mid-run test above). A write so cut must
    be an outage too, for the queue to requeue it and the store to keep its
    transaction for rollback."""
    # The reconnect, not the deadline, ends the call.
    store = store_at(fault_proxy.host_port, firestore_project, deadline=60.0)
    async with store:
        await store.ping()  # connected
        fault_proxy.stall()  # the connection stays up and carries nothing
        if operation == "read":
            call: Any = store.get(PROFILES, "heidi")
        else:
            call = store.write_profile(ProfileWrite(user_id="heidi"), now=datetime.now(UTC))
        task = asyncio.create_task(call)
        await asyncio.sleep(0.5)
        assert not task.done(), "the call should be waiting on the stalled connection"
        await store.reconnect()
        async with asyncio.timeout(15):
            with pytest.raises(StoreUnavailable):
                await task
        assert not task.cancelled()
        fault_proxy.restore()


async def test_firestore_unreachable_at_start_up(
    fault_proxy: FaultProxy, firestore_project: str, firestore_client: AsyncClient
) -> None:
    fault_proxy.cut()
    store = store_at(fault_proxy.host_port, firestore_project, deadline=SETTINGS.firestore_deadline)
    async with store, Persistence(store, settings=SETTINGS) as p:
        assert p.mode is Mode.MEMORY
        p.save_state("carol", {"language": "ta"})
        p.append_message("carol", role=Role.USER, content="vanakkam")
        await p.save_session("s-carol", user_id="carol")
        assert (await p.list_sessions("carol")).sessions[0].id == "s-carol"
        fault_proxy.restore()
        await wait_for_mode(p, Mode.FIRESTORE)
        await asyncio.wait_for(p.writes.flush(), 60)
    assert (await doc(firestore_client, STATES, "carol")) is not None
    assert (await doc(firestore_client, SESSIONS, "s-carol")) is not None
    profile = await doc(firestore_client, PROFILES, "carol")
    assert profile is not None and profile["historyLength"] == 1


async def test_an_erase_made_during_the_outage_is_replayed_before_later_writes(
    persistence: Persistence, fault_proxy: FaultProxy, firestore_client: AsyncClient
) -> None:
    p = persistence
    p.append_message("dave", role=Role.USER, content="old secret")
    p.save_state("dave", {"old": True})
    await p.save_session("s-dave", user_id="dave")
    await asyncio.wait_for(p.writes.flush(), 30)

    fault_proxy.cut()
    p.append_message("dave", role=Role.USER, content="pending secret")
    await wait_for_mode(p, Mode.MEMORY)
    erasure = await p.erase_user("dave")
    assert erasure.user_profile and erasure.sessions == 1
    p.append_message("dave", role=Role.USER, content="fresh start")
    profile = await p.get_profile("dave")
    assert profile is not None and [m.content for m in profile.history] == ["fresh start"]

    fault_proxy.restore()
    await wait_for_mode(p, Mode.FIRESTORE)
    await asyncio.wait_for(p.writes.flush(), 60)
    stored = await doc(firestore_client, PROFILES, "dave")
    assert stored is not None
    assert [m["content"] for m in stored["conversationHistory"]] == ["fresh start"]  # type: ignore[index]
    assert await doc(firestore_client, STATES, "dave") is None
    assert await doc(firestore_client, SESSIONS, "s-dave") is None


async def test_shutdown_during_an_outage_flushes_once_firestore_returns_within_the_deadline(
    fault_proxy: FaultProxy, firestore_project: str, firestore_client: AsyncClient
) -> None:
    store = store_at(fault_proxy.host_port, firestore_project, deadline=SETTINGS.firestore_deadline)
    async with store:
        p = Persistence(store, settings=SETTINGS)
        await p.start()
        fault_proxy.cut()
        p.append_message("erin", role=Role.USER, content="last words")
        await wait_for_mode(p, Mode.MEMORY)
        closing = asyncio.create_task(p.close())
        await asyncio.sleep(0.3)
        assert not closing.done(), "close() waits for Firestore within its deadline"
        fault_proxy.restore()
        assert await asyncio.wait_for(closing, 60) == 0
    stored = await doc(firestore_client, PROFILES, "erin")
    assert stored is not None and stored["historyLength"] == 1


async def test_a_transaction_cut_before_its_commit_releases_its_locks_when_firestore_returns(
    fault_proxy: FaultProxy, firestore_emulator: str, firestore_project: str
) -> None:
    """The server keeps the locks of a transaction whose commit never arrived
    until it expires (about a minute on the emulator); until then every other
    transaction on the document times out. Samvad rolls it back on recovery."""
    cut_next_commit = True

    class CutBeforeCommit(FirestoreStore):
        async def _transact(self, body: Any) -> Any:
            async def then_cut(transaction: Any) -> Any:
                nonlocal cut_next_commit
                result = await body(transaction)
                if cut_next_commit:
                    cut_next_commit = False
                    fault_proxy.cut()  # the read is done and locked; the commit is lost
                return result

            return await super()._transact(then_cut)

    write = ProfileWrite(
        user_id="frank",
        append=[Message(id="m1", role=Role.USER, content="hello", timestamp=datetime.now(UTC))],
    )
    cut_off = store_at(fault_proxy.host_port, firestore_project, deadline=1.0, kind=CutBeforeCommit)
    # Another instance, straight to the emulator, with a deadline far below
    # the emulator's lock expiry.
    other = store_at(firestore_emulator, firestore_project, deadline=2.0)
    async with cut_off, other:
        await other.write_profile(ProfileWrite(user_id="frank"), now=datetime.now(UTC))
        # The write fails within its deadline (2 x 1 s), not after the
        # library's own rollback retries (about 40 s); the guard is loose.
        async with asyncio.timeout(15):
            with pytest.raises(StoreUnavailable):
                await cut_off.write_profile(write, now=datetime.now(UTC))
        # A long outage: the prober recreates the client, which ends the
        # library's own rollback attempts on the old channel.
        await cut_off.reconnect()
        fault_proxy.restore()
        await answering(cut_off, within=30)
        profile = await other.write_profile(
            ProfileWrite(user_id="frank", preferences={"seen": True}), now=datetime.now(UTC)
        )
    assert profile.preferences == {"seen": True}


async def test_a_write_given_up_at_the_deadline_never_lands_after_a_later_one(
    fault_proxy: FaultProxy, firestore_emulator: str, firestore_project: str
) -> None:
    """The library goes on with a transaction after its caller stopped waiting
    (it retries beginning it while Firestore is unreachable): a write the
    queue was told had failed could land later, over an erase made meanwhile
    (an erased message came back once in CI). Once its caller has given up,
    no attempt of it commits."""
    stale = ProfileWrite(
        user_id="grace",
        append=[Message(id="m1", role=Role.USER, content="erased", timestamp=datetime.now(UTC))],
    )
    cut_off = store_at(fault_proxy.host_port, firestore_project, deadline=1.0)
    other = store_at(firestore_emulator, firestore_project, deadline=5.0)
    async with cut_off, other:
        await other.write_profile(ProfileWrite(user_id="grace"), now=datetime.now(UTC))
        await cut_off.ping()  # connected before the cut
        fault_proxy.cut()
        async with asyncio.timeout(15):
            with pytest.raises(StoreUnavailable):
                await cut_off.write_profile(stale, now=datetime.now(UTC))
        fault_proxy.restore()
        await answering(cut_off, within=60)
        async with asyncio.timeout(60):
            # Let every attempt of the stale write end (the store's own record
            # of the transactions it no longer waits for).
            while cut_off._detached:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        stored = await other.get(PROFILES, "grace")
    assert stored is not None
    assert stored["conversationHistory"] == [], "a write its caller gave up on landed later"
