"""Fan-out across instances: devices of one user on two real ``samvad serve``
processes (one Firestore emulator project) get each other's ``message`` and
``state`` frames (``samvad.fanout``); reply chunks stay where they stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from samvad.client import SamvadClient
from tests.support.serve import ServeProcess, start_serve

pytestmark = pytest.mark.firestore

#: Seconds a device waits for a frame from the other instance (the bound is 1 s at p99).
WITHIN = 10.0


@pytest.fixture(scope="module")
def pair(
    firestore_emulator: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    tmp: Path = tmp_path_factory.mktemp("fanout")
    env = {
        "FIRESTORE_EMULATOR_HOST": firestore_emulator,
        "GOOGLE_CLOUD_PROJECT": "samvad-fanout-" + uuid.uuid4().hex[:8],
        "SAMVAD_STORE": "firestore",
        "SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS": "0",
    }
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_serve, tmp, name, **env) for name in ("a", "b")]
        try:
            a, b = (future.result() for future in starting)
            yield a, b
        finally:
            for future in starting:
                if future.exception() is None:
                    future.result().stop()


@pytest.fixture
async def devices(
    pair: tuple[ServeProcess, ServeProcess],
) -> AsyncIterator[tuple[SamvadClient, SamvadClient, str]]:
    a, b = pair
    user = f"u-{uuid.uuid4().hex[:8]}"
    on_a = await SamvadClient.connect(
        a.ws_url, user_id=user, session_id="s-a-" + user, heartbeat=None
    )
    on_b = await SamvadClient.connect(
        b.ws_url, user_id=user, session_id="s-b-" + user, heartbeat=None
    )
    async with on_a, on_b:
        yield on_a, on_b, user


async def test_a_message_on_one_instance_reaches_the_users_device_on_another(
    devices: tuple[SamvadClient, SamvadClient, str],
) -> None:
    on_a, on_b, _ = devices
    exchange = await on_a.ask("hello from a", client_id="c1")
    # The user's message, then the stored reply: both as ``message`` frames on B.
    seen = await on_b.wait_for(
        "message", where=lambda f: f["message"]["id"] == exchange.ack["messageId"], within=WITHIN
    )
    assert seen["message"]["content"] == "hello from a"
    reply = await on_b.wait_for(
        "message",
        where=lambda f: f["message"]["id"] == exchange.reply.message_id,
        within=WITHIN,
    )
    assert reply["message"]["role"] == "assistant"
    assert reply["message"]["content"] == exchange.reply.text
    # And the other way round.
    back = await on_b.ask("hello from b", client_id="c2")
    seen = await on_a.wait_for(
        "message", where=lambda f: f["message"]["id"] == back.ack["messageId"], within=WITHIN
    )
    assert seen["message"]["content"] == "hello from b"


async def test_a_state_change_on_one_instance_reaches_the_users_device_on_another(
    devices: tuple[SamvadClient, SamvadClient, str],
    pair: tuple[ServeProcess, ServeProcess],
) -> None:
    on_a, on_b, user = devices
    await on_a.set_state({"theme": "dark"})
    await on_b.wait_for("state", where=lambda f: f["state"].get("theme") == "dark", within=WITHIN)
    await on_b.set_state({"volume": 3})
    frame = await on_a.wait_for(
        "state", where=lambda f: f["state"].get("volume") == 3, within=WITHIN
    )
    assert frame["state"]["theme"] == "dark"  # the whole state, as that instance knows it
    # A REST save on B reaches the device on A too.
    async with httpx.AsyncClient() as http:
        saved = await http.post(pair[1].url + f"/api/session/{user}/state", json={"lang": "hi"})
        assert saved.status_code == 200
    await on_a.wait_for("state", where=lambda f: f["state"].get("lang") == "hi", within=WITHIN)


async def test_an_erasure_on_one_instance_closes_the_users_live_sessions_on_another(
    pair: tuple[ServeProcess, ServeProcess],
) -> None:
    a, b = pair
    user = f"u-{uuid.uuid4().hex[:8]}"
    on_b = await SamvadClient.connect(b.ws_url, user_id=user, heartbeat=None)
    async with on_b:
        await on_b.ask("remember this", client_id="c1")
        async with httpx.AsyncClient() as http:
            refreshed = await http.post(a.url + "/api/session/refresh", json={"userId": user})
            assert refreshed.status_code == 200
        # B closes the erased user's session as A would have: 4410, do not resume.
        async with asyncio.timeout(WITHIN):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await on_b.connection.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4410
