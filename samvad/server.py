"""Running the app under uvicorn with Samvad's shutdown order.

On SIGTERM or SIGINT: report not ready (``/readyz`` answers 503 to the
connections still open), stop accepting connections, close every WebSocket with
1001 ("going away", so clients reconnect elsewhere) instead of uvicorn's 1012,
let in-flight requests finish, then the lifespan flushes pending writes within
``SAMVAD_SHUTDOWN_FLUSH_SECONDS``, and the process exits 0.

With ``--workers N`` (:func:`run_workers`) a supervisor process binds the port
and starts N worker processes that share it, each a full instance (its own
write-behind, caches and change-feed listener, ``samvad.coherence``). On
SIGTERM or SIGINT the supervisor passes SIGTERM to every worker, each drains
as above, and the supervisor exits 0 once all have.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gc
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from samvad.config import Settings
from samvad.web.uvicorn_ws import TurnWebSocketProtocol

__all__ = [
    "YOUNG_THRESHOLD",
    "SamvadServer",
    "YoungCollections",
    "run",
    "run_workers",
    "tune_gc",
    "uvicorn_config",
]

logger = logging.getLogger(__name__)


class SamvadServer(uvicorn.Server):
    """uvicorn's server, closing WebSockets with 1001 and exiting 0 on a signal."""

    def __init__(self, config: uvicorn.Config, app: Starlette | None = None) -> None:
        super().__init__(config)
        # A worker's app is made by the config's factory, inside the worker.
        self._given_app = app
        self._young: YoungCollections | None = None

    @property
    def _app(self) -> Any:
        if self._given_app is not None:
            return self._given_app
        return _starlette_in(getattr(self.config, "loaded_app", None))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the captured signal after shutting down, which makes
        # the process die "by SIGTERM" (exit 143); a clean drain should exit 0.
        def handle(sig: int, frame: FrameType | None) -> None:
            logger.info("received %s: shutting down", signal.Signals(sig).name)
            self._not_ready()
            self.handle_exit(sig, frame)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        tune_gc()
        self._young = YoungCollections(asyncio.get_running_loop())
        self._young.start()

    def _not_ready(self) -> None:
        readiness = getattr(getattr(self._app, "state", None), "readiness", None)
        if readiness is not None:
            readiness.mark_stopping()

    async def shutdown(self, sockets: Any = None) -> None:
        self._not_ready()
        if self._young is not None:
            self._young.stop()
        for server in self.servers:
            server.close()
        svc = getattr(getattr(self._app, "state", None), "services", None)
        if svc is not None:
            try:
                await svc.hub.close_all(code=1001, reason="server shutting down")
            except Exception:
                logger.exception("closing WebSockets at shutdown failed")
        await super().shutdown(sockets=sockets)


#: Net allocations of tracked objects that start a young collection (see :func:`tune_gc`).
YOUNG_THRESHOLD = 5_000


def tune_gc() -> None:
    """Keep CPython's full collections off the hot path of a long-running server.

    The caches hold every live user's history: hundreds of thousands of
    objects that a full (generation 2) collection walks each time, pausing the
    event loop for tens to hundreds of milliseconds. Freezing what start-up
    allocated and making full collections rarer took message-to-ack p99 from
    657 ms to 11 ms at 5,000 connections and 1,000 messages/s, with the same
    memory after the run (docs/benchmarks.md). Reference cycles are still
    collected, only less often.

    Young collections start after 5,000 net allocations of tracked objects
    rather than CPython's 700. Each young collection walks what is alive of
    what was allocated since the last one, and a busy server always has the
    objects of its messages in flight: walked about seven times less often,
    they cost a WebSocket message about 12 % less CPU (medians of two
    interleaved runs), with the same ack latency when replies stream at
    1,000 messages/s (docs/benchmarks.md, section 22).
    :class:`YoungCollections` still bounds how long the youngest generation
    goes unwalked.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10_000)


class YoungCollections:
    """Collects the young generations on a schedule: the youngest every
    ``period`` seconds, the middle one every ``middle_every`` periods.

    CPython starts a young collection when the tracked objects allocated
    outnumber those freed by its first threshold (700 by default,
    :data:`YOUNG_THRESHOLD` here). A server streaming
    replies frees old objects (the replies that end) about as fast as it
    makes new ones (the replies that start), so that count hardly moves while
    the youngest generation fills with the objects of every reply started
    since: measured at 1,000 messages a second, it held 10,000 objects when a
    collection finally came, and the collections paused the loop for up to
    15 ms (the youngest) and 42 ms (the middle one). On this schedule (every
    50 and 200 ms) each collection has a few dozen milliseconds' worth of new
    objects to walk: pauses of at most about 4 and 12 ms at the same load, for
    about the same total work (docs/benchmarks.md, section 21). An idle
    server's collections find nothing to walk. Nothing is collected while
    ``gc`` is disabled.
    """

    __slots__ = ("_collect", "_count", "_handle", "_loop", "middle_every", "period")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        period: float = 0.05,
        middle_every: int = 4,
        collect: Callable[[int], object] = gc.collect,
    ) -> None:
        if period <= 0 or middle_every < 1:
            raise ValueError("The period must be positive and middle_every at least 1.")
        self._loop = loop
        self.period = period
        self.middle_every = middle_every
        self._collect = collect
        self._count = 0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(self.period, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = self._loop.call_later(self.period, self._tick)
        if gc.isenabled():
            self._count += 1
            self._collect(1 if self._count % self.middle_every == 0 else 0)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration Samvad runs with."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # logging is configured by samvad.logs
        "lifespan": "on",
        # uvicorn's websockets protocol, its writes of one loop turn in one
        # socket write (samvad.web.uvicorn_ws).
        "ws": TurnWebSocketProtocol,
        # The app closes oversized frames with 1009 itself; uvicorn's own limit
        # only bounds what is buffered before the app sees it.
        "ws_max_size": max(4 * settings.ws_max_frame_bytes, 1024 * 1024),
        # permessage-deflate only when configured (Settings.ws_compression).
        "ws_per_message_deflate": settings.ws_compression,
        "timeout_graceful_shutdown": 5,
        "proxy_headers": True,
        "server_header": False,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run(app: Starlette, settings: Settings) -> None:
    """Serve ``app`` until a signal, then drain (see module docstring)."""
    server = SamvadServer(uvicorn_config(app, settings), app)
    server.run()


def _starlette_in(app: Any) -> Starlette | None:
    """The Starlette app inside uvicorn's wrappers (proxy headers and the like)."""
    for _ in range(10):
        if app is None or isinstance(app, Starlette):
            return app
        app = getattr(app, "app", None)
    return None


# -- several workers on one port -------------------------------------------------------


def _worker_app(settings: Settings, index: int) -> Starlette:
    """The app of worker ``index`` (the config's factory, called in the worker).

    Each worker keeps what it writes to disk in ``$SAMVAD_DATA_DIR/worker-<index>``:
    a worker that replaces a dead one takes over its directory.
    """
    from samvad.logs import configure_logging
    from samvad.web.app import create_app

    # A spawned worker starts with Python's logging unconfigured.
    configure_logging(settings)
    return create_app(settings.replace(data_dir=settings.data_dir / f"worker-{index}"))


class _WorkerProcess(Process):
    """uvicorn's worker process, serving with :class:`SamvadServer`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = SamvadServer(self.config)
        return self._server


class _Workers(Multiprocess):
    """uvicorn's supervisor, starting :class:`_WorkerProcess` workers.

    It replaces a worker that dies, like uvicorn's; the signals that resize
    or restart the pool (SIGTTIN, SIGTTOU, SIGHUP) are not supported.
    """

    def __init__(self, config: uvicorn.Config, settings: Settings, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        self.settings = settings

    def _new(self, index: int) -> _WorkerProcess:
        config = copy.copy(self.config)
        config.app = functools.partial(_worker_app, self.settings, index)
        process = _WorkerProcess(config, self.sockets)
        process.start()
        return process

    def init_processes(self) -> None:
        for index in range(self.processes_num):
            self.processes.append(self._new(index))

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                logger.error("worker %s failed to start: stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.warning(
                "worker %s died (exit %s): starting another", process.pid, process.exitcode
            )
            self.processes[index] = self._new(index)

    def handle_hup(self) -> None:
        logger.warning("SIGHUP: restarting workers is not supported; ignored")

    def handle_ttin(self) -> None:
        logger.warning("SIGTTIN: adding workers is not supported; ignored")

    def handle_ttou(self) -> None:
        logger.warning("SIGTTOU: removing workers is not supported; ignored")


def run_workers(settings: Settings) -> None:
    """Serve with ``settings.workers`` processes sharing one port, until a signal."""
    config = uvicorn_config(
        functools.partial(_worker_app, settings, 0),  # each worker gets its own (_Workers._new)
        settings,
        factory=True,
        workers=settings.workers,
    )
    socket = config.bind_socket()
    logger.info(
        "Samvad supervisor: %d workers on %s:%d", settings.workers, settings.host, settings.port
    )
    try:
        _Workers(config, settings, sockets=[socket]).run()
    finally:
        socket.close()
    logger.info("Samvad supervisor: every worker has stopped")
