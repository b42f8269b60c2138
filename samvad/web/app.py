"""The Starlette application: routes, error mapping, middleware and the
lifespan that owns every resource (store, persistence, interruption stack,
live connections, the ID token verifier, rate limits and metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from samvad import __version__
from samvad.clock import Clock, SystemClock
from samvad.coherence import Coherence
from samvad.config import AUTH_EMULATOR_VARIABLE, Settings, auth_emulator_host
from samvad.fanout import RemoteFanOut
from samvad.idempotency import IdempotencyKeys
from samvad.interruptions import InterruptionStack
from samvad.models import Role
from samvad.persistence import Persistence
from samvad.ratelimit import RateLimits
from samvad.service import SessionService
from samvad.stores.base import Store
from samvad.stores.factory import build_store
from samvad.web import apidocs, demo, realtime, rest
from samvad.web.auth import FirebaseTokenVerifier, TokenVerifier
from samvad.web.http_errors import EXCEPTION_HANDLERS
from samvad.web.metrics import (
    CONTENT_TYPE,
    Metrics,
    journal_metrics,
    live_metrics,
    persistence_metrics,
    readiness_metrics,
)
from samvad.web.middleware import (
    HttpEdge,
    RequestContextMiddleware,
    WebSocketOriginMiddleware,
    exception_handlers,
)
from samvad.web.routing import IndexedRouter
from samvad.web.schemas import (
    FeedView,
    Health,
    InstanceView,
    NotReady,
    Ready,
    WireResponse,
    persistence_view,
)
from samvad.web.services import Readiness, Services, services

__all__ = [
    "StoreFactory",
    "create_app",
    "healthz",
    "readyz",
]

logger = logging.getLogger(__name__)

StoreFactory = Callable[[Settings], Store]


async def healthz(request: Request) -> Response:
    """Liveness, with the persistence mode and the write backlog."""
    svc = services(request)
    coherence = svc.coherence
    feed = msgspec.convert(coherence.status(), FeedView) if coherence is not None else None
    return WireResponse(
        Health(
            version=__version__,
            persistence=persistence_view(svc.persistence.status()),
            instance=InstanceView(pid=os.getpid(), feed=feed),
        )
    )


async def readyz(request: Request) -> Response:
    """Readiness: 200 once start-up finished and until shutdown begins, else 503.

    Memory-only mode (Firestore unreachable) is still ready: the server keeps
    serving and replays its writes when Firestore returns, and an outage
    affects every instance alike, so taking this one out of rotation would
    not help.
    """
    readiness: Readiness = request.app.state.readiness
    if not readiness.ready:
        return WireResponse(NotReady(), status_code=503)
    return WireResponse(Ready(mode=services(request).persistence.status().mode))


async def _close_persistence(persistence: Persistence) -> None:
    left = await persistence.close()
    logger.info("Samvad stopped; %d writes left unflushed", left)


async def _open_coherence(settings: Settings, persistence: Persistence) -> Coherence | None:
    coherence = Coherence.for_settings(settings, persistence)
    if coherence is None:
        return None
    try:
        await coherence.start()
    except Exception:
        # Serving possibly stale views beats not serving; say so loudly.
        logger.exception("coherence across instances did not start")
    return coherence


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
    verify_token: TokenVerifier | None = None,
) -> Starlette:
    """Build the ASGI app. No I/O happens until the lifespan starts.

    ``verify_token`` replaces Firebase's ID-token check (when ``settings.auth``
    is on), for tests and for deployments with another identity provider.
    """
    settings = settings or Settings.from_env()
    clock = clock or SystemClock()
    metrics = Metrics()

    async def metrics_endpoint(request: Request) -> Response:
        """``GET /metrics``: Prometheus text format (keep it internal; see docs/deploy.md)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    readiness = Readiness()
    metrics.add_source(lambda: readiness_metrics(readiness.ready))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # Refuses the Auth emulator switch beside Cloud Firestore (ConfigError).
        if auth_emulator_host(settings) is not None:
            logger.warning(
                "%s is set: ID tokens are NOT verified (unsigned Auth emulator tokens are "
                "accepted). For tests with the emulators only; never in production.",
                AUTH_EMULATOR_VARIABLE,
            )
        # Built in dependency order; the stack closes in reverse: the sweeper,
        # the WebSockets, the write-behind's flush, the store, the verifier.
        async with contextlib.AsyncExitStack() as stack:
            verifier = None if verify_token is not None else _open_verifier(settings, clock)
            if verifier is not None:
                stack.callback(verifier.close)
            store = await stack.enter_async_context(store_factory(settings))
            persistence = Persistence(
                store, settings=settings, clock=clock, on_flush=metrics.observe_flush
            )
            await persistence.start()
            stack.push_async_callback(_close_persistence, persistence)
            # Other instances on this Firestore: hear their writes (samvad.coherence);
            # closed before the write-behind's last flush.
            coherence = await _open_coherence(settings, persistence)
            if coherence is not None:
                stack.push_async_callback(coherence.close)
            interruptions = InterruptionStack()
            service = SessionService(
                persistence,
                interruptions,
                settings=settings,
                limits=RateLimits.from_settings(settings, clock.monotonic),
                observer=_MetricsObserver(metrics),
            )
            verify = verify_token or (verifier.verify if verifier is not None else None)
            hub = realtime.Hub(service, settings=settings, metrics=metrics, verify_token=verify)
            service.bind_live(hub.engine)
            # Commits become the devices' ``durable`` frames (ignored once the hub closes).
            persistence.writes.observe_durable(hub.messages_durable)
            stack.push_async_callback(hub.close_all, code=1001, reason="server shutting down")
            if coherence is not None:
                # What other instances tell their devices, the devices here hear too.
                fanout = RemoteFanOut(hub.engine, persistence)
                coherence.subscribe(fanout)
                stack.push_async_callback(fanout.close)
            svc = Services(
                settings=settings,
                clock=clock,
                started_at=clock.now(),
                readiness=readiness,
                metrics=metrics,
                persistence=persistence,
                interruptions=interruptions,
                service=service,
                hub=hub,
                idempotency=IdempotencyKeys(
                    persistence,
                    ttl=settings.idempotency_ttl,
                    cache_bytes=settings.idempotency_cache_bytes,
                ),
                verify_token=verify,
                coherence=coherence,
            )
            stack.callback(
                metrics.add_source(
                    lambda: persistence_metrics(persistence.status(), persistence.cache_stats())
                )
            )
            if persistence.journal is not None:
                journal = persistence.journal
                stack.callback(metrics.add_source(lambda: journal_metrics(journal.stats())))
            stack.callback(
                metrics.add_source(lambda: live_metrics(hub.counts(), interruptions.total))
            )
            sweeper = asyncio.create_task(
                _sweep_idle_sessions(persistence, max(5.0, settings.session_idle_timeout / 10)),
                name="samvad-idle-sweeper",
            )
            stack.push_async_callback(_cancel, sweeper)
            app.state.services = svc
            readiness.mark_ready()
            logger.info(
                "Samvad %s ready (store: %s, mode: %s, auth: %s)",
                __version__,
                store.name,
                persistence.mode.value,
                settings.auth,
            )
            try:
                yield {"services": svc}
            finally:
                readiness.mark_stopping()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *apidocs.routes(),
        *rest.routes(),
        *realtime.routes(),
        *demo.routes(settings),
    ]
    app = _SamvadApp(settings, metrics)
    # The hot routes by a dict lookup instead of Starlette's one-by-one match.
    app.router = IndexedRouter(
        routes, guards=[r for r in routes if rest.is_path_guard(r)], lifespan=lifespan
    )
    app.state.readiness = readiness
    return app


class _MetricsObserver:
    """What the use cases count, as Prometheus metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # The labelled children, looked up once each rather than per message.
        self._stored: dict[tuple[Role, str], Any] = {}

    def message_stored(self, role: Role, transport: str) -> None:
        child = self._stored.get((role, transport))
        if child is None:
            child = self._stored[(role, transport)] = self._metrics.messages.labels(
                role.value, transport
            )
        child.value += 1.0  # inc(), inlined: twice per exchange

    def interruption_pushed(self) -> None:
        self._metrics.interruptions.inc()

    def rate_limited(self, limit: str) -> None:
        self._metrics.rate_limited.labels(limit).inc()


def _open_verifier(settings: Settings, clock: Clock) -> FirebaseTokenVerifier | None:
    if settings.auth == "off":
        if settings.api_keys:
            logger.warning("SAMVAD_API_KEYS is set but SAMVAD_AUTH is off: the keys are unused")
        return None
    if settings.firebase_project is None:
        # Settings.from_env refuses this; settings built in code may still do it.
        logger.error(
            "SAMVAD_AUTH=%s but no Firebase project is configured: ID tokens are refused",
            settings.auth,
        )
        return None
    return FirebaseTokenVerifier.open(settings, clock=clock)


class _SamvadApp(Starlette):
    """Starlette with Samvad's middleware stack (:func:`_middleware_stack`)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        super().__init__(exception_handlers=EXCEPTION_HANDLERS)
        self._settings = settings
        self._metrics = metrics

    def build_middleware_stack(self) -> ASGIApp:
        if self.user_middleware:
            raise RuntimeError("Samvad's app builds its own middleware stack: add none to it.")
        return _middleware_stack(self.router, self._settings, self._metrics)


def _middleware_stack(router: ASGIApp, settings: Settings, metrics: Metrics) -> ASGIApp:
    """HTTP through one layer (``HttpEdge``: the request context, the journal
    hold, the exception handlers), CORS between its parts when configured; a
    WebSocket handshake and the lifespan through the per-concern layers.
    Starlette's own stack would add two more layers to every request
    (``ServerErrorMiddleware`` and ``ExceptionMiddleware``, whose work the
    edge does)."""
    handlers, server_error = exception_handlers(EXCEPTION_HANDLERS)
    # WebSocket and lifespan scopes: request context, Origin check, then the
    # exception handlers (the endpoint holds its frames for the journal).
    other: ASGIApp = ExceptionMiddleware(router, handlers=handlers)
    other = WebSocketOriginMiddleware(
        other, allowed_origins=(*settings.cors_origins, *settings.ws_origins)
    )
    other = RequestContextMiddleware(other, metrics=metrics, access_log=settings.access_log)
    if not settings.cors_origins:
        return HttpEdge(
            router,
            other=other,
            metrics=metrics,
            access_log=settings.access_log,
            server_error=server_error,
            handlers=handlers,
        )
    # Browsers send ID tokens in the Authorization header, never cookies:
    # no credentialed CORS. Service keys (X-API-Key) are not for browsers.
    # Inside the request context (a preflight gets a request id and a metric),
    # outside the hold and the error handlers (their responses get CORS headers).
    cors = CORSMiddleware(
        HttpEdge(router, other=router, handlers=handlers),
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "PUT", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "X-Device-ID", "X-Request-ID"],
        expose_headers=["X-Request-ID", "Retry-After"],
        allow_credentials=False,
        max_age=600,
    )
    return HttpEdge(
        cors,
        other=other,
        metrics=metrics,
        access_log=settings.access_log,
        server_error=server_error,
    )
