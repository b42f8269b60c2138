"""A real server for tests: uvicorn on a free port in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from samvad.config import Settings
from samvad.web.services import Services
from samvad.web.uvicorn_ws import TurnWebSocketProtocol


@dataclass
class LiveServer:
    """A running server: its URLs and, for assertions, its services."""

    server: uvicorn.Server
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def services(self) -> Services:
        state: dict[str, Any] = self.server.lifespan.state
        found: Services = state["services"]
        return found


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        # Leave the test runner's signal handlers alone.
        yield


#: Whether :func:`live_server` offers permessage-deflate when its caller does
#: not say (``ws_per_message_deflate``). Off, as ``samvad serve`` by default
#: (``SAMVAD_WS_COMPRESSION``): a ``websockets`` client, which asks for it,
#: then takes the paths a browser's connection takes in production. A test
#: module may switch it on to run through websockets' compressed path.
OFFER_DEFLATE = False


@contextlib.asynccontextmanager
async def live_server(app: Any, **config: Any) -> AsyncIterator[LiveServer]:
    """Serve ``app`` on 127.0.0.1 (port 0) until the block ends, then shut down gracefully.

    WebSockets run under the protocol ``samvad serve`` runs
    (:class:`samvad.web.uvicorn_ws.TurnWebSocketProtocol`) unless ``ws`` says
    otherwise, offering compression as :data:`OFFER_DEFLATE` says unless
    ``ws_per_message_deflate`` does.
    """
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "on",
        "ws": TurnWebSocketProtocol,
        "ws_per_message_deflate": OFFER_DEFLATE,
    }
    options.update(config)
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=0, **options))
    task = asyncio.create_task(server.serve())
    ready = asyncio.create_task(server.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            task.result()  # raises the start-up error
        raise RuntimeError("the test server did not start within 30 s")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(server=server, port=port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


def outage_settings(emulator_host: str, project: str, **overrides: Any) -> Settings:
    """Settings for a Firestore-backed app whose outages are noticed and ended fast.

    Point ``emulator_host`` at a ``FaultProxy``: a 0.5 s deadline, probes every
    50-200 ms, short backoffs and a 1 s shutdown flush keep outage tests quick.
    """
    options: dict[str, Any] = {
        "store": "firestore",
        "emulator_host": emulator_host,
        "project": project,
        "flush_linger": 0.0,
        "firestore_deadline": 0.5,
        "probe_interval": 0.05,
        "probe_max_interval": 0.2,
        "retry_max_backoff": 0.2,
        "shutdown_flush_deadline": 1.0,
    }
    options.update(overrides)
    return Settings(**options)
