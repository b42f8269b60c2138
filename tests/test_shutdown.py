"""Graceful shutdown of a real ``samvad serve`` process against the Firestore
emulator: on SIGTERM it stops accepting, closes WebSockets with 1001, flushes
every acknowledged write within the deadline, and exits 0."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from google.cloud.firestore import AsyncClient
from websockets.exceptions import ConnectionClosed

from samvad.client import SamvadClient
from tests.support.serve import start_serve

pytestmark = pytest.mark.firestore


async def _close_code(client: SamvadClient) -> int | None:
    async with asyncio.timeout(30):
        try:
            while True:
                await client.connection.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


async def test_sigterm_flushes_acknowledged_writes_closes_1001_and_exits_0(
    tmp_path: Path,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    served = start_serve(
        tmp_path,
        SAMVAD_STORE="firestore",
        FIRESTORE_EMULATOR_HOST=firestore_emulator,
        GOOGLE_CLOUD_PROJECT=firestore_project,
        # Nothing reaches Firestore before the shutdown flush.
        SAMVAD_FLUSH_LINGER_SECONDS="300",
        SAMVAD_FLUSH_INTERVAL_SECONDS="300",
        SAMVAD_TOUCH_INTERVAL_SECONDS="300",
        SAMVAD_SHUTDOWN_FLUSH_SECONDS="20",
        SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS="0",
    )
    try:
        async with httpx.AsyncClient(base_url=served.url) as http:
            saved = await http.post("/api/session/u-term/state", json={"language": "hi"})
            assert saved.status_code == 200
        client = await SamvadClient.connect(
            served.ws_url, user_id="u-term", session_id="s-term", heartbeat=None
        )
        acknowledged: list[str] = []
        for i in range(5):
            exchange = await client.ask(f"message {i}")
            assert exchange.reply.message_id is not None
            acknowledged += [exchange.ack["messageId"], exchange.reply.message_id]
        profiles = firestore_client.collection("user_profiles")
        assert not (await profiles.document("u-term").get()).exists, "still pending"

        sent_at = time.monotonic()
        served.send()
        assert await _close_code(client) == 1001
        status = await asyncio.to_thread(served.wait)
        took = time.monotonic() - sent_at
    finally:
        served.stop()
    assert status == 0, served.output()
    assert took < 20, f"the drain took {took:.1f} s"

    profile = (await profiles.document("u-term").get()).to_dict()
    assert profile is not None
    stored = [m["id"] for m in profile["conversationHistory"]]
    assert stored == acknowledged, "every acknowledged message is in Firestore, in order"
    state = (await firestore_client.collection("user_states").document("u-term").get()).to_dict()
    assert state is not None and state["language"] == "hi"
    session = (await firestore_client.collection("sessions").document("s-term").get()).to_dict()
    assert session is not None and session["userId"] == "u-term"
    assert session["isActive"] is False, "the closed session was ended, and that was flushed too"
    log = served.output()
    assert "received SIGTERM" in log
    assert "0 writes left unflushed" in log
