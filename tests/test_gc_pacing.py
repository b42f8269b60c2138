"""The server's young-generation collections on a schedule (samvad.server.YoungCollections)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from samvad.config import Settings
from samvad.server import YOUNG_THRESHOLD, SamvadServer, YoungCollections, uvicorn_config
from samvad.web.app import create_app


@pytest.fixture
def gc_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was:
            gc.disable()


async def test_the_youngest_generation_every_period_the_middle_one_every_fifth(
    gc_on: None,
) -> None:
    collected: list[int] = []
    twelve = asyncio.Event()

    def collect(generation: int) -> None:
        collected.append(generation)
        if len(collected) == 12:
            twelve.set()

    young = YoungCollections(
        asyncio.get_running_loop(), period=0.005, middle_every=5, collect=collect
    )
    young.start()
    async with asyncio.timeout(10):
        await twelve.wait()
    young.stop()
    assert collected[:10] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]  # as asked, not the defaults
    count = len(collected)
    await asyncio.sleep(0.05)
    assert len(collected) == count  # stopped


async def test_nothing_is_collected_while_gc_is_disabled() -> None:
    collected: list[int] = []
    young = YoungCollections(asyncio.get_running_loop(), period=0.005, collect=collected.append)
    was = gc.isenabled()
    gc.disable()
    try:
        young.start()
        await asyncio.sleep(0.05)
        young.stop()
    finally:
        if was:
            gc.enable()
    assert collected == []


def _in_youngest(ids: set[int]) -> int:
    return sum(id(obj) in ids for obj in gc.get_objects(generation=0))


async def test_new_objects_leave_the_youngest_generation_when_old_ones_die_as_fast(
    gc_on: None,
) -> None:
    # The pattern of a server streaming replies: as many old objects freed as
    # new ones made, so CPython's allocation count never starts a collection.
    old = [[] for _ in range(5000)]
    gc.collect()  # the old ones are in the oldest generation now
    young: list[list[int]] = []
    for _ in range(5000):
        young.append([])
        old.pop()
    ids = {id(obj) for obj in young}
    assert _in_youngest(ids) == 5000  # no collection came

    pacer = YoungCollections(asyncio.get_running_loop(), period=0.005)
    pacer.start()
    try:
        for _ in range(200):
            await asyncio.sleep(0.005)
            if not _in_youngest(ids):
                break
    finally:
        pacer.stop()
    assert _in_youngest(ids) == 0


def test_a_period_must_be_positive() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="positive"):
            YoungCollections(loop, period=0)
        with pytest.raises(ValueError, match="at least 1"):
            YoungCollections(loop, middle_every=0)
    finally:
        loop.close()


async def test_samvad_server_collects_on_a_schedule_while_it_runs(gc_on: None) -> None:
    settings = Settings(store="memory", host="127.0.0.1", port=0)
    config = uvicorn_config(create_app(settings), settings, lifespan="off")
    server = SamvadServer(config)
    thresholds = gc.get_threshold()
    serving = asyncio.create_task(server.serve())  # tunes this test process's collector too
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag, no event)
                await asyncio.sleep(0.01)
        young = server._young
        assert isinstance(young, YoungCollections) and young._handle is not None
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        server.should_exit = True
        async with asyncio.timeout(10):
            await serving
        assert young._handle is None
    finally:
        serving.cancel()
        gc.unfreeze()
        gc.set_threshold(*thresholds)
