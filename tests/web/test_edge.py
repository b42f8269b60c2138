"""The HTTP edge (``samvad.web.middleware.HttpEdge``): the request context,
the exception handlers and the server-error answer in one layer, over a real
socket."""

from __future__ import annotations

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from samvad.errors import NotFound
from samvad.web.http_errors import EXCEPTION_HANDLERS
from samvad.web.metrics import Metrics
from samvad.web.middleware import HttpEdge, exception_handlers
from tests.support.metrics import Scrape
from tests.support.server import live_server


async def _failing(scope: Scope, receive: Receive, send: Send) -> None:
    """Raises what the request's path names."""
    if scope["path"] == "/unexpected":
        raise RuntimeError("a bug")
    if scope["path"] == "/not-found":
        raise NotFound("No such thing")
    # A handled error after the response started cannot be answered any more.
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise NotFound("too late")


async def _unused(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("only HTTP requests are sent")


def _edge(metrics: Metrics) -> HttpEdge:
    handlers, server_error = exception_handlers(EXCEPTION_HANDLERS)
    return HttpEdge(
        _failing,
        other=_unused,
        metrics=metrics,
        server_error=server_error,
        handlers=handlers,
    )


async def test_a_handled_error_and_an_unexpected_one_answer_json_with_a_request_id() -> None:
    metrics = Metrics()
    async with (
        live_server(_edge(metrics), lifespan="off") as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        handled = await http.get("/not-found", headers={"X-Request-ID": "req-404"})
        unexpected = await http.get("/unexpected", headers={"X-Request-ID": "req-500"})
    assert handled.status_code == 404
    assert handled.json() == {"success": False, "error": "No such thing", "code": "not_found"}
    assert handled.headers["x-request-id"] == "req-404"
    assert unexpected.status_code == 500
    assert unexpected.json()["error"] == "Internal server error"
    assert unexpected.headers["x-request-id"] == "req-500"
    scrape = Scrape(metrics.render().decode())
    count = "samvad_http_request_duration_seconds_count"
    assert scrape.value(count, method="GET", route="unmatched", status="404") == 1
    assert scrape.value(count, method="GET", route="unmatched", status="500") == 1


async def test_a_handled_error_after_the_response_started_is_not_answered_twice() -> None:
    metrics = Metrics()
    async with (
        live_server(_edge(metrics), lifespan="off") as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/late")
    # The status that went out is the one counted.
    scrape = Scrape(metrics.render().decode())
    count = "samvad_http_request_duration_seconds_count"
    assert scrape.value(count, method="GET", route="unmatched", status="200") == 1
