"""Shared helpers for the benchmark scripts: percentiles, machine facts, JSON
output, and a Samvad server run in its own process."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from samvad import allocator
from samvad.config import Settings

ROOT = Path(__file__).resolve().parent.parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/max (microseconds) of nanosecond samples."""
    if not samples_ns:
        return {"n": 0}
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        index = min(len(ordered) - 1, round(q * (len(ordered) - 1)))
        return ordered[index] / 1000

    return {
        "n": len(ordered),
        "p50_us": round(at(0.50), 2),
        "p90_us": round(at(0.90), 2),
        "p99_us": round(at(0.99), 2),
        "p999_us": round(at(0.999), 2),
        "max_us": round(ordered[-1] / 1000, 2),
        "mean_us": round(statistics.fmean(ordered) / 1000, 2),
    }


def ms(figures: Mapping[str, Any]) -> dict[str, Any]:
    """Microsecond percentiles (from :func:`percentiles`) as milliseconds."""
    out: dict[str, Any] = {}
    for key, value in figures.items():
        if key.endswith("_us"):
            out[key[:-3] + "_ms"] = round(value / 1000, 3)
        else:
            out[key] = value
    return out


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in ("starlette", "uvicorn", "websockets", "google-cloud-firestore", "grpcio"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    for name in ("uvloop", "httptools"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """The facts a benchmark figure needs next to it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib: float | None = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(),
        # This script's; servers it starts run in server_environ()'s.
        "allocator": allocator.describe(),
        "server_allocator": allocator.describe(server_environ(os.environ)),
        "commit": _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def server_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every server of a benchmark runs in: Samvad, the bare
    baseline and another checkout alike get the allocator ``samvad serve``
    would choose (``SAMVAD_ALLOCATOR``, default ``python``), so that a
    ratio compares the code and not the allocators."""
    chosen = Settings.from_env(environ).allocator
    tuned = allocator.tuned_environ(environ) if chosen == "hugepages" else None
    return tuned if tuned is not None else dict(environ)


def tune_this_process() -> None:
    """Run this benchmark script in ``samvad serve``'s allocator: executes it
    again, once, with ``SAMVAD_ALLOCATOR=hugepages`` (unless nothing would change)."""
    reason = allocator.reexec(Settings.from_env().allocator)
    if reason is not None:
        print(f"SAMVAD_ALLOCATOR=hugepages not applied: {reason}", file=sys.stderr)


def emit(name: str, figures: dict[str, Any], json_path: str | None) -> None:
    """Print the figures and, when asked, write them as JSON."""
    report = {"benchmark": name, "machine": machine(), "figures": figures}
    print(json.dumps(report, indent=2))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


def raise_open_files(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted``; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- process figures ---------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def post_json(url: str, body: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


class ServerProcess:
    """``python -m samvad serve`` in a child process, as a user would run it.

    ``env`` adds ``SAMVAD_*`` settings; the server's log goes to ``log_path``.
    ``module="bench._serve"`` runs the same command with the garbage collector
    instrumented (see ``bench/_serve.py``); ``wrapper`` is a command it runs
    under (``bench_ws_instructions.py``'s ``valgrind --tool=callgrind ...``).
    """

    def __init__(
        self,
        *,
        store: str = "memory",
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        open_files: int = 20_000,
        python: str | None = None,
        module: str = "samvad",
        root: Path | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        #: The source tree the server runs from (another checkout: an A/B of two versions).
        self.root = root or ROOT
        self.module = module
        self.store = store
        self.env = dict(env or {})
        self.log_path = (
            log_path or Path(tempfile.gettempdir()) / f"samvad-bench-server-{self.port}.log"
        )
        self.open_files = open_files
        self.python = python or sys.executable
        self.wrapper = tuple(wrapper)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> ServerProcess:
        env = server_environ({**os.environ, "PYTHONPATH": str(self.root), **self.env})
        open_files = self.open_files

        def limits() -> None:  # runs in the child before exec: the limit is inherited
            raise_open_files(open_files)

        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                *self.wrapper,
                self.python,
                "-m",
                self.module,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--store",
                self.store,
            ],
            env=env,
            cwd=str(self.root),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limits,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.healthz(timeout=1)
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited during start-up; see {self.log_path}"
                    ) from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not start within {timeout:.0f} s")

    def healthz(self, timeout: float = 5.0) -> dict[str, Any]:
        return get_json(self.url + "/healthz", timeout=timeout)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a graceful stop that flushes), then wait; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
