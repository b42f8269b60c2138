"""Several server instances share one Firestore: concurrent appends to one user's
history from two instances lose nothing (real emulator)."""

from __future__ import annotations

import asyncio

import pytest
from google.cloud.firestore import AsyncClient

from samvad.config import Settings
from samvad.documents import PROFILES
from samvad.firestore_client import make_client
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.stores.base import HistoryBounds
from samvad.stores.firestore import FirestoreStore

pytestmark = pytest.mark.firestore


def instance(host: str, project: str, settings: Settings) -> Persistence:
    store = FirestoreStore(
        lambda: make_client(project=project, emulator_host=host),
        bounds=HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes),
        deadline=settings.firestore_deadline,
    )
    return Persistence(store, settings=settings)


async def test_two_instances_appending_to_one_user_lose_no_message(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    # Short intervals so both instances flush often and really do collide.
    settings = Settings(flush_interval=0.2, flush_linger=0.0, firestore_deadline=15.0)
    a = instance(firestore_emulator, firestore_project, settings)
    b = instance(firestore_emulator, firestore_project, settings)
    async with a.store, b.store, a, b:

        async def talk(p: Persistence, name: str) -> None:
            for i in range(20):
                p.append_message("shared-user", role=Role.USER, content=f"{name}-{i:02d}")
                await asyncio.sleep(0.05)

        await asyncio.gather(talk(a, "a"), talk(b, "b"))
        # The emulator makes each colliding transaction wait about 2 s for the
        # document's lock, and some give up after the library's 10 attempts
        # (then the write-behind retries): the flushes took 10-50 s here and
        # once more than 60 s in CI (2026-11-30). What is stored is the test.
        await asyncio.wait_for(asyncio.gather(a.writes.flush(), b.writes.flush()), 180)

    snapshot = await firestore_client.collection(PROFILES).document("shared-user").get()
    history = snapshot.to_dict()["conversationHistory"]
    contents = [m["content"] for m in history]
    assert sorted(contents) == sorted(
        [f"a-{i:02d}" for i in range(20)] + [f"b-{i:02d}" for i in range(20)]
    )
    # Each instance's own messages keep their order.
    for name in ("a", "b"):
        mine = [c for c in contents if c.startswith(name)]
        assert mine == sorted(mine)
    assert snapshot.to_dict()["historyLength"] == 40


async def test_a_flush_brings_the_other_instances_messages_into_the_cache(
    firestore_emulator: str, firestore_project: str
) -> None:
    settings = Settings(flush_interval=0.0, flush_linger=0.0)
    a = instance(firestore_emulator, firestore_project, settings)
    b = instance(firestore_emulator, firestore_project, settings)
    async with a.store, b.store, a, b:
        assert await a.get_profile("u") is None
        b.append_message("u", role=Role.USER, content="from b")
        await asyncio.wait_for(b.writes.flush(), 30)
        a.append_message("u", role=Role.ASSISTANT, content="from a")
        await asyncio.wait_for(a.writes.flush(), 30)
        profile = await a.get_profile("u")
        assert profile is not None
        assert [m.content for m in profile.history] == ["from b", "from a"]


async def test_the_history_cap_holds_across_instances(
    firestore_emulator: str, firestore_project: str, firestore_client: AsyncClient
) -> None:
    settings = Settings(flush_interval=0.0, flush_linger=0.0)
    a = instance(firestore_emulator, firestore_project, settings)
    b = instance(firestore_emulator, firestore_project, settings)
    async with a.store, b.store, a, b:
        for i in range(70):
            a.append_message("u", role=Role.USER, content=f"a{i}")
        await asyncio.wait_for(a.writes.flush(), 30)
        for i in range(70):
            b.append_message("u", role=Role.USER, content=f"b{i}")
        await asyncio.wait_for(b.writes.flush(), 30)
    doc = (await firestore_client.collection(PROFILES).document("u").get()).to_dict()
    contents = [m["content"] for m in doc["conversationHistory"]]
    assert len(contents) == 100
    assert contents == [f"a{i}" for i in range(40, 70)] + [f"b{i}" for i in range(70)]
