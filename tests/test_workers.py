"""``samvad serve --workers 2``: two processes on one port, each a full instance,
serving REST and WebSocket traffic, stopped together by one SIGTERM with
everything flushed (a real process tree on the real emulator)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest
from google.cloud.firestore import AsyncClient

from samvad.cli import main
from samvad.client import SamvadClient
from samvad.documents import PROFILES, STATES
from tests.support.serve import start_serve

pytestmark = pytest.mark.firestore


async def _started_with_state(url: str, user: str) -> SamvadClient:
    """A session of ``user`` whose ``started`` shows the state saved over REST.

    The other worker hears of the save through the change feed, within the
    freshness docs/deploy.md gives (p99 about 0.4 s), not at once: a session
    it starts before then finds no state (the save is queued, not yet in
    Firestore). Sessions are started again until one shows it, for 10 s."""
    deadline = time.monotonic() + 10
    while True:
        client = await SamvadClient.connect(url, user_id=user, heartbeat=None)
        started = client.started
        if (started is not None and started.state.get("n") == 1) or time.monotonic() > deadline:
            return client
        await client.close()
        await asyncio.sleep(0.1)


async def test_two_workers_serve_rest_and_websockets_and_stop_flushed_on_sigterm(
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
    tmp_path: Path,
) -> None:
    served = start_serve(
        tmp_path,
        "workers",
        FIRESTORE_EMULATOR_HOST=firestore_emulator,
        GOOGLE_CLOUD_PROJECT=firestore_project,
        SAMVAD_STORE="firestore",
        SAMVAD_WORKERS="2",
        # Writes wait in the queues until the shutdown flush: SIGTERM must flush them.
        SAMVAD_FLUSH_LINGER_SECONDS="600",
        SAMVAD_FLUSH_INTERVAL_SECONDS="600",
        SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS="0",
    )
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            # Both workers answer on the one port (new connections; bounded wait).
            pids: set[int] = set()
            deadline = time.monotonic() + 60
            while len(pids) < 2 and time.monotonic() < deadline:
                async with httpx.AsyncClient(timeout=10) as fresh:
                    health = (await fresh.get(served.url + "/healthz")).json()
                pids.add(health["instance"]["pid"])
                await asyncio.sleep(0.05)
            assert len(pids) == 2, served.output()

            users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(12)]
            for user in users:
                saved = await http.post(served.url + f"/api/session/{user}/state", json={"n": 1})
                assert saved.status_code == 200

        # WebSocket sessions, one per user, on whichever worker accepts them.
        for user in users[:6]:
            client = await _started_with_state(served.ws_url, user)
            async with client:
                assert client.started is not None
                assert client.started.state.get("n") == 1  # saved through either worker
                exchange = await client.ask("hello", client_id="c1")
                assert exchange.ack["seq"] == 1
                assert exchange.reply.complete

        assert served.stop() == 0
    finally:
        served.stop()
    output = served.output()
    assert output.count("Samvad stopped; 0 writes left unflushed") == 2, output
    assert "every worker has stopped" in output
    for user in users:
        state = (await firestore_client.collection(STATES).document(user).get()).to_dict()
        assert state is not None and state["n"] == 1
    for user in users[:6]:
        profile = (await firestore_client.collection(PROFILES).document(user).get()).to_dict()
        assert profile is not None
        roles = [m["role"] for m in profile["conversationHistory"]]
        assert roles == ["user", "assistant"]


def test_several_workers_refuse_a_store_they_cannot_share(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FIRESTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--workers", "2", "--store", "memory"]) == 2
    assert "--workers 2 needs Firestore" in capsys.readouterr().err
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", "127.0.0.1:1")
    monkeypatch.setenv("SAMVAD_COHERENCE", "0")
    assert main(["serve", "--workers", "2", "--store", "firestore"]) == 2
    assert "SAMVAD_COHERENCE off" in capsys.readouterr().err
    assert main(["serve", "--workers", "0"]) == 2
