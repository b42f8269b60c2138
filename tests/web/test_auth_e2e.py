"""Authentication end to end: users signed up on the Firebase Auth emulator,
a server verifying their ID tokens, data in the Firestore emulator.

One test runs ``samvad serve`` as a process configured only through the
environment (``SAMVAD_AUTH=firebase``, ``FIREBASE_AUTH_EMULATOR_HOST``, ...);
the other an in-process server, to look at what reached Firestore.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from google.cloud.firestore import AsyncClient

from samvad.client import SamvadClient, ServerError
from samvad.config import Settings
from samvad.web.app import create_app
from tests.support.auth_emulator import AuthEmulator
from tests.support.serve import start_serve
from tests.support.server import live_server

pytestmark = pytest.mark.firestore

KEY = "e2e-service-key-0123456789abcdef"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_serve_with_firebase_auth_from_the_environment(
    tmp_path: Path,
    auth_emulator: AuthEmulator,
    firestore_emulator: str,
    firestore_project: str,
) -> None:
    alice, bob = auth_emulator.sign_up(), auth_emulator.sign_up()
    served = start_serve(
        tmp_path,
        SAMVAD_STORE="firestore",
        FIRESTORE_EMULATOR_HOST=firestore_emulator,
        GOOGLE_CLOUD_PROJECT=firestore_project,
        SAMVAD_AUTH="firebase",
        SAMVAD_AUTH_PROJECT=auth_emulator.project,
        FIREBASE_AUTH_EMULATOR_HOST=auth_emulator.host_port,
        SAMVAD_API_KEYS=KEY,
        SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS="0",
    )
    try:
        async with httpx.AsyncClient(base_url=served.url) as http:
            state = f"/api/session/{alice.uid}/state"
            saved = await http.post(state, json={"language": "en"}, headers=_bearer(alice.id_token))
            assert saved.status_code == 200
            assert (await http.get(state, headers=_bearer(alice.id_token))).status_code == 200
            assert (await http.get(state, headers=_bearer(bob.id_token))).status_code == 403
            assert (await http.get(state)).status_code == 401
            assert (await http.get(state, headers={"X-API-Key": KEY})).status_code == 200
            assert (await http.get("/api/session/stats", headers={"X-API-Key": KEY})).is_success
            for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
                assert (await http.get(open_path)).status_code == 200, open_path
        async with await SamvadClient.connect(
            served.ws_url, user_id=alice.uid, token=alice.id_token, heartbeat=None
        ) as client:
            assert (await client.ask("hello from alice")).reply.complete
        with pytest.raises(ServerError, match="forbidden"):
            await SamvadClient.connect(
                served.ws_url, user_id=alice.uid, token=bob.id_token, heartbeat=None
            )
    finally:
        assert served.stop() == 0
    log = served.output()
    assert "WITHOUT signature checks" in log, "the emulator mode is announced"
    for secret in (alice.id_token, bob.id_token, KEY, "hello from alice"):
        assert secret not in log


async def test_users_converse_in_their_own_sessions_and_nothing_of_theirs_leaks(
    auth_emulator_env: AuthEmulator,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> None:
    alice, bob = auth_emulator_env.sign_up(), auth_emulator_env.sign_up()
    settings = Settings(
        store="firestore",
        emulator_host=firestore_emulator,
        project=firestore_project,
        auth="firebase",
        auth_project=auth_emulator_env.project,
        ws_reply_chunk_delay=0.0,
        flush_linger=0.0,
    )
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        url = f"{server.ws_url}/ws"
        async with await SamvadClient.connect(
            url, user_id=alice.uid, session_id="s-alice", token=alice.id_token, heartbeat=None
        ) as client:
            assert (await client.ask("alice's secret plan")).reply.complete
        with pytest.raises(ServerError, match="conflict"):
            await SamvadClient.connect(
                url, user_id=bob.uid, session_id="s-alice", token=bob.id_token, heartbeat=None
            )
        stolen = await http.get("/api/session/s-alice", headers=_bearer(bob.id_token))
        assert stolen.status_code == 403
        history = await http.get(f"/api/session/{alice.uid}/history", headers=_bearer(bob.id_token))
        assert history.status_code == 403 and "secret plan" not in history.text
        own = await http.get(f"/api/session/{alice.uid}/history", headers=_bearer(alice.id_token))
        assert own.json()["messages"][0]["content"] == "alice's secret plan"
        async with asyncio.timeout(30):
            await server.services.persistence.writes.flush()
    stored = await firestore_client.collection("user_profiles").document(alice.uid).get()
    assert stored.exists
    session = await firestore_client.collection("sessions").document("s-alice").get()
    assert (session.to_dict() or {})["userId"] == alice.uid
    assert not (await firestore_client.collection("user_profiles").document(bob.uid).get()).exists
