"""The records behind ``Idempotency-Key`` (``samvad.idempotency``), over the
memory store with an injected clock: waiting for a running answer, reuse,
erasure during a request, expiry, and the bounded cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from samvad.clock import ManualClock
from samvad.config import Settings
from samvad.documents import IDEMPOTENCY_KEYS
from samvad.errors import IdempotencyKeyReused
from samvad.idempotency import Claim, IdempotencyKeys, Recorded, fingerprint, record_id
from samvad.persistence import Persistence
from samvad.stores.base import HistoryBounds
from samvad.stores.memory import MemoryStore

BODY = b'{"success":true}'


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def persistence(clock: ManualClock) -> AsyncIterator[Persistence]:
    settings = Settings(store="memory")
    store = MemoryStore(
        bounds=HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes)
    )
    async with store, Persistence(store, settings=settings, clock=clock) as running:
        yield running


def keys_of(persistence: Persistence, *, cache_bytes: int = 1 << 20) -> IdempotencyKeys:
    return IdempotencyKeys(persistence, ttl=60.0, cache_bytes=cache_bytes)


async def claim(
    keys: IdempotencyKeys, key: str = "k", request: str = "r", user: str = "u"
) -> Claim:
    answer = await keys.begin(user_id=user, route="history", key=key, request=request)
    assert isinstance(answer, Claim)
    return answer


async def recorded(
    keys: IdempotencyKeys, key: str = "k", request: str = "r", user: str = "u"
) -> Recorded:
    answer = await keys.begin(user_id=user, route="history", key=key, request=request)
    assert isinstance(answer, Recorded)
    return answer


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_record_ids_keep_users_routes_and_keys_apart() -> None:
    ids = {
        record_id("u", "history", "k"),
        record_id("v", "history", "k"),
        record_id("u", "state", "k"),
        record_id("u", "history", "k2"),
        record_id("uh", "istory", "k"),
    }
    assert len(ids) == 5
    assert all(len(i) == 64 and "/" not in i for i in ids)


def test_a_fingerprint_ignores_key_order_only() -> None:
    assert fingerprint([{"a": 1, "b": 2}]) == fingerprint([{"b": 2, "a": 1}])
    assert fingerprint([{"a": 1}]) != fingerprint([{"a": 2}])
    assert fingerprint([{"a": 1}, None]) != fingerprint([{"a": 1}, {"deviceId": "d"}])


async def test_a_second_request_waits_for_the_first_and_gets_its_answer(
    persistence: Persistence,
) -> None:
    keys = keys_of(persistence)
    first = await claim(keys)
    second = asyncio.create_task(keys.begin(user_id="u", route="history", key="k", request="r"))
    await settle()
    assert not second.done()
    keys.complete(first, status=200, content_type="application/json", body=BODY)
    answer = await second
    assert isinstance(answer, Recorded)
    assert (answer.status, answer.body) == (200, BODY)
    # And it is in the write-behind, for the store.
    stored = await persistence.read_record(IDEMPOTENCY_KEYS, first.doc_id, "u")
    assert stored is not None
    assert stored["body"] == BODY.decode()


async def test_a_failed_first_request_leaves_the_key_to_the_next(
    persistence: Persistence,
) -> None:
    keys = keys_of(persistence)
    first = await claim(keys)
    second = asyncio.create_task(keys.begin(user_id="u", route="history", key="k", request="r"))
    await settle()
    keys.abandon(first)
    assert isinstance(await second, Claim)


async def test_another_request_with_a_used_key_is_refused(persistence: Persistence) -> None:
    keys = keys_of(persistence)
    keys.complete(await claim(keys), status=200, content_type="application/json", body=BODY)
    with pytest.raises(IdempotencyKeyReused) as info:
        await keys.begin(user_id="u", route="history", key="k", request="other")
    assert info.value.status_code == 422
    assert info.value.code == "idempotency_key_reused"
    # Another user's same key is theirs.
    assert isinstance(await keys.begin(user_id="v", route="history", key="k", request="x"), Claim)


async def test_an_answer_made_across_an_erase_of_its_user_is_not_kept(
    persistence: Persistence,
) -> None:
    keys = keys_of(persistence)
    running = await claim(keys)
    await persistence.erase_user("u")
    keys.complete(running, status=200, content_type="application/json", body=BODY)
    assert isinstance(await claim(keys), Claim)


async def test_an_erase_forgets_the_users_answers_only(persistence: Persistence) -> None:
    keys = keys_of(persistence)
    for user in ("u", "v"):
        keys.complete(
            await claim(keys, user=user), status=200, content_type="application/json", body=BODY
        )
    await persistence.erase_user("u")
    assert isinstance(await claim(keys, user="u"), Claim)
    assert (await recorded(keys, user="v")).body == BODY


async def test_an_answer_expires(persistence: Persistence, clock: ManualClock) -> None:
    keys = keys_of(persistence)
    keys.complete(await claim(keys), status=200, content_type="application/json", body=BODY)
    clock.advance(59)
    await recorded(keys)
    clock.advance(2)
    assert isinstance(await claim(keys), Claim)


async def test_without_room_in_memory_answers_are_read_through(persistence: Persistence) -> None:
    keys = keys_of(persistence, cache_bytes=0)
    keys.complete(await claim(keys), status=201, content_type="text/plain", body=b"x" * 4096)
    answer = await recorded(keys)
    assert (answer.status, answer.content_type, answer.body) == (201, "text/plain", b"x" * 4096)
