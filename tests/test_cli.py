"""``samvad serve`` as a real process: the embedded emulator default, data kept
across restarts, and a graceful SIGTERM that exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from samvad.emulator import find_gcloud, free_port
from samvad.errors import ConfigError
from tests.support.firestore import emulator_missing
from tests.support.serve import run_serve, start_serve

REPO = Path(__file__).resolve().parent.parent


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in (
            "FIRESTORE_EMULATOR_HOST",
            "GOOGLE_CLOUD_PROJECT",
            "GCLOUD_PROJECT",
            "GOOGLE_APPLICATION_CREDENTIALS",
        )
        and not key.startswith("SAMVAD_")
    }
    env["SAMVAD_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def _start(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "samvad", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()}")
        try:
            response = httpx.get(url + "/healthz", timeout=1)
            if response.status_code == 200:
                body: dict[str, object] = response.json()
                return body
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready in 60 s:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


@pytest.mark.firestore
def test_serve_without_firestore_configured_runs_on_the_local_emulator_and_keeps_data(
    tmp_path: Path,
) -> None:
    if find_gcloud() is None:
        emulator_missing("the Firestore emulator is not installed")
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    first = _start(_env(data_dir), port, tmp_path / "first.log")
    try:
        health = _wait_ready(url, first, tmp_path / "first.log")
        assert health["persistence"] == {**health["persistence"], "backend": "firestore"}  # type: ignore[dict-item]
        saved = httpx.post(url + "/api/session/u1/state", json={"language": "hi"})
        assert saved.status_code == 200
        appended = httpx.post(
            url + "/api/session/u1/history", json={"role": "user", "content": "namaste"}
        )
        assert appended.status_code == 200
    finally:
        assert _stop(first) == 0, (tmp_path / "first.log").read_text()
    log = (tmp_path / "first.log").read_text()
    assert "started the local Firestore emulator" in log
    assert "namaste" not in log, "message content must never be logged"

    second = _start(_env(data_dir), port, tmp_path / "second.log")
    try:
        _wait_ready(url, second, tmp_path / "second.log")
        state = httpx.get(url + "/api/session/u1/state").json()
        assert state["state"]["language"] == "hi"
        profile = httpx.get(url + "/api/session/u1/profile").json()
        assert [m["content"] for m in profile["profile"]["conversationHistory"]] == ["namaste"]
    finally:
        assert _stop(second) == 0


def test_serve_memory_only_says_so_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    process = _start(_env(tmp_path, SAMVAD_STORE="memory"), port, log)
    try:
        health = _wait_ready(f"http://127.0.0.1:{port}", process, log)
        assert health["persistence"]["mode"] == "memory"  # type: ignore[index]
    finally:
        assert _stop(process) == 0
    assert "Memory-only store" in log.read_text()
    assert "NOT verified" not in log.read_text(), "no emulator warning without the switch"


def test_a_bad_setting_stops_serve_with_the_variable_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "samvad", "serve"],
        cwd=REPO,
        env=_env(tmp_path, SAMVAD_CACHE_TTL_SECONDS="forever"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SAMVAD_CACHE_TTL_SECONDS" in result.stderr
    assert ConfigError.__name__ not in result.stderr, "a clear message, not a traceback"


# -- the Auth emulator switch: with emulators only ---------------------------------------

SWITCH = "FIREBASE_AUTH_EMULATOR_HOST"
#: What ``samvad serve`` logs at start-up whenever the switch is set.
NOT_VERIFIED = "ID tokens are NOT verified"


@pytest.mark.parametrize(
    ("configuration", "args"),
    [
        ({"SAMVAD_STORE": "firestore", "GOOGLE_APPLICATION_CREDENTIALS": "key.json"}, ()),
        ({"GOOGLE_CLOUD_PROJECT": "prod-project"}, ()),
        (
            {"GOOGLE_CLOUD_PROJECT": "prod-project", "SAMVAD_STORE": "memory"},
            ("--store", "firestore"),
        ),
    ],
    ids=["service-account-key", "auto-with-project", "store-from-the-command-line"],
)
def test_serve_refuses_the_auth_emulator_switch_beside_cloud_firestore(
    tmp_path: Path, configuration: dict[str, str], args: tuple[str, ...]
) -> None:
    environ = dict(configuration)
    if "GOOGLE_APPLICATION_CREDENTIALS" in environ:
        # Never read: the refusal comes first. Only its existence is checked.
        key = tmp_path / environ["GOOGLE_APPLICATION_CREDENTIALS"]
        key.write_text("{}")
        environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(key)
    result = run_serve(tmp_path, *args, **environ, **{SWITCH: "127.0.0.1:9099"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert SWITCH in result.stderr
    assert "configuration error" in result.stderr
    assert "Traceback" not in result.stderr, "a clear message, not a traceback"
    assert "Uvicorn running" not in result.stdout + result.stderr


def _serves_with_the_switch(tmp_path: Path, **environ: str) -> str:
    served = start_serve(tmp_path, **environ, **{SWITCH: "127.0.0.1:9099"})
    try:
        assert httpx.get(served.url + "/healthz", timeout=5).status_code == 200
    finally:
        assert served.stop() == 0
    return served.output()


def test_serve_memory_only_with_the_switch_starts_and_warns(tmp_path: Path) -> None:
    log = _serves_with_the_switch(tmp_path, SAMVAD_STORE="memory")
    assert SWITCH in log
    assert NOT_VERIFIED in log


@pytest.mark.firestore
def test_serve_on_the_firestore_emulator_with_the_switch_starts_and_warns(
    tmp_path: Path, firestore_emulator: str, firestore_project: str
) -> None:
    log = _serves_with_the_switch(
        tmp_path,
        SAMVAD_STORE="firestore",
        FIRESTORE_EMULATOR_HOST=firestore_emulator,
        GOOGLE_CLOUD_PROJECT=firestore_project,
    )
    assert NOT_VERIFIED in log


def _wait_group_gone(pgid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"the emulator's process group {pgid} outlived serve"
        time.sleep(0.05)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass  # gone meanwhile
    return found


@pytest.mark.firestore
def test_kill_9_of_serve_leaves_no_emulator_and_the_next_start_has_the_data(
    tmp_path: Path,
) -> None:
    if find_gcloud() is None:
        emulator_missing("the Firestore emulator is not installed")
    data_dir = tmp_path / "data"
    first = start_serve(tmp_path, "first", SAMVAD_DATA_DIR=str(data_dir))
    try:
        pgid = int(re.findall(r"process group (\d+)", first.output())[0])
        assert httpx.post(first.url + "/api/session/u1/state", json={"mood": "calm"}).is_success
        for n in range(20):
            sent = httpx.post(
                first.url + "/api/session/u1/history", json={"role": "user", "content": f"m{n}"}
            )
            assert sent.is_success
        # Killed at once: some of it is only in the emulator (exported by the
        # watchdog), some only in the journal (replayed at the next start).
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    _wait_group_gone(pgid)
    assert _processes_mentioning(str(data_dir.resolve())) == []

    second = start_serve(tmp_path, "second", SAMVAD_DATA_DIR=str(data_dir))
    try:
        # Ready means the store answers: the very first reads see the data.
        health = httpx.get(second.url + "/healthz").json()
        assert health["persistence"]["mode"] == "firestore"
        state = httpx.get(second.url + "/api/session/u1/state").json()
        assert state["state"]["mood"] == "calm"
        profile = httpx.get(second.url + "/api/session/u1/profile").json()
        history = profile["profile"]["conversationHistory"]
        assert [m["content"] for m in history] == [f"m{n}" for n in range(20)]
    finally:
        assert second.stop() == 0


def _wait_health(url: str, ready: Callable[[dict[str, Any]], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        persistence = httpx.get(url + "/healthz", timeout=10).json()["persistence"]
        if ready(persistence):
            return
        assert time.monotonic() < deadline, f"not reached in {timeout:g} s: {persistence}"
        time.sleep(0.05)


@pytest.mark.firestore
def test_kill_9_of_the_emulator_after_a_commit_before_an_export_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    """The emulator keeps what it committed in its memory until an export: the
    journal must not let go of a write before an export holds it."""
    if find_gcloud() is None:
        emulator_missing("the Firestore emulator is not installed")
    data_dir = tmp_path / "data"
    env = {"SAMVAD_DATA_DIR": str(data_dir), "SAMVAD_EMULATOR_EXPORT_INTERVAL_SECONDS": "3600"}
    first = start_serve(tmp_path, "first", **env, SAMVAD_FIRESTORE_DEADLINE_SECONDS="2")
    try:
        pgid = int(re.findall(r"process group (\d+)", first.output())[0])
        assert httpx.post(first.url + "/api/session/u1/state", json={"mood": "calm"}).is_success
        for n in range(5):
            sent = httpx.post(
                first.url + "/api/session/u1/history", json={"role": "user", "content": f"m{n}"}
            )
            assert sent.is_success
        # Committed by the emulator, in its memory only: no export was made.
        _wait_health(first.url, lambda p: p["mode"] == "firestore" and p["pendingWrites"] == 0)
        # (The group outlives this as zombies until serve reaps its child.)
        os.killpg(pgid, signal.SIGKILL)
        # Acknowledged with the emulator gone: the journal holds it too.
        sent = httpx.post(
            first.url + "/api/session/u1/history", json={"role": "user", "content": "m5"}
        )
        assert sent.is_success
        _wait_health(first.url, lambda p: p["mode"] == "memory")
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    second = start_serve(tmp_path, "second", **env)
    try:
        state = httpx.get(second.url + "/api/session/u1/state")
        assert state.status_code == 200, state.text
        assert state.json()["state"]["mood"] == "calm"
        profile = httpx.get(second.url + "/api/session/u1/profile").json()
        history = profile["profile"]["conversationHistory"]
        assert [m["content"] for m in history] == [f"m{n}" for n in range(6)]
    finally:
        assert second.stop() == 0
