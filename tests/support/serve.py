"""``samvad serve`` as a real process, for tests of what only a process shows:
signals, exit codes, logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from samvad.emulator import free_port

REPO = Path(__file__).resolve().parents[2]
_CLEARED = (
    "FIRESTORE_EMULATOR_HOST",
    "FIREBASE_AUTH_EMULATOR_HOST",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


@dataclass
class ServeProcess:
    """A running ``samvad serve``."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def send(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send ``sig`` (if the process still runs)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """The exit status, once the process has exited (killed after ``timeout``)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and return the exit status."""
        self.send(sig)
        return self.wait(timeout)


def serve_environ(tmp_path: Path, name: str = "serve", **env: str) -> dict[str, str]:
    """The environment of a ``samvad serve``: the test run's, without its
    Samvad, Firestore and Firebase variables, plus ``env``."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SAMVAD_") and key not in _CLEARED
    }
    environ["SAMVAD_DATA_DIR"] = str(tmp_path / f"{name}-data")
    environ.update(env)
    return environ


def run_serve(
    tmp_path: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``samvad serve ARGS`` with only ``env`` as configuration, for one
    that must not start: its exit status and output (a server that does
    start is killed after ``timeout`` and fails the test)."""
    return subprocess.run(
        [sys.executable, "-m", "samvad", "serve", "--port", str(free_port()), *args],
        cwd=REPO,
        env=serve_environ(tmp_path, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_serve(tmp_path: Path, name: str = "serve", **env: str) -> ServeProcess:
    """Start ``samvad serve`` on a free port with only ``env`` as Samvad's
    configuration (and no Firestore or Firebase variables of the test run),
    and wait until ``/readyz`` says ready."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    environ = serve_environ(tmp_path, name, **env)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "samvad", "serve", "--port", str(port)],
            cwd=REPO,
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    served = ServeProcess(process=process, port=port, log=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"samvad serve exited early:\n{served.output()}")
        try:
            if httpx.get(served.url + "/readyz", timeout=1).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    served.stop(signal.SIGKILL)
    raise AssertionError(f"samvad serve was not ready in 60 s:\n{served.output()}")


async def serve_on_firestore(
    tmp_path: Path, name: str, host: str, project: str, **env: str
) -> ServeProcess:
    """:func:`start_serve` (off the event loop) on the Firestore at ``host``
    (the emulator, or a fault proxy in front of it) for ``project``."""
    return await asyncio.to_thread(
        start_serve,
        tmp_path,
        name,
        SAMVAD_STORE="firestore",
        FIRESTORE_EMULATOR_HOST=host,
        GOOGLE_CLOUD_PROJECT=project,
        **env,
    )
