"""The Starlette application: routes, error mapping and the lifespan that owns
every resource (store, persistence, interruption stack, live connections)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from samvad import __version__, api, realtime
from samvad.clock import Clock, SystemClock
from samvad.config import Settings
from samvad.firestore_client import client_from_settings
from samvad.http_errors import EXCEPTION_HANDLERS
from samvad.interruptions import InterruptionStack
from samvad.persistence import Persistence
from samvad.services import Services, services
from samvad.stores.base import HistoryBounds, Store
from samvad.stores.firestore import FirestoreStore
from samvad.stores.memory import MemoryStore
from samvad.wire import status_fields

logger = logging.getLogger(__name__)

StoreFactory = Callable[[Settings], Store]


def build_store(settings: Settings) -> Store:
    """The store ``settings`` ask for; ``auto`` means Firestore when one is configured."""
    bounds = HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes)
    use_firestore = settings.store == "firestore" or (
        settings.store == "auto" and settings.firestore_configured
    )
    if not use_firestore:
        if settings.store == "auto":
            logger.warning("No Firestore configured: running memory-only, data is lost on restart")
        return MemoryStore(bounds=bounds)
    client_from_settings(settings)  # fail at start-up, naming the missing variable
    return FirestoreStore(
        lambda: client_from_settings(settings),
        bounds=bounds,
        deadline=settings.firestore_deadline,
    )


async def healthz(request: Request) -> JSONResponse:
    """Liveness, with the persistence mode and the write backlog."""
    svc = services(request)
    return JSONResponse(
        {
            "status": "ok",
            "version": __version__,
            "persistence": status_fields(svc.persistence.status()),
        }
    )


async def _sweep_idle_sessions(persistence: Persistence, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await persistence.sweep_idle_sessions()
        except Exception:
            logger.exception("idle-session sweep failed")


def create_app(
    settings: Settings | None = None,
    *,
    store_factory: StoreFactory = build_store,
    clock: Clock | None = None,
) -> Starlette:
    """Build the ASGI app. No I/O happens until the lifespan starts."""
    settings = settings or Settings.from_env()
    clock = clock or SystemClock()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        store = store_factory(settings)
        async with store:
            persistence = Persistence(store, settings=settings, clock=clock)
            await persistence.start()
            svc = Services(
                settings=settings,
                persistence=persistence,
                interruptions=InterruptionStack(),
                started_at=clock.now(),
            )
            svc.hub = realtime.Hub(svc)
            app.state.services = svc
            sweeper = asyncio.create_task(
                _sweep_idle_sessions(persistence, max(5.0, settings.session_idle_timeout / 10)),
                name="samvad-idle-sweeper",
            )
            logger.info(
                "Samvad %s ready (store: %s, mode: %s)",
                __version__,
                store.name,
                persistence.mode.value,
            )
            try:
                yield {"services": svc}
            finally:
                await svc.hub.close_all(code=1001, reason="server shutting down")
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
                left = await persistence.close()
                logger.info("Samvad stopped; %d writes left unflushed", left)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        *api.routes(),
        *realtime.routes(),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
