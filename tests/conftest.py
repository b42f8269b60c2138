"""Shared fixtures: the Firestore emulator, per-test projects and clients, a fault
proxy, and the Firebase Auth emulator.

The emulator is started once per test run, unless ``FIRESTORE_EMULATOR_HOST``
is already set (``firebase emulators:exec``, ``scripts/firestore-emulator --
pytest``), in which case that one is used. Tests never share data: each gets
its own project id.

The Auth emulator (``node_modules/.bin/firebase``, installed by
``scripts/bootstrap``) is likewise started once per run on free ports unless
``FIREBASE_AUTH_EMULATOR_HOST`` is set; without it, its tests skip (and fail
with ``CI=true``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from google.cloud.firestore import AsyncClient

from samvad.emulator import FirestoreEmulator, find_gcloud, wipe_project
from tests.support.auth_emulator import AuthEmulator, find_firebase
from tests.support.faultproxy import FaultProxy
from tests.support.firestore import close_client, emulator_missing, make_emulator_client


def _split_host_port(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a running Firestore emulator, shared by the whole run."""
    existing = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if existing:
        yield existing
        return
    if find_gcloud() is None:
        reason = (
            "the Firestore emulator is not installed (need `gcloud` with the "
            "cloud-firestore-emulator component, e.g. the Debian package "
            "google-cloud-cli-firestore-emulator) and FIRESTORE_EMULATOR_HOST is not set"
        )
        emulator_missing(reason)
    log_path = tmp_path_factory.mktemp("firestore-emulator") / "emulator.log"
    with FirestoreEmulator.start(log_path=log_path) as emulator:
        yield emulator.host_port


@pytest.fixture
def firestore_project(request: pytest.FixtureRequest) -> Iterator[str]:
    """A project id of this test only: isolates its data on a shared emulator.

    Its documents are deleted after the test. The emulator keeps every
    project's data in its Java heap for the whole run: a suite that leaves
    hundreds of projects behind makes the emulator slower towards the end
    (its garbage collector has ever more to walk), which on a two-core CI
    machine pushed single reads past the server's 5 s deadline.
    """
    project = "samvad-test-" + uuid.uuid4().hex[:12]
    yield project
    if "firestore_emulator" in request.fixturenames:
        host_port = request.getfixturevalue("firestore_emulator")
        # Housekeeping, not part of the test: an emulator a test stopped or
        # cut off is not an error of that test.
        with contextlib.suppress(OSError, RuntimeError):
            wipe_project(host_port, project)


@pytest.fixture
async def firestore_client(
    firestore_emulator: str, firestore_project: str
) -> AsyncIterator[AsyncClient]:
    """An ``AsyncClient`` on the emulator for ``firestore_project``, closed afterwards."""
    client = make_emulator_client(firestore_emulator, firestore_project)
    try:
        yield client
    finally:
        await close_client(client)


@pytest.fixture
async def fault_proxy(firestore_emulator: str) -> AsyncIterator[FaultProxy]:
    """A started ``FaultProxy`` in front of the emulator, closed afterwards."""
    host, port = _split_host_port(firestore_emulator)
    proxy = await FaultProxy.start(host, port)
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture(scope="session")
def auth_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEmulator]:
    """A running Firebase Auth emulator, shared by the whole run.

    Tests that verify its tokens in-process also need ``FIREBASE_AUTH_EMULATOR_HOST``
    set while they run: use ``auth_emulator_env``.
    """
    existing = os.environ.get("FIREBASE_AUTH_EMULATOR_HOST")
    if existing:
        yield AuthEmulator.external(existing)
        return
    firebase = find_firebase()
    if firebase is None:
        emulator_missing(
            "the Firebase Auth emulator is not installed (run scripts/bootstrap: it installs "
            "firebase-tools from package-lock.json into node_modules) and "
            "FIREBASE_AUTH_EMULATOR_HOST is not set"
        )
    with AuthEmulator.start(firebase, workdir=tmp_path_factory.mktemp("auth-emulator")) as emulator:
        yield emulator


@pytest.fixture
def auth_emulator_env(auth_emulator: AuthEmulator, monkeypatch: pytest.MonkeyPatch) -> AuthEmulator:
    """The Auth emulator, with ``FIREBASE_AUTH_EMULATOR_HOST`` set for this test only."""
    monkeypatch.setenv("FIREBASE_AUTH_EMULATOR_HOST", auth_emulator.host_port)
    return auth_emulator
