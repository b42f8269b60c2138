"""``/metrics`` of a live server: HTTP latency by route template, WebSocket
connections, frames, messages and interruptions, caches, the write backlog,
store writes (against the Firestore emulator) and the persistence mode."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from samvad.client import SamvadClient
from samvad.config import Settings
from samvad.models import Mode
from samvad.responder import EchoResponder
from samvad.web.app import create_app
from samvad.web.metrics import LatencyHistogram, LoopCounter
from tests.support.faultproxy import FaultProxy
from tests.support.metrics import Scrape, scrape
from tests.support.server import live_server, outage_settings

HTTP = "samvad_http_request_duration_seconds_count"


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a state the server reaches on its own; the timeout only bounds a failure."""
    async with asyncio.timeout(10):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert await check(), what


async def test_requests_are_timed_by_route_template_never_by_id() -> None:
    async with (
        live_server(create_app(Settings(store="memory"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await http.get("/api/session/u-secret-1/state")).status_code == 404
        await http.post("/api/session/u-secret-1/state", json={"language": "en"})
        assert (await http.get("/api/session/u-secret-1/state")).status_code == 200
        assert (await http.get("/no/such/u-secret-2")).status_code == 404
        metrics = await scrape(http)
    route = "/api/session/{userId}/state"
    assert metrics.value(HTTP, method="GET", route=route, status="200") == 1
    assert metrics.value(HTTP, method="GET", route=route, status="404") == 1
    assert metrics.value(HTTP, method="POST", route=route, status="200") == 1
    assert metrics.value(HTTP, method="GET", route="unmatched", status="404") == 1
    assert "u-secret" not in metrics.text and "/no/such" not in metrics.text
    assert metrics.value("samvad_ready") == 1
    assert metrics.value("samvad_persistence_mode", mode="memory") == 1
    assert metrics.value("samvad_store_backend", backend="memory") == 1
    assert metrics.total("process_cpu_seconds_total") > 0, "process metrics included"


async def test_each_app_has_its_own_registry() -> None:
    async with (
        live_server(create_app(Settings(store="memory"))) as first,
        live_server(create_app(Settings(store="memory"))) as second,
        httpx.AsyncClient() as http,
    ):
        await http.get(first.url + "/healthz")
        await http.get(first.url + "/healthz")
        counted = [
            Scrape((await http.get(url + "/metrics")).text).value(
                HTTP, method="GET", route="/healthz", status="200"
            )
            for url in (first.url, second.url)
        ]
    assert counted == [2, 0]


class Gate:
    """A responder sleep that waits until the test opens it."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await self.opened.wait()


async def test_websocket_connections_frames_messages_and_interruptions_are_counted() -> None:
    gate = Gate()
    async with (
        live_server(create_app(Settings(store="memory"))) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        server.services.hub.responder = EchoResponder(sleep=gate.sleep)
        client = await SamvadClient.connect(f"{server.ws_url}/ws", user_id="u1", heartbeat=None)
        await client.message("tell me everything")
        await client.wait_for("reply.chunk")
        await client.interrupt(heard_chars=2)
        await client.wait_for("interrupted")
        gate.opened.set()
        exchange = await client.ask("and now?")
        assert exchange.reply.complete
        during = await scrape(http)
        await client.close()

        async def closed() -> bool:
            return (await scrape(http)).value("samvad_websocket_connections") == 0

        await _eventually(closed, "the connection gauge drops when the client leaves")
    assert during.value("samvad_websocket_connections") == 1
    assert during.value("samvad_websocket_users") == 1
    assert during.value("samvad_websocket_sessions") == 1
    assert during.value("samvad_websocket_connections_opened_total") == 1
    frames = "samvad_websocket_frames_received_total"
    assert during.value(frames, type="start") == 1
    assert during.value(frames, type="message") == 2
    assert during.value(frames, type="interrupt") == 1
    messages = "samvad_messages_total"
    assert during.value(messages, role="user", transport="websocket") == 2
    # The interrupted reply (what was heard) and the complete one.
    assert during.value(messages, role="assistant", transport="websocket") == 2
    assert during.value("samvad_interruptions_total") == 1
    assert during.value("samvad_interruptions_live") == 1


async def test_cache_hits_and_misses_and_the_write_backlog_are_visible() -> None:
    # Nothing is flushed during the test: writes stay pending.
    settings = Settings(store="memory", flush_linger=600.0, flush_interval=600.0)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        before = await scrape(http)
        await http.get("/api/session/u-miss/state")  # a miss: nothing there
        await http.post("/api/session/u1/state", json={"language": "en"})
        await http.post("/api/session/u1/history", json={"role": "user", "content": "hi"})
        await http.get("/api/session/u1/state")  # a hit
        after = await scrape(http)
        assert server.services.persistence.status().pending_documents == 2
    assert before.value("samvad_pending_writes") == 0
    assert after.value("samvad_pending_writes") == 2
    assert after.value("samvad_oldest_pending_write_age_seconds") >= 0
    for name in ("samvad_cache_hits_total", "samvad_cache_misses_total"):
        grew = after.value(name, cache="states") - before.value(name, cache="states")
        assert grew >= 1, name
    assert after.value("samvad_messages_total", role="user", transport="rest") == 1
    assert after.value("samvad_cache_entries", cache="states") >= 1


@pytest.mark.firestore
async def test_store_writes_are_counted_and_timed_by_collection(
    firestore_emulator: str, firestore_project: str
) -> None:
    settings = Settings(
        store="firestore",
        emulator_host=firestore_emulator,
        project=firestore_project,
        flush_linger=0.0,
    )
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await http.post("/api/session/u1/state", json={"language": "en"})
        await http.post("/api/session/u1/history", json={"role": "user", "content": "hi"})
        async with asyncio.timeout(30):
            await server.services.persistence.writes.flush()
        metrics = await scrape(http)
    assert metrics.value("samvad_store_backend", backend="firestore") == 1
    assert metrics.value("samvad_persistence_mode", mode="firestore") == 1
    for collection in ("user_states", "user_profiles"):
        writes = metrics.value("samvad_store_writes_total", collection=collection, outcome="ok")
        assert writes >= 1, collection
        timed = metrics.value("samvad_store_write_duration_seconds_count", collection=collection)
        assert timed == writes
        assert metrics.value("samvad_store_write_duration_seconds_sum", collection=collection) > 0


@pytest.mark.firestore
async def test_an_outage_shows_as_memory_mode_failed_writes_and_a_growing_backlog(
    fault_proxy: FaultProxy, firestore_project: str
) -> None:
    settings = outage_settings(fault_proxy.host_port, firestore_project)
    async with (
        live_server(create_app(settings)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        persistence = server.services.persistence
        await http.post("/api/session/u1/state", json={"language": "en"})
        async with asyncio.timeout(30):
            await persistence.writes.flush()
            await persistence.settle()  # no warm-up read left to meet the cut
        fault_proxy.cut()
        # The state is cached: no read, the write itself meets the outage.
        await http.post("/api/session/u1/state", json={"language": "hi"})

        async def in_memory_mode() -> bool:
            return persistence.mode is Mode.MEMORY

        await _eventually(in_memory_mode, "the failed write switched to memory mode")
        down = await scrape(http)
        fault_proxy.restore()
        async with asyncio.timeout(30):
            await persistence.writes.flush()
        up = await scrape(http)
    assert down.value("samvad_persistence_mode", mode="memory") == 1
    assert down.value("samvad_persistence_mode", mode="firestore") == 0
    assert down.value("samvad_pending_writes") == 1
    assert down.total("samvad_store_writes_total", outcome="error") >= 1
    assert up.value("samvad_persistence_mode", mode="firestore") == 1
    assert up.value("samvad_pending_writes") == 0
    assert up.value("samvad_store_writes_total", collection="user_states", outcome="ok") == 2


def test_the_lock_free_latency_histogram_exposes_what_prometheus_histogram_does() -> None:
    buckets = (0.0005, 0.001, 0.5, 5.0)
    observed = [("GET", "/a", 200, 0.0005), ("GET", "/a", 200, 0.0007), ("GET", "/a", 200, 9.0)]
    observed += [("POST", "/b", 400, 0.4), ("GET", "/a", 404, 0.0)]
    theirs_registry = CollectorRegistry()
    theirs = Histogram(
        "latency", "Doc.", ["method", "route", "status"], buckets=buckets, registry=theirs_registry
    )
    ours = LatencyHistogram("latency", "Doc.", buckets)
    ours_registry = CollectorRegistry()
    ours_registry.register(ours)
    for method, route, status, seconds in observed:
        theirs.labels(method, route, str(status)).observe(seconds)
        ours.child(method, route, status).observe(seconds)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        # _created holds the time each label set was first seen: not comparable.
        return sorted(line for line in text.splitlines() if "_created{" not in line)

    assert lines(ours_registry) == lines(theirs_registry)
    assert "latency_created{" in generate_latest(ours_registry).decode()


def test_the_lock_free_latency_histogram_takes_any_label_names() -> None:
    buckets = (0.001, 0.01, 1.0)
    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram("writes", "Doc.", ["collection"], buckets=buckets, registry=theirs_registry)
    ours = LatencyHistogram("writes", "Doc.", buckets, labelnames=["collection"])
    ours_registry.register(ours)
    for collection, seconds in (("user_states", 0.002), ("sessions", 0.5), ("user_states", 2.0)):
        theirs.labels(collection).observe(seconds)
        ours.child(collection).observe(seconds)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return sorted(line for line in text.splitlines() if "_created{" not in line)

    assert lines(ours_registry) == lines(theirs_registry)
    with pytest.raises(ValueError, match="takes the labels"):
        ours.child("user_states", "ok")


def test_the_lock_free_counters_expose_what_prometheus_counters_do() -> None:
    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    theirs_labelled = Counter("frames", "Doc.", ["type"], registry=theirs_registry)
    theirs_plain = Counter("opened", "Doc.", registry=theirs_registry)
    Counter("unused", "Doc.", ["limit"], registry=theirs_registry)
    ours_labelled = LoopCounter("frames", "Doc.", ["type"])
    ours_plain = LoopCounter("opened", "Doc.")
    for collector in (ours_labelled, ours_plain, LoopCounter("unused", "Doc.", ["limit"])):
        ours_registry.register(collector)
    for kind in ("ping", "message", "ping"):
        theirs_labelled.labels(kind).inc()
        ours_labelled.labels(kind).inc()
    theirs_plain.inc(2)
    ours_plain.inc(2)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return sorted(line for line in text.splitlines() if "_created" not in line)

    assert lines(ours_registry) == lines(theirs_registry)
    with pytest.raises(ValueError, match="non-negative"):
        ours_plain.inc(-1)
