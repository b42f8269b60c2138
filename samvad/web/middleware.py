"""Pure ASGI middleware: the request context of every HTTP request and
WebSocket (a request id, log context and metrics), and the ``Origin`` check of
WebSocket handshakes (:class:`WebSocketOriginMiddleware`).

An HTTP request goes through one layer, :class:`HttpEdge`: the request
context, the journal hold of ``samvad.web.durable`` and the app's exception
handlers in one ``send`` wrapper (a layer per concern cost a coroutine frame
and a ``send`` wrapper each, for every request and every message of its
response). A WebSocket handshake (and the lifespan) takes the per-concern
layers as before: :class:`RequestContextMiddleware`,
:class:`WebSocketOriginMiddleware` and Starlette's ``ExceptionMiddleware``
(the endpoint holds its frames for the journal itself).

The request context (no per-request objects beyond a closure; another
engineer benchmarks the REST hot path) takes the client's ``X-Request-ID``
when it is a sane id or makes one, echoes it on the response, exposes it to log
records (``samvad.logs``) for the duration of the request, and records the
request's latency by route *template* in :class:`samvad.web.metrics.Metrics`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from samvad.journal import JournalUnavailable
from samvad.logs import (
    LogContext,
    TraceContext,
    log_context_var,
    parse_trace,
    request_id_var,
    trace_var,
)
from samvad.persistence import WriteReceipt, current_receipt
from samvad.web.durable import journal_hold, unavailable_response
from samvad.web.metrics import UNMATCHED_ROUTE, Metrics

__all__ = [
    "HOST_HEADER",
    "MAX_REQUEST_ID_LENGTH",
    "ORIGIN_HEADER",
    "REQUEST_ID_HEADER",
    "ErrorHandler",
    "HttpEdge",
    "RequestContextMiddleware",
    "WebSocketOriginMiddleware",
    "exception_handlers",
    "origin_logger",
    "route_label",
]

logger = logging.getLogger("samvad.access")
origin_logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
#: Longest client request id kept; longer or odder ones are replaced.
MAX_REQUEST_ID_LENGTH = 64
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


_TRACE_HEADERS = (b"x-cloud-trace-context", b"traceparent")


class _RequestIds:
    """Request ids of 32 hex digits: 64 random bits drawn once per process, then
    a counter (a ``uuid4`` per request cost more than the rest of the context)."""

    def __init__(self) -> None:
        self._prefix = ""
        self._next: Callable[[], int] = itertools.count().__next__
        self.reseed()

    def reseed(self) -> None:
        """A new random prefix (a forked child must not repeat its parent's ids)."""
        self._prefix = os.urandom(8).hex()
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():016x}"


_new_request_id = _RequestIds()
os.register_at_fork(after_in_child=_new_request_id.reseed)


def _sane_id(value: bytes) -> str | None:
    try:
        text: str = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    # Only ids that cannot forge a log line or bloat a label.
    if 0 < len(text) <= MAX_REQUEST_ID_LENGTH and _ID_CHARS.issuperset(text):
        return text
    return None


def _request_context(scope: Scope) -> tuple[str, TraceContext | None]:
    """The request id (the client's first ``X-Request-ID`` when sane, else a new
    one) and the trace, in one pass over the headers."""
    given: bytes | None = None
    traces: list[tuple[bytes, bytes]] | None = None
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            if given is None:
                given = value
        elif name in _TRACE_HEADERS:
            if traces is None:
                traces = []
            traces.append((name, value))
    request_id = _sane_id(given) if given is not None else None
    return request_id or _new_request_id(), parse_trace(traces) if traces else None


def route_label(scope: Scope) -> str:
    """The route template the router matched, or :data:`UNMATCHED_ROUTE`."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class RequestContextMiddleware:
    """The request context of a WebSocket connection: its request id and trace
    in the log context, and the connections accepted counted. (An HTTP
    request's context is :class:`HttpEdge`'s; other scopes pass through.)"""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            # The ids of the connection's log lines; its frames pass untouched
            # (the endpoint counts the connections it accepts).
            request_id, trace = _request_context(scope)
            token = request_id_var.set(request_id)
            trace_token = trace_var.set(trace)
            try:
                await self.app(scope, receive, send)
            finally:
                trace_var.reset(trace_token)
                request_id_var.reset(token)
            return
        await self.app(scope, receive, send)


#: An exception handler of the app: the request and the exception, to a response.
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class HttpEdge:
    """Every HTTP request in one layer; every other scope to ``other``.

    For an HTTP request, in this order from the outside in (each part can be
    switched off, so that a layer such as CORS can sit between two parts):

    * ``context``: the request id (``X-Request-ID``, echoed), the log context,
      the latency metric and the access log, as :class:`RequestContextMiddleware`
      does; and the ``server_error`` handler, for an exception no other
      handler takes, as Starlette's ``ServerErrorMiddleware`` does (the 500 it
      sends carries the request id; the exception is raised again for the
      server to log);
    * ``guard``: the journal hold (``samvad.web.durable``: the response starts
      once the journal has the writes the request made, or a 503 replaces it)
      and the app's ``handlers`` by exception class, as Starlette's
      ``ExceptionMiddleware`` (a handled error's response is held too).

    ``other`` gets WebSocket and lifespan scopes: the per-concern layers.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        other: ASGIApp,
        metrics: Metrics | None = None,
        access_log: bool = False,
        server_error: ErrorHandler | None = None,
        handlers: Mapping[type[Exception], ErrorHandler] | None = None,
    ) -> None:
        self.app = app
        self.other = other
        self.metrics = metrics
        self.access_log = access_log
        self.server_error = server_error
        #: With ``handlers``: the guard part is on.
        self.guard = handlers is not None
        self.handlers: dict[type[Exception], ErrorHandler] = dict(handlers or {})
        # What Starlette's ExceptionMiddleware puts in the scope, for routes
        # that handle their own exceptions (``request_response``).
        self._scope_handlers: tuple[dict[Any, ErrorHandler], dict[int, ErrorHandler]] = (
            dict(self.handlers),
            {},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.other(scope, receive, send)

    def handler(self, exc: Exception) -> ErrorHandler | None:
        """The handler of ``exc``'s nearest class that has one."""
        for cls in type(exc).__mro__:
            found = self.handlers.get(cls)
            if found is not None:
                return found
        return None

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics
        header: tuple[bytes, bytes] | None = None
        context_token = None
        if metrics is not None:
            request_id, trace = _request_context(scope)
            header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
            # The ids its log lines carry; Cloud Logging groups them under its trace.
            context_token = log_context_var.set(LogContext(request_id, trace))
        hold = None
        receipt_token = None
        if self.guard:
            # For routes that handle their own exceptions (``request_response``).
            scope["starlette.exception_handlers"] = self._scope_handlers
            hold = journal_hold(scope)
        receipt = WriteReceipt() if hold is not None else None
        if receipt is not None:
            receipt_token = current_receipt.set(receipt)
        holding = hold is not None
        status = 500
        started = False
        replaced = False

        async def edge_send(message: Message) -> None:
            nonlocal holding, status, started, replaced
            if replaced:
                return  # the rest of a response that was replaced by a 503
            if message["type"] == "http.response.start":
                started = True
                if holding:
                    assert hold is not None and receipt is not None
                    try:
                        # Its own writes; a request that made none waits for
                        # what is in flight, which it may show or acknowledge.
                        await hold(receipt if receipt.record is not None else None)
                    except JournalUnavailable as exc:
                        holding = False
                        await unavailable_response(exc)(scope, receive, edge_send)
                        replaced = True
                        return
                status = message["status"]
                if header is not None:
                    message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        began = time.perf_counter()
        try:
            try:
                await self.app(scope, receive, edge_send)
            except Exception as exc:
                handler = self.handler(exc) if self.guard else None
                if handler is None:
                    raise
                if started:
                    raise RuntimeError(
                        "Caught handled exception, but response already started."
                    ) from exc
                response = await handler(Request(scope, receive, send), exc)
                await response(scope, receive, edge_send)
                # Reused exception instances would pile up tracebacks across requests.
                exc.__traceback__ = None
        except Exception as exc:
            if self.server_error is None:
                raise
            if not started:
                holding = False  # answered outside the hold, as Starlette did
                response = await self.server_error(Request(scope), exc)
                await response(scope, receive, edge_send)
            raise
        finally:
            if receipt_token is not None:
                current_receipt.reset(receipt_token)
            if metrics is not None:
                elapsed = time.perf_counter() - began
                route = route_label(scope)
                metrics.observe_http(scope["method"], route, status, elapsed)
                if self.access_log:
                    _log_access(scope["method"], route, status, elapsed)
            if context_token is not None:
                log_context_var.reset(context_token)


def _log_access(method: str, route: str, status: int, elapsed: float) -> None:
    logger.info(
        "%s %s %d %.1f ms",
        method,
        route,
        status,
        elapsed * 1000,
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
        },
    )


def exception_handlers(
    handlers: Mapping[Any, ErrorHandler],
) -> tuple[dict[type[Exception], ErrorHandler], ErrorHandler | None]:
    """The app's handlers split as Starlette splits them: by exception class,
    and the one for ``Exception`` (or 500), the server error's."""
    by_class: dict[type[Exception], ErrorHandler] = {}
    server_error = None
    for key, value in handlers.items():
        if key in (500, Exception):
            server_error = value
        elif isinstance(key, type) and issubclass(key, Exception):
            by_class[key] = value
        else:
            raise ValueError(f"Exception handlers are keyed by exception class, not {key!r}.")
    return by_class, server_error


ORIGIN_HEADER = b"origin"
HOST_HEADER = b"host"
#: Longest Origin header echoed in the log when refused.
_MAX_LOGGED_ORIGIN = 100


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _normalized_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class WebSocketOriginMiddleware:
    """Refuse WebSocket handshakes from browser origins that are not allowed.

    A browser attaches ``Origin`` to every WebSocket handshake and lets any
    page open one (the same-origin policy does not apply), so without this
    check a page a signed-in user visits could speak to ``/ws`` in their name
    wherever credentials ride along (cross-site WebSocket hijacking). Allowed:
    the listed origins (``*`` allows any), and the server's own origin (the
    ``Origin`` names the ``Host`` the handshake went to: the demo page). A
    handshake without ``Origin`` comes from a non-browser client, which could
    send any ``Origin`` it liked anyway: it passes. A refused handshake is
    answered with HTTP 403 before the WebSocket is accepted.
    """

    def __init__(self, app: ASGIApp, *, allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allow_any = "*" in allowed_origins
        self.allowed = frozenset(_normalized_origin(o) for o in allowed_origins if o != "*")

    def allows(self, origin: str, host: str | None) -> bool:
        """Whether a handshake with this ``Origin`` to this ``Host`` may proceed."""
        normalized = _normalized_origin(origin)
        if self.allow_any or normalized in self.allowed:
            return True
        scheme, sep, netloc = normalized.partition("://")
        # "null" (sandboxed frames, file: pages) and other odd origins are refused.
        if not sep or scheme not in ("http", "https") or not netloc or host is None:
            return False
        return netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        origin = _header(scope, ORIGIN_HEADER)
        if origin is None or self.allows(origin, _header(scope, HOST_HEADER)):
            await self.app(scope, receive, send)
            return
        origin_logger.warning(
            "refused a WebSocket handshake from origin %r", origin[:_MAX_LOGGED_ORIGIN]
        )
        await receive()  # the websocket.connect event
        # Closing before accepting is answered with HTTP 403 by ASGI servers. (A
        # denial response with a body, the "websocket.http.response" extension,
        # makes uvicorn's websockets-sansio protocol log a spurious error.)
        await send({"type": "websocket.close", "code": 1008})
