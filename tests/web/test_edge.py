"""The HTTP edge (``samvad.web.middleware.HttpEdge``): the request context,
the journal hold, the exception handlers and the server-error answer in one
layer, over a real socket."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from samvad.errors import NotFound
from samvad.journal import JournalUnavailable
from samvad.persistence import WriteReceipt, current_receipt
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


class _Journal:
    """Stands for ``Persistence`` with a journal: records what the edge waited for."""

    def __init__(self, *, fails: bool) -> None:
        self.journal = object()
        self.fails = fails
        self.waited_for: list[WriteReceipt | None] = []

    async def durable(self, receipt: WriteReceipt | None = None) -> None:
        self.waited_for.append(receipt)
        if self.fails:
            raise JournalUnavailable("The journal cannot write; try another instance.")


def _with_persistence(persistence: _Journal, app: ASGIApp) -> ASGIApp:
    services = SimpleNamespace(persistence=persistence)

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = {"services": services}
        await app(scope, receive, send)

    return with_state


async def _writes_then_answers(scope: Scope, receive: Receive, send: Send) -> None:
    receipt = current_receipt.get()
    assert receipt is not None, "the edge makes a receipt current for the request"
    if scope["path"] == "/write":
        receipt.record = asyncio.get_running_loop().create_future()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _held_edge(metrics: Metrics) -> HttpEdge:
    handlers, server_error = exception_handlers(EXCEPTION_HANDLERS)
    return HttpEdge(
        _writes_then_answers,
        other=_unused,
        metrics=metrics,
        server_error=server_error,
        handlers=handlers,
    )


async def test_a_response_waits_for_its_own_writes_or_for_what_is_in_flight() -> None:
    journal = _Journal(fails=False)
    async with (
        live_server(_with_persistence(journal, _held_edge(Metrics())), lifespan="off") as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        wrote = await http.get("/write")
        read = await http.get("/read")
    assert wrote.status_code == read.status_code == 200
    own, in_flight = journal.waited_for
    assert own is not None and own.record is not None
    assert in_flight is None


async def test_a_journal_that_cannot_write_turns_the_response_into_a_503() -> None:
    metrics = Metrics()
    journal = _Journal(fails=True)
    async with (
        live_server(_with_persistence(journal, _held_edge(metrics)), lifespan="off") as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        response = await http.get("/write", headers={"X-Request-ID": "req-503"})
    assert response.status_code == 503
    assert response.json()["code"] == "journal_unavailable"
    assert response.headers["x-request-id"] == "req-503"
    scrape = Scrape(metrics.render().decode())
    count = "samvad_http_request_duration_seconds_count"
    assert scrape.value(count, method="GET", route="unmatched", status="503") == 1
    assert scrape.value(count, method="GET", route="unmatched", status="200") == 0
