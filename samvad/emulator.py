"""Run the Cloud Firestore emulator for tests and local development.

``FirestoreEmulator.start()`` launches ``gcloud emulators firestore start`` in its
own session, waits until it serves requests and stops the whole process group
(the ``gcloud`` launcher, the ``cloud_firestore_emulator`` bash script and its
Java child) on ``stop()``. ``python -m samvad.emulator -- CMD ...`` runs a
command against a fresh emulator, like ``firebase emulators:exec``.

Facts about emulator 1.19.9 that shape this module:

- A signal to any process of the group stops the JVM without exporting; only
  ``POST /shutdown`` lets it run its export-on-exit path, and that path fails
  for the ``(default)`` database (``Database name "projects/P/databases/" has
  invalid trailing "/"``). Persistence therefore uses the emulator's HTTP
  export API before shutdown instead of ``--export-on-exit``.
- ``--import-data`` takes the ``*.overall_export_metadata`` file of one export
  and seeds *every* project the emulator serves with that data.
- ``--rules`` and ``--import-data`` are passed through a bash script that
  re-splits its arguments, so their paths must not contain whitespace.
- The emulator answers its HTTP root before it serves documents; readiness
  is a document read that gets a Firestore answer (``NOT_FOUND`` counts).

The emulator never outlives the process that started it: a *watchdog*
process holds the read end of a pipe whose only write end this process keeps.
However this process ends, ``kill -9`` included, the kernel closes that end;
the watchdog then exports the data (with ``data_dir``) and kills the whole
process group. A parent-death signal (``PR_SET_PDEATHSIG``) would reach only
the ``gcloud`` launcher, not the JVM it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

__all__ = [
    "DEFAULT_PROJECT",
    "EmulatorNotInstalled",
    "EmulatorStartError",
    "FirestoreEmulator",
    "export_data",
    "find_gcloud",
    "free_port",
    "main",
    "wipe_project",
]

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "samvad-local"
"""Project whose data ``data_dir`` keeps, and the default ``GOOGLE_CLOUD_PROJECT``."""

_COMPONENT_DIR = Path("platform", "cloud-firestore-emulator")
_READY_LINE = "Dev App Server is now running"
_BIND_ERRORS = ("BindException", "Address already in use")
_EXPORT_PREFIX = "samvad-export-"
_METADATA_SUFFIX = ".overall_export_metadata"
# Written after an export completed: a kill during an export leaves none.
_COMPLETE_MARKER = "samvad-export-complete"
_WATCHDOG_EXPORT_TIMEOUT = 30.0
_HTTP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05
_TAIL_BYTES = 4000


class EmulatorNotInstalled(RuntimeError):
    """``gcloud`` or its ``cloud-firestore-emulator`` component is missing."""


class EmulatorStartError(RuntimeError):
    """The emulator exited or did not become ready; the message ends with its output."""


def find_gcloud() -> str | None:
    """The path of a ``gcloud`` whose SDK has the Firestore emulator, or ``None``.

    Checks ``<sdk root>/platform/cloud-firestore-emulator`` instead of running
    ``gcloud``, which takes about a second to start.
    """
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    candidates = [Path(gcloud).resolve().parent.parent]
    if sdk_root := os.environ.get("CLOUDSDK_ROOT_DIR"):
        candidates.insert(0, Path(sdk_root))
    for root in candidates:
        if (root / _COMPONENT_DIR / "cloud_firestore_emulator").is_file():
            return gcloud
    return None


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_CHOSEN_PORT = 10_000
_PORT_TRIES = 64


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing uses right now.

    Chosen below the kernel's ephemeral range when it can be: a port from
    that range (what binding port 0 gives) can be taken by any outgoing
    connection, or by another bind to port 0 such as the emulator's, between
    this answer and its use. That happened: ``samvad serve`` failed to bind
    its port with "address already in use" after starting its emulator.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    rng = random.SystemRandom()
    for _ in range(_PORT_TRIES if low > _LOWEST_CHOSEN_PORT + 1 else 0):
        port = rng.randrange(_LOWEST_CHOSEN_PORT, low)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # in use (or in TIME_WAIT): another
            return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wipe_project(host_port: str, project: str, *, timeout: float = _HTTP_TIMEOUT) -> None:
    """Delete every document of ``project``'s default database on the emulator at ``host_port``.

    Works on any emulator, including one this process did not start.
    """
    _http(
        host_port,
        "DELETE",
        f"/emulator/v1/projects/{project}/databases/(default)/documents",
        timeout=timeout,
    )


def _http(
    host_port: str,
    method: str,
    path: str,
    body: object | None = None,
    *,
    timeout: float = _HTTP_TIMEOUT,
) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{host_port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload: bytes = response.read()
            return payload
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        raise RuntimeError(
            f"emulator {method} {path} failed with HTTP {exc.code}: {detail}"
        ) from exc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A process we may not signal (pid reuse) is not one of ours.
        return False
    return True


def _check_path_arg(name: str, path: Path) -> None:
    if any(ch.isspace() for ch in str(path)):
        raise ValueError(
            f"{name} {str(path)!r} contains whitespace, which the emulator's launcher "
            "script cannot pass through"
        )


def _latest_export(data_dir: Path) -> Path | None:
    """The metadata file of the newest complete export in ``data_dir``."""
    exports = sorted(data_dir.glob(f"{_EXPORT_PREFIX}*/*{_METADATA_SUFFIX}"))
    complete = [m for m in exports if (m.parent / _COMPLETE_MARKER).is_file()]
    # A data directory from before the marker existed has unmarked exports only.
    chosen = complete or exports
    return chosen[-1] if chosen else None


def export_data(host_port: str, project: str, data_dir: Path, *, timeout: float = 60.0) -> Path:
    """Export ``project`` from the emulator at ``host_port`` into ``data_dir``.

    Returns the new export's metadata file (what ``--import-data`` takes);
    older exports are removed once the new one is complete.
    """
    name = f"{_EXPORT_PREFIX}{time.time_ns()}"
    body = {
        "database": f"projects/{project}/databases/(default)",
        "export_directory": str(data_dir),
        "export_name": name,
    }
    _http(host_port, "POST", f"/emulator/v1/projects/{project}:export", body, timeout=timeout)
    metadata = data_dir / name / f"{name}{_METADATA_SUFFIX}"
    if not metadata.is_file():
        raise RuntimeError(f"the emulator reported an export but {metadata} is missing")
    # On disk before it counts as complete: the server confirms journal records
    # once an export holds them (samvad.persistence), so a power cut must not
    # take back an export that was marked complete.
    _fsync_tree(metadata.parent)
    (metadata.parent / _COMPLETE_MARKER).touch()
    _fsync_tree(metadata.parent)
    _fsync_tree(data_dir, recursive=False)
    for old in data_dir.glob(f"{_EXPORT_PREFIX}*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return metadata


def _fsync_tree(path: Path, *, recursive: bool = True) -> None:
    """fsync the files under ``path`` (only ``path`` itself unless ``recursive``), then it."""
    if recursive:
        for child in path.rglob("*"):
            if child.is_file():
                fd = os.open(child, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            elif child.is_dir():
                _fsync_tree(child, recursive=False)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_data_dir(data_dir: Path, timeout: float) -> int:
    """Take the data directory's lock, waiting up to ``timeout`` seconds; returns its fd.

    The lock is shared with the emulator's watchdog, so it is free again only
    once both this process and the watchdog are gone: a server restarted after
    ``kill -9`` waits until the watchdog's export of the old emulator is done.
    """
    fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise EmulatorStartError(
                    f"the data directory {str(data_dir)!r} is in use by another emulator "
                    f"(or by its watchdog, exporting) after {timeout:g} s"
                ) from None
            time.sleep(_POLL_INTERVAL)


def _start_watchdog(
    pgid: int, host_port: str, project: str, data_dir: Path | None, lock_fd: int | None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the watchdog of the group ``pgid``; returns it and the pipe end to keep open."""
    read_end, write_end = os.pipe()  # neither end is inherited by other children
    try:
        watchdog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from samvad.emulator import _watchdog; sys.exit(_watchdog())",
                str(pgid),
                host_port,
                project,
                str(data_dir) if data_dir is not None else "",
            ],
            stdin=read_end,
            pass_fds=() if lock_fd is None else (lock_fd,),
            env=_importable_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C is for the server, which
            # stops the emulator itself.
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return watchdog, write_end


def _importable_env() -> dict[str, str]:
    """The environment, with this package importable however it was found."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _watchdog() -> int:
    """Body of the watchdog process (see the module docstring); argv: pgid host_port project dir."""
    pgid, host_port, project, data_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 4096):
                break  # every write end is closed: the owner is gone
        except InterruptedError:
            continue
    if not _group_alive(pgid):
        return 0  # stopped by its owner
    if data_dir:
        # The owner died without stopping the emulator: keep what it holds.
        with contextlib.suppress(Exception):
            export_data(host_port, project, Path(data_dir), timeout=_WATCHDOG_EXPORT_TIMEOUT)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return 0


class FirestoreEmulator:
    """One running emulator process group; build it with :meth:`start`.

    Usable as a context manager: leaving the ``with`` block calls :meth:`stop`.
    """

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        host: str,
        port: int,
        log_path: Path,
        log_offset: int,
        owns_log: bool,
        data_dir: Path | None,
        project: str,
        watchdog: subprocess.Popen[bytes] | None = None,
        watchdog_pipe: int | None = None,
        lock_fd: int | None = None,
    ) -> None:
        # Private: use FirestoreEmulator.start(), which does the I/O.
        self._process = process
        self._host = host
        self._port = port
        self._log_path = log_path
        # Where this run's output starts in a log file that may be appended to.
        self._log_offset = log_offset
        self._owns_log = owns_log
        self._data_dir = data_dir
        self._project = project
        self._stopped = False
        self._watchdog = watchdog
        self._watchdog_pipe = watchdog_pipe
        # The data directory's lock (see _lock_data_dir); the start() that
        # took it closes it if no emulator comes of it.
        self._lock_fd = lock_fd
        self._export_lock = threading.Lock()
        self._exporter: threading.Thread | None = None
        self._exporter_stop = threading.Event()

    @classmethod
    def start(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: Path | None = None,
        rules: Path | None = None,
        ready_timeout: float = 60.0,
        log_path: Path | None = None,
        project: str = DEFAULT_PROJECT,
    ) -> FirestoreEmulator:
        """Start an emulator and return once it serves requests.

        ``port=0`` picks a free port (and retries once with another one if it
        was taken in the meantime). With ``data_dir``, the newest export found
        there is imported at start, and :meth:`stop` exports ``project`` into
        it. ``rules`` is a security rules file, applied to non-admin requests.
        Output goes to ``log_path``, or to a temporary file removed by
        :meth:`stop`.

        Raises ``EmulatorNotInstalled`` without ``gcloud`` or the component,
        and ``EmulatorStartError`` if the emulator exits or is not ready
        within ``ready_timeout`` seconds.
        """
        gcloud = find_gcloud()
        if gcloud is None:
            raise EmulatorNotInstalled(
                "the Firestore emulator is not installed: need `gcloud` on PATH with the "
                "cloud-firestore-emulator component (Debian package "
                "google-cloud-cli-firestore-emulator, or "
                "`gcloud components install cloud-firestore-emulator`)"
            )
        args = ["emulators", "firestore", "start"]
        if rules is not None:
            rules = rules.resolve()
            _check_path_arg("rules", rules)
            if not rules.is_file():
                raise FileNotFoundError(f"rules file {str(rules)!r} does not exist")
            args.append(f"--rules={rules}")
        lock_fd: int | None = None
        if data_dir is not None:
            data_dir = data_dir.resolve()
            _check_path_arg("data_dir", data_dir)
            data_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = _lock_data_dir(data_dir, ready_timeout)
            previous = _latest_export(data_dir)
            if previous is not None:
                args.append(f"--import-data={previous}")
        try:
            return cls._start_locked(
                gcloud,
                args,
                host=host,
                port=port,
                data_dir=data_dir,
                lock_fd=lock_fd,
                ready_timeout=ready_timeout,
                log_path=log_path,
                project=project,
            )
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @classmethod
    def _start_locked(
        cls,
        gcloud: str,
        args: list[str],
        *,
        host: str,
        port: int,
        data_dir: Path | None,
        lock_fd: int | None,
        ready_timeout: float,
        log_path: Path | None,
        project: str,
    ) -> FirestoreEmulator:
        """The rest of :meth:`start`, once the data directory is locked."""
        owns_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="firestore-emulator-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        # A port picked by free_port() can be taken before the JVM binds it.
        attempts = 2 if port == 0 else 1
        for attempt in range(1, attempts + 1):
            chosen = port or free_port(host)
            emulator = cls._launch(
                gcloud,
                [*args, f"--host-port={_join_host_port(host, chosen)}"],
                host=host,
                port=chosen,
                log_path=log_path,
                owns_log=owns_log,
                data_dir=data_dir,
                project=project,
                lock_fd=lock_fd,
            )
            try:
                emulator._wait_ready(ready_timeout)
            except EmulatorStartError as exc:
                emulator._kill()
                if attempt < attempts and any(marker in str(exc) for marker in _BIND_ERRORS):
                    logger.info("emulator port %d was taken; retrying on another", chosen)
                    continue
                if owns_log:
                    log_path.unlink(missing_ok=True)
                raise
            except BaseException:
                emulator._kill()
                if owns_log:
                    log_path.unlink(missing_ok=True)
                raise
            return emulator
        raise AssertionError("unreachable")  # pragma: no cover

    @classmethod
    def _launch(
        cls,
        gcloud: str,
        args: list[str],
        *,
        host: str,
        port: int,
        log_path: Path,
        owns_log: bool,
        data_dir: Path | None,
        project: str,
        lock_fd: int | None = None,
    ) -> FirestoreEmulator:
        env = dict(os.environ)
        env["CLOUDSDK_CORE_DISABLE_PROMPTS"] = "1"
        # Output goes to a file: a pipe nobody drains would block the emulator.
        with log_path.open("ab") as log:
            log_offset = log.tell()
            process = subprocess.Popen(
                [gcloud, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        logger.debug("started emulator group %d on %s:%d", process.pid, host, port)
        try:
            watchdog, pipe = _start_watchdog(
                process.pid, _join_host_port(host, port), project, data_dir, lock_fd
            )
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        return cls(
            process=process,
            host=host,
            port=port,
            log_path=log_path,
            log_offset=log_offset,
            owns_log=owns_log,
            data_dir=data_dir,
            project=project,
            watchdog=watchdog,
            watchdog_pipe=pipe,
            lock_fd=lock_fd,
        )

    @property
    def host(self) -> str:
        """The address the emulator listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The emulator's port (gRPC and REST share it)."""
        return self._port

    @property
    def host_port(self) -> str:
        """``host:port``, the value ``FIRESTORE_EMULATOR_HOST`` takes."""
        return _join_host_port(self._host, self._port)

    @property
    def pgid(self) -> int:
        """The process group id of the launcher, the bash script and the JVM."""
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """Where the emulator's output goes."""
        return self._log_path

    def is_running(self) -> bool:
        """Whether the emulator process group is still alive."""
        return self._process.poll() is None

    def wipe(self, project: str) -> None:
        """Delete every document of ``project``'s default database."""
        wipe_project(self.host_port, project)

    def export(self, project: str | None = None) -> Path:
        """Export ``project`` (default: the one given to ``start``) into ``data_dir``.

        Returns the export's metadata file, the path ``--import-data`` takes.
        Older exports in ``data_dir`` are removed once the new one is complete.
        """
        if self._data_dir is None:
            raise RuntimeError('Cannot export: the emulator was started without "data_dir".')
        with self._export_lock:
            return export_data(self.host_port, project or self._project, self._data_dir)

    def export_periodically(
        self, interval: float, on_exported: Callable[[float], None] | None = None
    ) -> None:
        """Export every ``interval`` seconds on a background thread until :meth:`stop`.

        ``on_exported(started)`` is called after each successful export with
        the ``time.monotonic()`` at which it began: every write the emulator
        acknowledged before that moment is in the export.
        """
        if self._data_dir is None:
            raise RuntimeError('Cannot export: the emulator was started without "data_dir".')
        if self._exporter is not None:
            raise RuntimeError("The emulator already exports periodically.")

        def run() -> None:
            while not self._exporter_stop.wait(interval):
                started = time.monotonic()
                try:
                    self.export()
                except Exception:
                    logger.warning("periodic export of the emulator's data failed", exc_info=True)
                    continue
                if on_exported is not None:
                    try:
                        on_exported(started)
                    except Exception:
                        logger.exception("the export listener failed")

        self._exporter = threading.Thread(target=run, name="samvad-emulator-export", daemon=True)
        self._exporter.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process group, exporting to ``data_dir`` first if one was given.

        Asks the emulator to shut down over HTTP, then signals the group with
        SIGTERM and finally SIGKILL if it outlives ``timeout``. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout
        self._exporter_stop.set()
        if self._exporter is not None:
            self._exporter.join(timeout)
        try:
            if self.is_running():
                if self._data_dir is not None:
                    try:
                        self.export()
                    except Exception:
                        logger.exception("exporting emulator data to %s failed", self._data_dir)
                self._shutdown(deadline)
        finally:
            self._kill()
            if self._owns_log:
                self._log_path.unlink(missing_ok=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _shutdown(self, deadline: float) -> None:
        # The JVM's own shutdown path; a signal would also stop it, abruptly.
        with contextlib.suppress(OSError, RuntimeError):
            _http(self.host_port, "POST", "/shutdown", timeout=2.0)
        if self._wait_gone(min(deadline, time.monotonic() + 5.0)):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGTERM)
        self._wait_gone(deadline)

    def _kill(self) -> None:
        if self._process.poll() is None or _group_alive(self.pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
        self._process.wait()
        # The bash script and the JVM are reparented to init once the
        # launcher is gone; wait until init has reaped them.
        self._wait_gone(time.monotonic() + 5.0)
        self._release_watchdog()

    def _release_watchdog(self) -> None:
        """Let the watchdog go once the group is gone (it then finds nothing to do)."""
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)
            self._watchdog_pipe = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(5.0)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

    @property
    def watchdog_pid(self) -> int | None:
        """The watchdog process's id while it runs."""
        return self._watchdog.pid if self._watchdog is not None else None

    def _wait_gone(self, deadline: float) -> bool:
        while True:
            self._process.poll()
            if self._process.returncode is not None and not _group_alive(self.pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise EmulatorStartError(
                    f"the Firestore emulator exited with status {self._process.returncode} "
                    f"before it was ready; its output:\n{self._log_tail()}"
                )
            # The log line proves that *our* JVM bound the port; the HTTP check
            # that it serves. Either alone could be fooled by another server.
            if _READY_LINE in self._log_tail(None) and self._http_ok() and self._store_answers():
                return
            if time.monotonic() >= deadline:
                raise EmulatorStartError(
                    f"the Firestore emulator was not ready on {self.host_port} within "
                    f"{timeout:g} s; its output:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _http_ok(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host_port}/", timeout=1.0) as response:
                return bool(response.read().strip() == b"Ok")
        except (OSError, ValueError):
            return False

    def _store_answers(self) -> bool:
        """Whether a document read gets a Firestore answer.

        Found, ``NOT_FOUND`` and ``PERMISSION_DENIED`` (with ``--rules``, for a
        request the rules refuse) are all answers of a serving Firestore.
        """
        path = f"/v1/projects/{self._project}/databases/(default)/documents/_samvad/ready"
        try:
            _http(self.host_port, "GET", path, timeout=2.0)
        except RuntimeError as exc:
            return any(status in str(exc) for status in ("NOT_FOUND", "PERMISSION_DENIED"))
        except (OSError, ValueError):
            return False
        return True

    def _log_tail(self, limit: int | None = _TAIL_BYTES) -> str:
        """This run's output: its last ``limit`` bytes, or all of it with ``None``."""
        try:
            with self._log_path.open("rb") as log:
                end = log.seek(0, os.SEEK_END)
                start = self._log_offset if limit is None else end - limit
                log.seek(max(self._log_offset, start))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m samvad.emulator",
        usage="%(prog)s [options] [-- command [args ...]]",
        description=(
            "Start the Firestore emulator and print FIRESTORE_EMULATOR_HOST. With a "
            "command after --, run it against the emulator and exit with its status; "
            "otherwise run until SIGINT or SIGTERM."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--data-dir", type=Path, help="import from and export to this directory")
    parser.add_argument("--rules", type=Path, help="Firestore security rules file")
    parser.add_argument(
        "--project",
        default=os.environ.get("GOOGLE_CLOUD_PROJECT") or DEFAULT_PROJECT,
        help="GOOGLE_CLOUD_PROJECT for the command, and the project --data-dir keeps",
    )
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    return parser.parse_args(argv), command


def _run_command(command: list[str], env: dict[str, str]) -> int:
    child = subprocess.Popen(command, env=env)
    try:
        status = child.wait()
    except (_Stop, KeyboardInterrupt) as exc:
        if isinstance(exc, _Stop):
            signum = exc.signum
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        else:
            # A terminal's Ctrl-C reaches the child too (same process group):
            # give it time to stop on its own rather than interrupting it twice.
            signum = signal.SIGINT
        try:
            child.wait(10.0)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return 128 + signum
    return 128 - status if status < 0 else status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m samvad.emulator``; returns the exit status."""
    args, command = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    emulator: FirestoreEmulator | None = None
    try:
        emulator = FirestoreEmulator.start(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            rules=args.rules,
            ready_timeout=args.ready_timeout,
            project=args.project,
        )
        print(f"FIRESTORE_EMULATOR_HOST={emulator.host_port}", flush=True)
        if command:
            env = dict(os.environ)
            env["FIRESTORE_EMULATOR_HOST"] = emulator.host_port
            env.setdefault("GOOGLE_CLOUD_PROJECT", args.project)
            return _run_command(command, env)
        while emulator.is_running():
            time.sleep(0.5)
        print(f"the emulator exited unexpectedly:\n{emulator._log_tail()}", file=sys.stderr)
        return 1
    except (EmulatorNotInstalled, EmulatorStartError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except _Stop as stop:
        return 128 + stop.signum
    finally:
        if emulator is not None:
            emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
