"""``firestore.rules`` against the Firestore emulator, as signed-in clients.

The backend uses admin credentials (the emulator's ``owner`` token), which
bypass the rules; these tests seed data that way and then read and write as
end users, sending an ID token as ``authorization: Bearer`` metadata on every
RPC (the emulator takes unsigned tokens for ``request.auth``). Every allowance
of the rules is tested both ways.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.api_core.exceptions import PermissionDenied
from google.cloud.firestore import AsyncClient
from google.cloud.firestore_v1 import _helpers
from google.cloud.firestore_v1.base_query import FieldFilter

from samvad.emulator import FirestoreEmulator, find_gcloud
from tests.support.auth_emulator import id_token_claims, unsigned_token
from tests.support.firestore import close_client, emulator_missing, make_emulator_client

pytestmark = pytest.mark.firestore

RULES = Path(__file__).resolve().parent.parent / "firestore.rules"


class _SignedInClient(AsyncClient):
    """An emulator client acting as an end user.

    With ``FIRESTORE_EMULATOR_HOST`` set the library adds ``authorization:
    Bearer owner`` (admin, rules bypassed) to every RPC's metadata, whatever
    the credentials; this client sends the user's ID token there instead.
    """

    def __init__(self, *, id_token: str, project: str) -> None:
        self._id_token = id_token
        super().__init__(project=project)

    @property
    def _rpc_metadata(self) -> list[tuple[str, str]]:
        metadata: list[tuple[str, str]] = _helpers.metadata_with_prefix(self._database_string)
        return [*metadata, ("authorization", f"Bearer {self._id_token}")]


@pytest.fixture(scope="module")
def rules_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Firestore emulator of its own that evaluates ``firestore.rules``."""
    if find_gcloud() is None:
        emulator_missing("the Firestore emulator is not installed (needed to test the rules)")
    log = tmp_path_factory.mktemp("rules-emulator") / "emulator.log"
    with FirestoreEmulator.start(rules=RULES, log_path=log) as emulator:
        yield emulator.host_port


@pytest.fixture
def project() -> str:
    return "samvad-rules-" + uuid.uuid4().hex[:12]


@pytest.fixture
async def admin(rules_emulator: str, project: str) -> AsyncIterator[AsyncClient]:
    client = make_emulator_client(rules_emulator, project)
    try:
        yield client
    finally:
        await close_client(client)


class Users:
    """Clients signed in as given users, closed at the end of the test."""

    def __init__(self, host_port: str, project: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self._host_port = host_port
        self._project = project
        self._monkeypatch = monkeypatch
        self._clients: list[AsyncClient] = []

    def client(self, uid: str) -> AsyncClient:
        token = unsigned_token(id_token_claims(uid, self._project))
        with self._monkeypatch.context() as patch:
            # The library reads the variable only in its constructor.
            patch.setenv("FIRESTORE_EMULATOR_HOST", self._host_port)
            client = _SignedInClient(id_token=token, project=self._project)
        self._clients.append(client)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await close_client(client)


@pytest.fixture
async def users(
    rules_emulator: str, project: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Users]:
    found = Users(rules_emulator, project, monkeypatch)
    try:
        yield found
    finally:
        await found.close()


async def _seed(admin: AsyncClient) -> None:
    for uid in ("alice", "bob"):
        await admin.collection("user_states").document(uid).set({"language": "en"})
        await (
            admin.collection("user_profiles")
            .document(uid)
            .set({"userId": uid, "conversationHistory": [], "historyLength": 0})
        )
        await (
            admin.collection("sessions")
            .document(f"{uid}-s1")
            .set({"id": f"{uid}-s1", "userId": uid, "isActive": True})
        )
    await (
        admin.collection("interruptions")
        .document("i1")
        .set({"sessionId": "alice-s1", "userId": "alice"})
    )


async def _get(client: AsyncClient, collection: str, doc_id: str) -> dict[str, Any] | None:
    snapshot = await client.collection(collection).document(doc_id).get()
    return snapshot.to_dict()


@pytest.mark.parametrize("collection", ["user_states", "user_profiles"])
async def test_a_user_reads_their_own_state_and_profile(
    admin: AsyncClient, users: Users, collection: str
) -> None:
    await _seed(admin)
    found = await _get(users.client("alice"), collection, "alice")
    assert found is not None


@pytest.mark.parametrize("collection", ["user_states", "user_profiles"])
async def test_a_user_cannot_read_another_users_state_or_profile(
    admin: AsyncClient, users: Users, collection: str
) -> None:
    await _seed(admin)
    with pytest.raises(PermissionDenied):
        await _get(users.client("alice"), collection, "bob")


@pytest.mark.parametrize("collection", ["user_states", "user_profiles", "sessions"])
async def test_a_user_cannot_write_even_their_own_documents(
    admin: AsyncClient, users: Users, collection: str
) -> None:
    await _seed(admin)
    alice = users.client("alice")
    doc_id = "alice-s1" if collection == "sessions" else "alice"
    document = alice.collection(collection).document(doc_id)
    with pytest.raises(PermissionDenied):
        await document.set({"userId": "alice", "hacked": True}, merge=True)
    with pytest.raises(PermissionDenied):
        await document.delete()
    with pytest.raises(PermissionDenied):
        await alice.collection(collection).document("alice-new").set({"userId": "alice"})
    assert "hacked" not in ((await _get(admin, collection, doc_id)) or {})


async def test_a_user_reads_their_own_session_but_not_another_users(
    admin: AsyncClient, users: Users
) -> None:
    await _seed(admin)
    alice = users.client("alice")
    assert (await _get(alice, "sessions", "alice-s1")) is not None
    with pytest.raises(PermissionDenied):
        await _get(alice, "sessions", "bob-s1")


async def test_a_user_lists_only_their_own_sessions(admin: AsyncClient, users: Users) -> None:
    await _seed(admin)
    alice = users.client("alice")
    sessions = alice.collection("sessions")
    mine = sessions.where(filter=FieldFilter("userId", "==", "alice"))
    assert [s.id async for s in mine.stream()] == ["alice-s1"]
    with pytest.raises(PermissionDenied):
        [s.id async for s in sessions.stream()]
    theirs = sessions.where(filter=FieldFilter("userId", "==", "bob"))
    with pytest.raises(PermissionDenied):
        [s.id async for s in theirs.stream()]


async def test_interruptions_and_unknown_collections_are_closed_to_users(
    admin: AsyncClient, users: Users
) -> None:
    await _seed(admin)
    await admin.collection("elsewhere").document("x").set({"userId": "alice"})
    alice = users.client("alice")
    for collection, doc_id in (("interruptions", "i1"), ("elsewhere", "x")):
        with pytest.raises(PermissionDenied):
            await _get(alice, collection, doc_id)
        with pytest.raises(PermissionDenied):
            await alice.collection(collection).document("new").set({"userId": "alice"})


async def test_a_client_that_is_not_signed_in_reads_nothing(
    admin: AsyncClient, users: Users
) -> None:
    await _seed(admin)
    # A token without a user id: request.auth has no uid to match.
    anonymous = users.client("")
    for collection, doc_id in (("user_states", "alice"), ("sessions", "alice-s1")):
        with pytest.raises(PermissionDenied):
            await _get(anonymous, collection, doc_id)


async def test_the_backend_admin_credentials_bypass_the_rules(admin: AsyncClient) -> None:
    await _seed(admin)
    assert (await _get(admin, "user_states", "bob")) is not None
    await admin.collection("sessions").document("bob-s1").set({"isActive": False}, merge=True)
