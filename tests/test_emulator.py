"""The emulator harness and the fault-injection proxy, against the real emulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud.firestore import AsyncClient

from samvad import emulator as emulator_module
from samvad.emulator import (
    EmulatorStartError,
    FirestoreEmulator,
    _http,
    _latest_export,
    find_gcloud,
    free_port,
    wipe_project,
)
from tests.support.faultproxy import FaultProxy
from tests.support.firestore import close_client, emulator_missing, make_emulator_client

pytestmark = pytest.mark.firestore

# The first RPC of a new channel can take more than a second on a cold
# emulator; only calls that are expected to fail get the short deadline.
FIRST_CALL_TIMEOUT = 15.0
RECOVERY_DEADLINE = 20.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def own_emulator_allowed() -> None:
    if find_gcloud() is None:
        emulator_missing("this test starts its own emulator: needs gcloud with the component")


async def start_emulator(data_dir: Path, project: str) -> FirestoreEmulator:
    return await asyncio.to_thread(
        lambda: FirestoreEmulator.start(data_dir=data_dir, project=project)
    )


async def set_quickly(client: AsyncClient, doc_id: str, data: dict[str, object]) -> None:
    """One attempt with a one-second deadline, no retries."""
    async with asyncio.timeout(3):
        await client.collection("items").document(doc_id).set(data, retry=None, timeout=1)


async def test_client_writes_and_reads_back(firestore_client: AsyncClient) -> None:
    doc = firestore_client.collection("items").document("a")
    await doc.set({"n": 1, "text": "hello"}, timeout=FIRST_CALL_TIMEOUT)

    snapshot = await doc.get()

    assert snapshot.exists
    assert snapshot.to_dict() == {"n": 1, "text": "hello"}


async def test_projects_do_not_see_each_others_documents(
    firestore_emulator: str, firestore_client: AsyncClient
) -> None:
    await (
        firestore_client.collection("items")
        .document("mine")
        .set({"n": 1}, timeout=FIRST_CALL_TIMEOUT)
    )
    other = make_emulator_client(firestore_emulator, "samvad-test-other-project")
    try:
        snapshot = await other.collection("items").document("mine").get()
    finally:
        await close_client(other)

    assert not snapshot.exists


async def test_wipe_empties_one_project(
    firestore_emulator: str, firestore_client: AsyncClient, firestore_project: str
) -> None:
    items = firestore_client.collection("items")
    await items.document("a").set({"n": 1}, timeout=FIRST_CALL_TIMEOUT)
    await items.document("b").set({"n": 2})

    await asyncio.to_thread(wipe_project, firestore_emulator, firestore_project)

    assert [doc async for doc in items.stream()] == []


@pytest.fixture
async def proxied_client(
    fault_proxy: FaultProxy, firestore_project: str
) -> AsyncIterator[AsyncClient]:
    client = make_emulator_client(fault_proxy.host_port, firestore_project)
    try:
        yield client
    finally:
        await close_client(client)


async def test_writes_fail_while_cut_and_recover_after_restore(
    fault_proxy: FaultProxy, proxied_client: AsyncClient, firestore_client: AsyncClient
) -> None:
    items = proxied_client.collection("items")
    await items.document("before").set({"n": 1}, timeout=FIRST_CALL_TIMEOUT)
    assert fault_proxy.open_connections >= 1

    fault_proxy.cut()
    for attempt in range(3):
        with pytest.raises((api_exceptions.ServiceUnavailable, TimeoutError)):
            await set_quickly(proxied_client, f"during-{attempt}", {"n": attempt})
    assert fault_proxy.is_cut
    assert fault_proxy.open_connections == 0
    assert fault_proxy.connections_refused >= 1

    fault_proxy.restore()
    async with asyncio.timeout(RECOVERY_DEADLINE):
        while True:
            try:
                await set_quickly(proxied_client, "after", {"n": 2})
                break
            except (api_exceptions.ServiceUnavailable, TimeoutError):
                # gRPC reconnects on its own backoff schedule.
                await asyncio.sleep(0.2)

    # Read directly from the emulator, not through the proxy.
    direct = firestore_client.collection("items")
    before = await direct.document("before").get()
    after = await direct.document("after").get()
    assert before.to_dict() == {"n": 1}
    assert after.to_dict() == {"n": 2}


async def open_echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_proxy_resets_open_and_new_connections_while_cut() -> None:
    server = await open_echo_server()
    port = server.sockets[0].getsockname()[1]
    proxy = await FaultProxy.start("127.0.0.1", port)
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"

            proxy.cut()
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
            writer.close()

            proxy.restore()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
            writer.close()
            await writer.wait_closed()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()

    assert proxy.connections_accepted == 2
    assert proxy.connections_refused == 1
    assert proxy.open_connections == 0


@pytest.mark.usefixtures("own_emulator_allowed")
async def test_data_dir_keeps_documents_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "firestore-data"
    project = "samvad-test-persist"

    first = await start_emulator(data_dir=data_dir, project=project)
    try:
        client = make_emulator_client(first.host_port, project)
        try:
            await (
                client.collection("items")
                .document("kept")
                .set({"n": 42}, timeout=FIRST_CALL_TIMEOUT)
            )
        finally:
            await close_client(client)
    finally:
        await asyncio.to_thread(first.stop)
    assert not first.is_running()

    second = await start_emulator(data_dir=data_dir, project=project)
    try:
        client = make_emulator_client(second.host_port, project)
        try:
            snapshot = (
                await client.collection("items").document("kept").get(timeout=FIRST_CALL_TIMEOUT)
            )
        finally:
            await close_client(client)
    finally:
        await asyncio.to_thread(second.stop)

    assert snapshot.to_dict() == {"n": 42}


@pytest.mark.usefixtures("own_emulator_allowed")
def test_stop_leaves_no_process_of_the_group_alive() -> None:
    emulator = FirestoreEmulator.start()
    pgid = emulator.pgid
    assert emulator.is_running()
    os.killpg(pgid, 0)  # the group exists

    started = time.monotonic()
    emulator.stop()
    emulator.stop()  # idempotent

    assert time.monotonic() - started < 15
    assert not emulator.is_running()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert emulator.watchdog_pid is None, "the watchdog was let go and reaped"


def rest_doc(project: str, path: str) -> str:
    return f"/v1/projects/{project}/databases/(default)/documents/{path}"


def wait_gone(pgid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process group {pgid} still alive"
        time.sleep(0.05)


_OWNER = """
import json, sys, threading
from pathlib import Path
from samvad.emulator import FirestoreEmulator, _http
emulator = FirestoreEmulator.start(data_dir=Path(sys.argv[1]), project="p1")
_http(emulator.host_port, "PATCH", "/v1/projects/p1/databases/(default)/documents/items/a",
      {"fields": {"n": {"integerValue": "7"}}})
print(json.dumps({"pgid": emulator.pgid, "watchdog": emulator.watchdog_pid}), flush=True)
threading.Event().wait()
"""


@pytest.mark.usefixtures("own_emulator_allowed")
def test_kill_9_of_the_owner_kills_the_whole_group_after_exporting(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(data_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert owner.stdout is not None
    with owner.stdout:
        try:
            started = json.loads(owner.stdout.readline())
            os.killpg(started["pgid"], 0)  # the emulator runs
        finally:
            owner.send_signal(signal.SIGKILL)
            owner.wait()

    # The launcher, its script and the JVM: every process of the group dies.
    wait_gone(started["pgid"])
    wait_gone(started["watchdog"])

    # What the emulator held when its owner died was exported first.
    with FirestoreEmulator.start(data_dir=data_dir, project="p1") as again:
        doc = json.loads(_http(again.host_port, "GET", rest_doc("p1", "items/a")))
    assert doc["fields"] == {"n": {"integerValue": "7"}}


@pytest.mark.usefixtures("own_emulator_allowed")
def test_periodic_exports_report_when_each_began(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    exported: list[float] = []
    done = threading.Event()

    def on_exported(started: float) -> None:
        exported.append(started)
        done.set()

    with FirestoreEmulator.start(data_dir=data_dir, project="p1") as emulator:
        _http(
            emulator.host_port,
            "PATCH",
            rest_doc("p1", "items/b"),
            {"fields": {"n": {"integerValue": "1"}}},
        )
        written = time.monotonic()
        emulator.export_periodically(0.01, on_exported)
        assert done.wait(60)
        with pytest.raises(RuntimeError, match="already"):
            emulator.export_periodically(0.01)

    assert exported[0] > written
    latest = _latest_export(data_dir)
    assert latest is not None
    assert (latest.parent / "samvad-export-complete").is_file()


@pytest.mark.usefixtures("own_emulator_allowed")
def test_one_data_directory_serves_one_emulator_at_a_time(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with (
        FirestoreEmulator.start(data_dir=data_dir, project="p1"),
        pytest.raises(EmulatorStartError, match="in use"),
    ):
        FirestoreEmulator.start(data_dir=data_dir, project="p1", ready_timeout=0.2)
    # Free again once the first one (and its watchdog) are gone.
    with FirestoreEmulator.start(data_dir=data_dir, project="p1") as again:
        assert again.is_running()


def test_an_export_cut_short_is_never_imported(tmp_path: Path) -> None:
    for name, complete in (("samvad-export-1", True), ("samvad-export-2", False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}.overall_export_metadata").touch()
        if complete:
            (folder / "samvad-export-complete").touch()

    latest = _latest_export(tmp_path)

    assert latest == tmp_path / "samvad-export-1" / "samvad-export-1.overall_export_metadata"


@pytest.mark.usefixtures("own_emulator_allowed")
def test_start_reports_the_emulators_output_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(EmulatorStartError, match="Address already in use"):
            FirestoreEmulator.start(port=port, ready_timeout=30)


@pytest.mark.usefixtures("own_emulator_allowed")
def test_start_retries_once_when_the_picked_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1], free_port()])
        monkeypatch.setattr(emulator_module, "free_port", lambda host: next(picks))
        log_path = tmp_path / "emulator.log"

        with FirestoreEmulator.start(log_path=log_path) as emulator:
            assert emulator.port != taken.getsockname()[1]
            assert emulator.is_running()

    log = log_path.read_text()
    assert "Address already in use" in log
    assert "Dev App Server is now running" in log


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_is_chosen_below_the_ephemeral_range() -> None:
    """A port from the ephemeral range could be taken by an outgoing connection
    or another bind to port 0 before it is used ("address already in use" once,
    for `samvad serve` after it started its emulator)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low > 10_001, "this machine's ephemeral range leaves no room below it"
    ports = {free_port() for _ in range(20)}
    assert all(10_000 <= port < low for port in ports), ports
    assert len(ports) > 1, "the choice is random, not one fixed port"
