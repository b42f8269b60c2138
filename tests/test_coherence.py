"""Many instances, one truth: three real ``samvad serve`` processes on one
Firestore emulator project (``samvad.coherence``).

Each test uses its own user ids on the shared trio. Waits poll until a
generous deadline; the staleness bound itself (p50/p99) is measured by
``bench/bench_coherence.py``, not asserted here.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud.firestore import SERVER_TIMESTAMP, AsyncClient

from samvad.coherence import (
    CHANGES,
    MAX_DOC_CHARS,
    ChangeFeed,
    Coherence,
    CoherenceConfig,
    Outbox,
    _event,
    decode_events,
    encode_events,
    write_of,
)
from samvad.config import Settings
from samvad.documents import PROFILES, SESSIONS, STATES
from samvad.firestore_client import client_from_settings, make_client, sync_client_from_settings
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.stores.base import HistoryBounds
from samvad.stores.firestore import FirestoreStore
from samvad.writes import Erase, EraseScope, FieldsWrite, ProfileWrite
from tests.support.faultproxy import FaultProxy
from tests.support.firestore import close_client, make_emulator_client
from tests.support.serve import ServeProcess, start_serve

pytestmark = pytest.mark.firestore

#: Seconds a test waits for another instance to see a change (the bound is 1 s at p99).
DEADLINE = 10.0


class Trio:
    """Three instances on one project, and a Firestore client to check the truth."""

    def __init__(self, instances: list[ServeProcess], emulator: str, project: str) -> None:
        self.instances = instances
        self.emulator = emulator
        self.project = project

    @property
    def a(self) -> ServeProcess:
        return self.instances[0]

    @property
    def b(self) -> ServeProcess:
        return self.instances[1]

    @property
    def c(self) -> ServeProcess:
        return self.instances[2]


@pytest.fixture(scope="module")
def trio(firestore_emulator: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    tmp: Path = tmp_path_factory.mktemp("coherence")
    project = "samvad-coherence-" + uuid.uuid4().hex[:8]
    env = {
        "FIRESTORE_EMULATOR_HOST": firestore_emulator,
        "GOOGLE_CLOUD_PROJECT": project,
        "SAMVAD_STORE": "firestore",
        # Generous limits: these tests erase more often than a person does.
        "SAMVAD_REFRESH_RATE_PER_MINUTE": "1000",
        "SAMVAD_DELETE_RATE_PER_MINUTE": "1000",
        # Session activity is flushed lazily (30 s by default): "drained" must not wait that.
        "SAMVAD_TOUCH_INTERVAL_SECONDS": "0.5",
        # The emulator resolves transactions contending for one document with
        # lock waits of 2-4 s (three writers, measured): above the default
        # 5 s deadline once retried, which would read as an outage.
        "SAMVAD_FIRESTORE_DEADLINE_SECONDS": "20",
        "SAMVAD_SHUTDOWN_FLUSH_SECONDS": "60",
    }
    instances: list[ServeProcess] = []
    with ThreadPoolExecutor(3) as pool:  # three start-ups at once: a third of the wait
        starting = [pool.submit(start_serve, tmp, name, **env) for name in ("a", "b", "c")]
        try:
            instances.extend(future.result() for future in starting)
            yield Trio(instances, firestore_emulator, project)
        finally:
            for future in starting:
                if future.exception() is None:
                    future.result().stop()


@pytest.fixture
async def firestore(trio: Trio) -> AsyncIterator[AsyncClient]:
    client = make_emulator_client(trio.emulator, trio.project)
    try:
        yield client
    finally:
        await close_client(client)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def until(
    probe: Callable[[], Any], done: Callable[[Any], bool], *, deadline: float = DEADLINE
) -> Any:
    """Call ``probe`` (awaitable) until ``done`` accepts its result; fail at the deadline."""
    end = time.monotonic() + deadline
    last: Any = None
    while time.monotonic() < end:
        last = await probe()
        if done(last):
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {deadline} s; last seen: {last!r}")


async def get_json(http: httpx.AsyncClient, url: str) -> tuple[int, dict[str, Any]]:
    response = await http.get(url)
    return response.status_code, response.json()


async def drained(http: httpx.AsyncClient, trio: Trio) -> None:
    """Every instance has flushed everything it holds."""
    for instance in trio.instances:
        await until(
            lambda i=instance: get_json(http, i.url + "/healthz"),
            lambda r: r[1]["persistence"]["pendingWrites"] == 0,
            deadline=90,
        )


# -- a write on one instance is read on another --------------------------------------


async def test_a_state_saved_on_one_instance_is_read_on_another_that_caches_it(
    trio: Trio, http: httpx.AsyncClient
) -> None:
    user = new_id("u")
    api = "/api/session/{}/state".format
    (await http.post(trio.a.url + api(user), json={"mood": "calm"})).raise_for_status()
    # B reads it (now cached), then A changes it: B must not keep serving its copy.
    await until(lambda: get_json(http, trio.b.url + api(user)), lambda r: r[0] == 200)
    (await http.post(trio.a.url + api(user), json={"mood": "curious"})).raise_for_status()
    await until(
        lambda: get_json(http, trio.b.url + api(user)),
        lambda r: r[1]["state"]["mood"] == "curious",
    )
    # And in the other direction, field by field.
    (await http.post(trio.b.url + api(user), json={"language": "hi"})).raise_for_status()
    _, seen = await until(
        lambda: get_json(http, trio.a.url + api(user)),
        lambda r: r[1]["state"].get("language") == "hi",
    )
    assert seen["state"]["mood"] == "curious"


async def test_history_appended_on_one_instance_is_read_on_another_that_caches_it(
    trio: Trio, http: httpx.AsyncClient
) -> None:
    user = new_id("u")
    history = f"/api/session/{user}/history"
    profile = f"/api/session/{user}/profile"
    first = {"role": "user", "content": "first"}
    (await http.post(trio.a.url + history, json=first)).raise_for_status()
    await until(lambda: get_json(http, trio.b.url + profile), lambda r: r[0] == 200)
    for i in range(3):
        message = {"role": "assistant", "content": f"from a {i}"}
        (await http.post(trio.a.url + history, json=message)).raise_for_status()
    _, seen = await until(
        lambda: get_json(http, trio.b.url + profile),
        lambda r: len(r[1]["profile"]["conversationHistory"]) == 4,
    )
    contents = [m["content"] for m in seen["profile"]["conversationHistory"]]
    assert contents == ["first", "from a 0", "from a 1", "from a 2"]


async def test_a_session_ended_on_one_instance_is_ended_on_another_that_caches_it(
    trio: Trio, http: httpx.AsyncClient
) -> None:
    user, session = new_id("u"), new_id("s")
    create = {"sessionId": session, "userId": user, "language": "en"}
    (await http.post(trio.a.url + "/api/session/create", json=create)).raise_for_status()
    url = f"/api/session/{session}"
    active = f"/api/session/user/{user}/active"
    await until(lambda: get_json(http, trio.b.url + url), lambda r: r[0] == 200)
    await until(lambda: get_json(http, trio.c.url + active), lambda r: r[1]["count"] == 1)
    (await http.put(trio.a.url + url + "/end")).raise_for_status()
    await until(
        lambda: get_json(http, trio.b.url + url),
        lambda r: r[1]["session"]["status"] == "ended",
    )
    await until(lambda: get_json(http, trio.c.url + active), lambda r: r[1]["count"] == 0)


# -- erasure -------------------------------------------------------------------------


async def test_an_erasure_on_one_instance_is_honoured_by_the_others(
    trio: Trio, http: httpx.AsyncClient, firestore: AsyncClient
) -> None:
    user, session = new_id("u"), new_id("s")
    a, b = trio.a.url, trio.b.url
    create = {"sessionId": session, "userId": user, "metadata": {"topic": "secret"}}
    (await http.post(a + "/api/session/create", json=create)).raise_for_status()
    (await http.post(a + f"/api/session/{user}/state", json={"secret": 1})).raise_for_status()
    message = {"role": "user", "content": "erase me", "sessionId": session}
    (await http.post(a + f"/api/session/{user}/history", json=message)).raise_for_status()
    # B holds all of it in its caches.
    for path in (f"/api/session/{user}/state", f"/api/session/{user}/profile"):
        await until(lambda p=path: get_json(http, b + p), lambda r: r[0] == 200)
    await until(lambda: get_json(http, b + f"/api/session/{session}"), lambda r: r[0] == 200)
    await drained(http, trio)

    refresh = await http.post(a + "/api/session/refresh", json={"userId": user})
    assert refresh.status_code == 200, refresh.text
    # At once, before B can have heard: B's end of the session it still caches
    # must not re-create the deleted document (it did, with every field).
    await http.put(b + f"/api/session/{session}/end")
    # And what A writes right after its erasure is new data, which B must get.
    (await http.post(a + f"/api/session/{user}/state", json={"again": 1})).raise_for_status()

    for path in (f"/api/session/{user}/profile", f"/api/session/{session}"):
        await until(lambda p=path: get_json(http, b + p), lambda r: r[0] == 404)
    await until(
        lambda: get_json(http, b + f"/api/session/{user}/state"),
        lambda r: r[0] == 200 and r[1]["state"].get("again") == 1 and "secret" not in r[1]["state"],
    )
    active = await get_json(http, b + f"/api/session/user/{user}/active")
    assert active[1]["count"] == 0

    # What B writes afterwards is new data only.
    (await http.post(b + f"/api/session/{user}/state", json={"fresh": 2})).raise_for_status()
    again = {"role": "user", "content": "after"}
    (await http.post(b + f"/api/session/{user}/history", json=again)).raise_for_status()
    await drained(http, trio)
    state = (await firestore.collection(STATES).document(user).get()).to_dict()
    assert state is not None
    assert "secret" not in state
    assert state["fresh"] == 2
    assert state["again"] == 1
    profile = (await firestore.collection(PROFILES).document(user).get()).to_dict()
    assert profile is not None
    assert [m["content"] for m in profile["conversationHistory"]] == ["after"]
    assert not (await firestore.collection(SESSIONS).document(session).get()).exists
    # Every instance serves the same: only what came after the erasure.
    for instance in trio.instances:
        _, seen = await until(
            lambda i=instance: get_json(http, i.url + f"/api/session/{user}/state"),
            lambda r: r[0] == 200 and "secret" not in r[1]["state"],
        )
        assert seen["state"]["fresh"] == 2
        assert seen["state"]["again"] == 1
        _, seen = await until(
            lambda i=instance: get_json(http, i.url + f"/api/session/{user}/profile"),
            lambda r: (
                r[0] == 200
                and [m["content"] for m in r[1]["profile"]["conversationHistory"]] == ["after"]
            ),
        )


async def test_a_session_deleted_on_one_instance_is_gone_on_the_others(
    trio: Trio, http: httpx.AsyncClient, firestore: AsyncClient
) -> None:
    user, session = new_id("u"), new_id("s")
    create = {"sessionId": session, "userId": user}
    (await http.post(trio.a.url + "/api/session/create", json=create)).raise_for_status()
    url = f"/api/session/{session}"
    await until(lambda: get_json(http, trio.c.url + url), lambda r: r[0] == 200)
    await drained(http, trio)
    assert (await http.delete(trio.a.url + url)).status_code == 200
    await http.put(trio.c.url + url + "/end")  # C still caches it
    await until(lambda: get_json(http, trio.c.url + url), lambda r: r[0] == 404)
    await drained(http, trio)
    assert not (await firestore.collection(SESSIONS).document(session).get()).exists


# -- concurrent writers ----------------------------------------------------------------


async def test_concurrent_appends_from_every_instance_are_all_kept_everywhere(
    trio: Trio, http: httpx.AsyncClient, firestore: AsyncClient
) -> None:
    user = new_id("u")
    path = f"/api/session/{user}/history"
    per_instance = 15

    async def talk(instance: ServeProcess, name: str) -> None:
        for i in range(per_instance):
            message = {"role": "user", "content": f"{name}-{i:02d}"}
            (await http.post(instance.url + path, json=message)).raise_for_status()

    await asyncio.gather(*(talk(i, n) for i, n in zip(trio.instances, "abc", strict=True)))
    expected = sorted(f"{n}-{i:02d}" for n in "abc" for i in range(per_instance))
    await drained(http, trio)
    doc = (await firestore.collection(PROFILES).document(user).get()).to_dict()
    assert doc is not None
    assert sorted(m["content"] for m in doc["conversationHistory"]) == expected
    for instance in trio.instances:
        _, seen = await until(
            lambda i=instance: get_json(http, i.url + f"/api/session/{user}/profile"),
            lambda r: len(r[1]["profile"]["conversationHistory"]) == len(expected),
        )
        contents = [m["content"] for m in seen["profile"]["conversationHistory"]]
        assert sorted(contents) == expected
        for name in "abc":  # each instance's own messages keep their order
            mine = [c for c in contents if c.startswith(name)]
            assert mine == sorted(mine)


async def test_the_feed_is_one_small_document_per_burst_not_one_per_write(
    trio: Trio, http: httpx.AsyncClient, firestore: AsyncClient
) -> None:
    users = [new_id("u") for _ in range(20)]
    before = len(await firestore.collection(CHANGES).get())
    await asyncio.gather(
        *(http.post(trio.a.url + f"/api/session/{u}/state", json={"n": 1}) for u in users)
    )
    await until(
        lambda: get_json(http, trio.b.url + f"/api/session/{users[-1]}/state"),
        lambda r: r[0] == 200,
    )
    await drained(http, trio)
    after = len(await firestore.collection(CHANGES).get())
    # 20 writes went out folded into far fewer feed documents (timing decides how many).
    assert 0 < after - before < len(users)


# -- the same rules, one layer down (two Persistence instances in this process) ---------


def persistence_on(emulator: str, project: str, settings: Settings) -> Persistence:
    store = FirestoreStore(
        lambda: make_client(project=project, emulator_host=emulator),
        bounds=HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes),
        deadline=settings.firestore_deadline,
    )
    return Persistence(store, settings=settings)


def unaware_pair(emulator: str, project: str) -> tuple[Persistence, Persistence]:
    """Two instances without coherence, writing at once: neither hears of the other."""
    settings = Settings(flush_interval=0.0, flush_linger=0.0)
    return persistence_on(emulator, project, settings), persistence_on(emulator, project, settings)


def coherent(p: Persistence, settings: Settings) -> Coherence:
    feed = ChangeFeed(
        lambda: client_from_settings(settings),
        lambda: sync_client_from_settings(settings),
        config=CoherenceConfig(interval=0.02),
    )
    return Coherence(p, feed)


async def test_an_instance_that_never_heard_of_an_erasure_cannot_recreate_the_session(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    # No coherence at all: only the store's must-exist rule stands between B's
    # stale cache and the deleted document.
    a, b = unaware_pair(firestore_emulator, firestore_project)
    async with a.store, b.store, a, b:
        await a.save_session("s1", user_id="u1", metadata={"topic": "secret"})
        await asyncio.wait_for(a.writes.flush(), 30)
        assert await b.get_session("s1") is not None  # cached on B
        await a.erase_user("u1")
        await asyncio.wait_for(a.writes.flush(), 30)
        ended = await b.end_session("s1")
        assert ended is not None  # B still believes in it ...
        await b.touch_session("s1")
        await b.mark_abandoned("s1")
        await asyncio.wait_for(b.writes.flush(), 30)
    # ... but Firestore does not get it back.
    assert not (await firestore_client.collection(SESSIONS).document("s1").get()).exists


async def test_updates_from_a_stale_view_keep_what_another_instance_changed(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    # No coherence: B has not heard of A's changes when it updates the sessions.
    a, b = unaware_pair(firestore_emulator, firestore_project)
    sessions = firestore_client.collection(SESSIONS)
    async with a.store, b.store, a, b:
        for session_id in ("touched", "ended", "abandoned"):
            await a.save_session(session_id, user_id="u1", language="en", metadata={"n": 1})
        await asyncio.wait_for(a.writes.flush(), 30)
        for session_id in ("touched", "ended", "abandoned"):
            assert await b.get_session(session_id) is not None  # cached on B
            await a.save_session(session_id, user_id="u1", language="hi", metadata={"n": 2})
        await a.end_session("touched")
        await asyncio.wait_for(a.writes.flush(), 30)

        touched = await b.touch_session("touched")
        ended = await b.end_session("ended")
        abandoned = await b.mark_abandoned("abandoned")
        assert touched is not None and ended is not None and abandoned is not None
        await asyncio.wait_for(b.writes.flush(), 30)
    docs = {
        s: (await sessions.document(s).get()).to_dict() or {}
        for s in ("touched", "ended", "abandoned")
    }
    # Each of B's updates wrote what it changed, nothing of its stale view.
    for doc in docs.values():
        assert (doc["metadata"], doc["language"]) == ({"n": 2}, "hi")
    assert (docs["touched"]["status"], docs["touched"]["isActive"]) == ("ended", False)
    assert docs["touched"]["lastActivity"] == touched.last_activity
    assert docs["touched"]["expireAt"] == touched.expire_at
    assert (docs["ended"]["status"], docs["ended"]["isActive"]) == ("ended", False)
    assert docs["ended"]["endedAt"] == ended.ended_at
    assert (docs["abandoned"]["status"], docs["abandoned"]["isActive"]) == ("abandoned", False)


async def test_a_save_from_a_stale_view_keeps_the_metadata_and_language_set_elsewhere(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    # No coherence: B has not heard of A's save when a client saves through B
    # (a REST update, or a WebSocket start that re-activates the session).
    a, b = unaware_pair(firestore_emulator, firestore_project)
    async with a.store, b.store, a, b:
        await a.save_session("s1", user_id="u1", language="en", metadata={"a": 1})
        await asyncio.wait_for(a.writes.flush(), 30)
        assert await b.get_session("s1") is not None  # cached on B
        await a.save_session("s1", user_id="u1", language="hi", metadata={"b": 2})
        await asyncio.wait_for(a.writes.flush(), 30)

        saved = await b.save_session("s1", user_id="u1", metadata={"a": 0, "c": 3})
        assert saved.metadata == {"a": 0, "c": 3}  # B's view, until it hears of A's
        await asyncio.wait_for(b.writes.flush(), 30)
    doc = (await firestore_client.collection(SESSIONS).document("s1").get()).to_dict()
    assert doc is not None
    assert doc["metadata"] == {"a": 0, "b": 2, "c": 3}
    assert (doc["language"], doc["status"]) == ("hi", "active")


async def test_writes_queued_before_an_erasure_elsewhere_are_dropped_when_it_is_heard(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    base = Settings(emulator_host=firestore_emulator, project=firestore_project)
    quick = base.replace(flush_interval=0.0, flush_linger=0.0)
    # B holds its writes for a minute: they are still queued when A erases.
    slow = base.replace(flush_interval=60.0, flush_linger=60.0)
    a = persistence_on(firestore_emulator, firestore_project, quick)
    b = persistence_on(firestore_emulator, firestore_project, slow)
    async with a.store, b.store, a, b:
        ca, cb = coherent(a, quick), coherent(b, slow)
        await ca.start()
        await cb.start()
        try:
            b.append_message("u1", role=Role.USER, content="said before the erasure")
            b.save_state("u1", {"secret": True})
            await until_true(lambda: a.remote.writes((PROFILES, "u1")) != [])
            await a.erase_user("u1")
            await asyncio.wait_for(a.writes.flush(), 30)
            await until_true(lambda: b.writes.pending_count == 0)
            assert await b.get_profile("u1") is None
            assert await b.get_state("u1") is None
            b.save_state("u1", {"fresh": True})  # after: kept
            await asyncio.wait_for(b.writes.flush(), 30)
        finally:
            await ca.close()
            await cb.close()
    assert not (await firestore_client.collection(PROFILES).document("u1").get()).exists
    state = (await firestore_client.collection(STATES).document("u1").get()).to_dict()
    assert state is not None
    assert "secret" not in state
    assert state["fresh"] is True


async def until_true(check: Callable[[], bool], *, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s")
        await asyncio.sleep(0.01)


async def test_feed_documents_the_listener_missed_are_read_and_applied_in_order(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    settings = Settings(emulator_host=firestore_emulator, project=firestore_project)
    received: list[dict[str, Any]] = []
    # A window of one document: a commit of several shows the listener only the newest.
    feed = ChangeFeed(
        lambda: client_from_settings(settings),
        lambda: sync_client_from_settings(settings),
        config=CoherenceConfig(window=1),
    )
    await feed.start(received.extend)
    try:

        def doc(seq: int) -> dict[str, Any]:
            event = {"k": "f", "c": STATES, "id": "u1", "u": "u1", "f": {"n": seq}}
            return {
                "instance": "other",
                "seq": seq,
                "at": SERVER_TIMESTAMP,
                "events": encode_events([event]),
            }

        feed_docs = firestore_client.collection(CHANGES)
        await feed_docs.document().set(doc(1))
        await until_true(lambda: len(received) == 1)
        batch = firestore_client.batch()
        for seq in range(2, 7):
            batch.set(feed_docs.document(), doc(seq))
        await batch.commit()
        await until_true(lambda: len(received) == 6)
        assert [event["f"]["n"] for event in received] == [1, 2, 3, 4, 5, 6]
        assert feed.stats.gaps >= 1
        assert feed.stats.lost == 0
    finally:
        await feed.close()


# -- the outbox (no I/O) ----------------------------------------------------------------


def test_the_outbox_folds_writes_per_document_but_never_across_an_erasure() -> None:
    outbox = Outbox()
    outbox.add(FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"a": 1}))
    outbox.add(FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"b": 2}))
    outbox.add(Erase(EraseScope.USER, "u1"))
    outbox.add(FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"c": 3}))
    texts, count = outbox.drain()
    assert count == 3
    events = [event for text in texts for event in decode_events(text)]
    assert [e["k"] for e in events] == ["f", "e", "f"]
    assert events[0]["f"] == {"a": 1, "b": 2}
    assert events[2]["f"] == {"c": 3}
    assert outbox.drain() == ([], 0)


def test_the_outbox_keeps_its_own_copy_of_a_write() -> None:
    outbox = Outbox()
    write = ProfileWrite(user_id="u1", append=[], preferences={"x": 1})
    outbox.add(write)
    write.preferences["y"] = 2  # the write-behind folds later writes into its own
    texts, _ = outbox.drain()
    assert decode_events(texts[0])[0]["pr"] == {"x": 1}


def test_a_write_too_large_to_announce_is_announced_as_read_it_again() -> None:
    outbox = Outbox()
    huge = "x" * (MAX_DOC_CHARS + 10)
    outbox.add(FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"big": huge}))
    outbox.add(FieldsWrite(collection=STATES, doc_id="u2", user_id="u2", fields={"n": 1}))
    texts, count = outbox.drain()
    assert count == 2
    assert all(len(text) <= MAX_DOC_CHARS for text in texts)
    events = [event for text in texts for event in decode_events(text)]
    assert events[0] == {"k": "i", "c": STATES, "id": "u1", "u": "u1"}
    assert events[1]["f"] == {"n": 1}
    # Datetimes travel as datetimes.
    when = datetime(2025, 1, 10, 17, 0, tzinfo=UTC)
    assert decode_events(encode_events([{"at": when}])) == [{"at": when}]


def test_a_fields_write_travels_whole_through_the_feed() -> None:
    # What another instance lays over its views and applies to its caches.
    write = FieldsWrite(
        collection=SESSIONS,
        doc_id="s1",
        user_id="u1",
        session_id="s1",
        fields={"metadata": {"topic": "cards"}, "lastActivity": datetime(2025, 1, 10, tzinfo=UTC)},
        defaults={"createdAt": datetime(2025, 1, 9, tzinfo=UTC)},
        touch=True,
        must_exist=True,
        merge=("metadata",),
    )
    event = _event(write)
    assert event is not None
    assert write_of(decode_events(encode_events([event]))[0]) == write


def test_an_outbox_that_overflows_announces_that_nothing_cached_holds() -> None:
    outbox = Outbox(max_events=3)
    for i in range(5):
        outbox.add(FieldsWrite(collection=STATES, doc_id=f"u{i}", user_id=f"u{i}", fields={}))
    texts, count = outbox.drain()
    events = [event for text in texts for event in decode_events(text)]
    assert events[0] == {"k": "r"}  # whatever else follows, the others drop their caches
    assert count == len(events) <= 4
    assert outbox.dropped >= 3


async def test_an_announcement_made_while_firestore_is_unreachable_arrives_once_it_is_back(
    firestore_emulator: str, firestore_project: str, fault_proxy: FaultProxy
) -> None:
    direct = Settings(emulator_host=firestore_emulator, project=firestore_project)
    proxied = direct.replace(emulator_host=fault_proxy.host_port, firestore_deadline=1.0)
    heard: list[dict[str, Any]] = []
    listener = ChangeFeed(
        lambda: client_from_settings(direct), lambda: sync_client_from_settings(direct)
    )
    # The publisher writes through the proxy; both listen directly.
    publisher = ChangeFeed(
        lambda: client_from_settings(proxied),
        lambda: sync_client_from_settings(direct),
        config=CoherenceConfig(deadline=1.0),
    )
    await listener.start(heard.extend)
    await publisher.start(lambda events: None)
    try:
        fault_proxy.cut()
        publisher.publish(
            FieldsWrite(collection=STATES, doc_id="u1", user_id="u1", fields={"n": 1})
        )
        await until_true(lambda: publisher.stats.publish_failures >= 1)
        publisher.publish(
            FieldsWrite(collection=STATES, doc_id="u2", user_id="u2", fields={"n": 2})
        )
        fault_proxy.restore()
        await until_true(lambda: len(heard) == 2, deadline=30)
        assert [event["id"] for event in heard] == ["u1", "u2"]
        assert listener.stats.lost == 0  # the numbering has no hole
    finally:
        await publisher.close()
        await listener.close()
