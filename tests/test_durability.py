"""Acknowledged means durable: real ``samvad serve`` processes, the real
emulator, the fault proxy, and ``kill -9``.

Each test acknowledges writes, kills the server with SIGKILL at once (no
flush, no shutdown), starts it again on the same data directory, and reads
Firestore directly once the new process has replayed its journal.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud.firestore import AsyncClient

from samvad.config import Settings
from samvad.documents import PROFILES, SESSIONS, STATES
from samvad.journal import CONFIRMED_FILE
from samvad.models import Role
from samvad.persistence import DEAD_LETTER_FILE
from samvad.web.app import create_app
from tests.support.faultproxy import FaultProxy
from tests.support.metrics import scrape
from tests.support.serve import ServeProcess, serve_on_firestore, start_serve
from tests.support.server import live_server

# A kill -9 in the middle of profile transactions leaves their locks on the
# emulator until they expire, about a minute later (docs/benchmarks.md): the
# restarted server's writes of those users wait that long.
pytestmark = [pytest.mark.firestore, pytest.mark.timeout(300)]

USERS = 50
PER_USER = 20  # 1,000 messages, below the history cap of each user
CONCURRENCY = 50

# Outages noticed and ended fast (as tests.support.stores.outage_settings).
FAST_OUTAGE = {
    "SAMVAD_FIRESTORE_DEADLINE_SECONDS": "2",
    "SAMVAD_PROBE_INTERVAL_SECONDS": "0.05",
    "SAMVAD_PROBE_MAX_INTERVAL_SECONDS": "0.2",
    "SAMVAD_RETRY_MAX_BACKOFF_SECONDS": "0.2",
}


async def serve(tmp_path: Path, name: str, emulator: str, project: str, **env: str) -> ServeProcess:
    """``samvad serve`` on ``emulator`` with its data (and journal) in ``tmp_path/data``."""
    return await serve_on_firestore(
        tmp_path, name, emulator, project, SAMVAD_DATA_DIR=str(tmp_path / "data"), **env
    )


async def kill_9(server: ServeProcess) -> None:
    assert await asyncio.to_thread(server.stop, signal.SIGKILL) == -signal.SIGKILL


async def replay_on_restart(tmp_path: Path, fault_proxy: FaultProxy, project: str) -> None:
    """Start the server again on the same data directory, let it reach Firestore,
    and stop it once the writes its journal replayed are all there."""
    second = await serve(tmp_path, "second", fault_proxy.host_port, project, **FAST_OUTAGE)
    try:
        fault_proxy.restore()
        await drained(second.url)
    finally:
        assert await asyncio.to_thread(second.stop) == 0


async def send_messages(url: str) -> list[tuple[str, str]]:
    """1,000 messages over 50 users, 50 at a time; returns the acknowledged ones in order."""
    acknowledged: list[tuple[str, str]] = []

    # Each user's messages are sent one after another, so their order is known.
    async def sender(client: httpx.AsyncClient, user_index: int) -> None:
        user = f"user{user_index:02d}"
        for n in range(PER_USER):
            content = f"message {n:02d} of {user}"
            response = await client.post(
                f"{url}/api/session/{user}/history", json={"role": "user", "content": content}
            )
            assert response.status_code == 200, response.text
            acknowledged.append((user, content))

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(sender(client, u) for u in range(USERS)))
    return acknowledged


async def persistence_until(
    url: str, done: Callable[[dict[str, Any]], bool], *, seconds: float
) -> None:
    """Poll ``/healthz`` until its ``persistence`` satisfies ``done``."""
    async with httpx.AsyncClient(timeout=10) as client:
        async with asyncio.timeout(seconds):
            while True:
                health = (await client.get(url + "/healthz")).json()["persistence"]
                if done(health):
                    return
                await asyncio.sleep(0.05)


async def in_memory_mode(url: str) -> None:
    """Wait until the server has noticed that Firestore is gone: its first
    write fails once it does, which may be after the last message was
    acknowledged (a write can wait out the store's deadline)."""
    await persistence_until(url, lambda health: health["mode"] == "memory", seconds=30)


async def drained(url: str) -> None:
    """Wait until the server has nothing pending for Firestore."""
    await persistence_until(
        url,
        lambda health: health["mode"] == "firestore" and health["pendingWrites"] == 0,
        seconds=200,
    )


def _confirmed_through(path: Path) -> int:
    return int(path.read_text().strip() or 0) if path.exists() else 0


async def checkpointed(path: Path, *, through: int) -> None:
    """Wait until the journal's ``confirmed`` file says records up to ``through`` are."""
    async with asyncio.timeout(30):
        while True:
            if await asyncio.to_thread(_confirmed_through, path) >= through:
                return
            await asyncio.sleep(0.05)


async def stored_histories(client: AsyncClient) -> dict[str, list[str]]:
    histories = {}
    for u in range(USERS):
        user = f"user{u:02d}"
        snapshot = await client.collection(PROFILES).document(user).get()
        doc = snapshot.to_dict() or {}
        histories[user] = [m["content"] for m in doc.get("conversationHistory", [])]
    return histories


def expected_histories() -> dict[str, list[str]]:
    return {
        f"user{u:02d}": [f"message {n:02d} of user{u:02d}" for n in range(PER_USER)]
        for u in range(USERS)
    }


async def test_kill_9_right_after_1000_acknowledged_messages_loses_none(
    tmp_path: Path,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    first = await serve(tmp_path, "first", firestore_emulator, firestore_project)
    try:
        acknowledged = await send_messages(first.url)
    finally:
        await kill_9(first)
    assert len(acknowledged) == USERS * PER_USER

    second = await serve(tmp_path, "second", firestore_emulator, firestore_project)
    try:
        await drained(second.url)
    finally:
        assert await asyncio.to_thread(second.stop) == 0

    assert await stored_histories(firestore_client) == expected_histories()
    assert "message 00" not in second.output(), "message content must never be logged"


async def test_acknowledged_during_an_outage_survive_kill_9_and_a_restart_still_cut(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    first = await serve(tmp_path, "first", fault_proxy.host_port, firestore_project, **FAST_OUTAGE)
    try:
        fault_proxy.cut()
        acknowledged = await send_messages(first.url)
        await in_memory_mode(first.url)
    finally:
        await kill_9(first)
    assert len(acknowledged) == USERS * PER_USER

    second = await serve(
        tmp_path, "second", fault_proxy.host_port, firestore_project, **FAST_OUTAGE
    )
    try:
        async with httpx.AsyncClient() as client:
            # Still cut: the replayed messages are in memory, but whether
            # Firestore holds more of user07 cannot be known: 503, not a guess.
            cut = await client.get(second.url + "/api/session/user07/profile")
            assert cut.status_code == 503, cut.text
            assert cut.json()["code"] == "data_unavailable"
            assert int(cut.headers["Retry-After"]) >= 1
            fault_proxy.restore()
            await drained(second.url)
            profile = (await client.get(second.url + "/api/session/user07/profile")).json()
            history = [m["content"] for m in profile["profile"]["conversationHistory"]]
            assert history == expected_histories()["user07"]
    finally:
        assert await asyncio.to_thread(second.stop) == 0

    assert await stored_histories(firestore_client) == expected_histories()


async def test_a_refresh_acknowledged_during_an_outage_stays_done_after_kill_9(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    first = await serve(tmp_path, "first", fault_proxy.host_port, firestore_project, **FAST_OUTAGE)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = first.url + "/api/session"
            assert (await client.post(f"{url}/u1/state", json={"mood": "calm"})).is_success
            assert (
                await client.post(f"{url}/create", json={"sessionId": "s1", "userId": "u1"})
            ).is_success
            for n in range(5):
                sent = await client.post(
                    f"{url}/u1/history", json={"role": "user", "content": f"m{n}"}
                )
                assert sent.is_success
            await drained(first.url)
            assert (await firestore_client.collection(STATES).document("u1").get()).exists

            fault_proxy.cut()
            refreshed = await client.post(f"{url}/refresh", json={"userId": "u1"})
            assert refreshed.status_code == 200
            # Written after the erase: it must survive it, and nothing older.
            after = await client.post(f"{url}/u1/state", json={"fresh": True})
            assert after.is_success
    finally:
        await kill_9(first)

    await replay_on_restart(tmp_path, fault_proxy, firestore_project)

    state = (await firestore_client.collection(STATES).document("u1").get()).to_dict()
    assert state is not None and "mood" not in state and state["fresh"] is True
    assert not (await firestore_client.collection(PROFILES).document("u1").get()).exists
    assert not (await firestore_client.collection(SESSIONS).document("s1").get()).exists


async def test_a_session_delete_acknowledged_during_an_outage_stays_done_after_kill_9(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    first = await serve(tmp_path, "first", fault_proxy.host_port, firestore_project, **FAST_OUTAGE)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = first.url + "/api/session"
            for session_id in ("s1", "s2"):
                created = await client.post(
                    f"{url}/create", json={"sessionId": session_id, "userId": "u1"}
                )
                assert created.is_success
            await drained(first.url)
            assert (await firestore_client.collection(SESSIONS).document("s1").get()).exists

            fault_proxy.cut()
            deleted = await client.delete(f"{url}/s1")
            assert deleted.status_code == 200, deleted.text
            # Touched after the delete: it must not bring s1 back.
            ended = await client.put(f"{url}/s2/end")
            assert ended.is_success
    finally:
        await kill_9(first)

    second = await serve(
        tmp_path, "second", fault_proxy.host_port, firestore_project, **FAST_OUTAGE
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            # Still cut: the replayed erase holds on this server already.
            gone = await client.get(second.url + "/api/session/s1")
            assert gone.status_code == 404, gone.text
        fault_proxy.restore()
        await drained(second.url)
    finally:
        assert await asyncio.to_thread(second.stop) == 0

    assert not (await firestore_client.collection(SESSIONS).document("s1").get()).exists
    s2 = (await firestore_client.collection(SESSIONS).document("s2").get()).to_dict()
    assert s2 is not None and s2["status"] == "ended"


async def test_an_end_replayed_after_kill_9_does_not_bring_back_a_session_erased_meanwhile(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    first = await serve(tmp_path, "first", fault_proxy.host_port, firestore_project, **FAST_OUTAGE)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = first.url + "/api/session"
            created = await client.post(
                f"{url}/create",
                json={"sessionId": "s1", "userId": "u1", "metadata": {"topic": "private"}},
            )
            assert created.is_success, created.text
            await drained(first.url)
            # The create's confirmation on disk too: else it is replayed again
            # after the kill and, a full save, re-creates the erased session
            # (a window of up to the checkpoint interval; see the closing note
            # of issue 14, 2026-11-30).
            await checkpointed(tmp_path / "data" / "journal" / CONFIRMED_FILE, through=1)

            fault_proxy.cut()
            ended = await client.put(f"{url}/s1/end")
            assert ended.is_success, ended.text
    finally:
        await kill_9(first)

    # Erased by an instance this one never hears from, before the restart.
    await firestore_client.collection(SESSIONS).document("s1").delete()
    second = await serve(
        tmp_path, "second", fault_proxy.host_port, firestore_project, **FAST_OUTAGE
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            health = (await client.get(second.url + "/healthz")).json()["persistence"]
            assert health["pendingWrites"] == 1  # the end, replayed from the journal
        fault_proxy.restore()
        await drained(second.url)
    finally:
        assert await asyncio.to_thread(second.stop) == 0

    # The replayed end still only updates a session that exists.
    assert not (await firestore_client.collection(SESSIONS).document("s1").get()).exists


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "known defect: a replay does not know of erasures made while its instance "
        "could not hear the change feed (docs/persistence.md, Replay and erasures)"
    ),
)
async def test_a_replay_after_kill_9_does_not_bring_back_what_another_instance_erased(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    """A state and a message acknowledged during an outage, the user's data
    erased elsewhere while this instance is down: the replay re-creates both.
    Kept strict, so the fix turns it into a failure to remove the mark."""
    first = await serve(tmp_path, "first", fault_proxy.host_port, firestore_project, **FAST_OUTAGE)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            url = first.url + "/api/session"
            assert (await client.post(f"{url}/u1/state", json={"mood": "calm"})).is_success
            await drained(first.url)
            fault_proxy.cut()
            assert (await client.post(f"{url}/u1/state", json={"note": "private"})).is_success
            sent = await client.post(f"{url}/u1/history", json={"role": "user", "content": "m"})
            assert sent.is_success
    finally:
        await kill_9(first)

    # The user's refresh, on an instance this one never hears from.
    await firestore_client.collection(STATES).document("u1").delete()
    await firestore_client.collection(PROFILES).document("u1").delete()
    await replay_on_restart(tmp_path, fault_proxy, firestore_project)

    assert not (await firestore_client.collection(STATES).document("u1").get()).exists
    assert not (await firestore_client.collection(PROFILES).document("u1").get()).exists


async def test_without_the_journal_kill_9_loses_acknowledged_messages(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    """The control: what the journal is for (``SAMVAD_JOURNAL=off``)."""
    first = await asyncio.to_thread(
        start_serve,
        tmp_path,
        "first",
        SAMVAD_STORE="firestore",
        FIRESTORE_EMULATOR_HOST=fault_proxy.host_port,
        GOOGLE_CLOUD_PROJECT=firestore_project,
        SAMVAD_JOURNAL="off",
        **FAST_OUTAGE,
    )
    try:
        fault_proxy.cut()
        assert len(await send_messages(first.url)) == USERS * PER_USER
    finally:
        await kill_9(first)
    fault_proxy.restore()
    assert await stored_histories(firestore_client) == {f"user{u:02d}": [] for u in range(USERS)}, (
        "every message acknowledged during the outage is gone"
    )


# -- poison ------------------------------------------------------------------------


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": True}
    for _ in range(depth):
        value = {"d": value}
    return value


@pytest.mark.parametrize("journal", [True, False])
async def test_a_change_firestore_refuses_is_set_aside_and_every_other_write_lands(
    tmp_path: Path,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
    journal: bool,
) -> None:
    settings = Settings(
        store="firestore",
        emulator_host=firestore_emulator,
        project=firestore_project,
        data_dir=tmp_path / "data",
        journal=journal,
        flush_linger=0.0,
        firestore_deadline=30,
    )
    async with live_server(create_app(settings)) as server:
        persistence = server.services.persistence
        # Straight to the persistence layer: the door's validator refuses these.
        persistence.set_preferences("u1", {"deep": nested(25), "voice": "calm"})
        for n in range(5):
            persistence.append_message("u1", role=Role.USER, content=f"m{n}")
        if not journal:
            # The journal refuses it before acknowledging (tests/test_journal.py).
            persistence.save_state("u1", {"bad": "lone \udc00 surrogate"})
        persistence.save_state("u1", {"mood": "calm"})
        persistence.append_message("u1", role=Role.USER, content="m5")
        await persistence.durable()
        await asyncio.wait_for(persistence.writes.flush(), 120)

        async with httpx.AsyncClient(base_url=server.url) as http:
            health = (await http.get("/healthz")).json()["persistence"]
            metrics = await scrape(http)
    expected_set_aside = 1 if journal else 2
    assert health["writesSetAside"] == expected_set_aside
    assert health["pendingWrites"] == 0
    assert metrics.value("samvad_writes_set_aside_total") == expected_set_aside

    profile = (await firestore_client.collection(PROFILES).document("u1").get()).to_dict()
    assert profile is not None
    assert [m["content"] for m in profile["conversationHistory"]] == [f"m{n}" for n in range(6)]
    assert profile["preferences"] == {"voice": "calm"}
    state = (await firestore_client.collection(STATES).document("u1").get()).to_dict()
    assert state is not None and state["mood"] == "calm"

    lines = (tmp_path / "data" / DEAD_LETTER_FILE).read_text().splitlines()
    records = {record["document"]: record["change"] for record in map(json.loads, lines)}
    assert records["user_profiles/u1"]["preferences"] == {"deep": nested(25)}
    if not journal:
        assert records["user_states/u1"]["fields"] == {"bad": "lone \udc00 surrogate"}
    assert len(records) == expected_set_aside
