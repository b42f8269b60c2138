"""Prometheus metrics of one app, served at ``/metrics``.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (never the
global default one: several apps may live in one process, as in the tests).
Counters and histograms are updated where things happen (HTTP requests by the
middleware, store writes by the write-behind's ``on_flush`` observer, frames by
the WebSocket glue, messages and interruptions by the use cases' observer);
gauges are read at scrape time from sources the lifespan registers
(:meth:`Metrics.add_source`), so the hot path pays nothing for them and this
module knows nothing of the services.

Label values are bounded: routes are path *templates* (``/api/session/{userId}/state``,
never a user id), store labels are collection names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from samvad.journal import JournalStats
from samvad.models import Mode, PersistenceStatus
from samvad.persistence import CacheStats

__all__ = [
    "CONTENT_TYPE",
    "UNMATCHED_ROUTE",
    "GaugeSource",
    "Metrics",
    "live_metrics",
    "persistence_metrics",
    "readiness_metrics",
]

#: Yields metrics read at scrape time (see :meth:`Metrics.add_source`).
GaugeSource = Callable[[], Iterable[Metric]]

#: ``Content-Type`` of :meth:`Metrics.render`.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The ``route`` label of requests no route matched (their paths are not labels).
UNMATCHED_ROUTE = "unmatched"


class Metrics:
    """The metrics of one app; bound to its services once the lifespan started."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_duration = Histogram(
            "samvad_http_request_duration_seconds",
            "HTTP request latency, by method, route template and status.",
            ["method", "route", "status"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.ws_opened = Counter(
            "samvad_websocket_connections_opened",
            "WebSocket connections accepted by the server.",
            registry=r,
        )
        self.ws_frames = Counter(
            "samvad_websocket_frames_received",
            "Client WebSocket frames, by what they turned out to be.",
            ["type"],
            registry=r,
        )
        self.messages = Counter(
            "samvad_messages",
            "Conversation messages stored, by role and transport.",
            ["role", "transport"],
            registry=r,
        )
        self.interruptions = Counter(
            "samvad_interruptions",
            "Barge-ins: replies cut (or amended late) with an interruption context pushed.",
            registry=r,
        )
        self.rate_limited = Counter(
            "samvad_rate_limited",
            "Requests or frames refused by a rate limit, by limit.",
            ["limit"],
            registry=r,
        )
        self.store_writes = Counter(
            "samvad_store_writes",
            "Writes to the store (Firestore), by collection or erase operation and outcome.",
            ["collection", "outcome"],
            registry=r,
        )
        self.store_write_duration = Histogram(
            "samvad_store_write_duration_seconds",
            "Latency of writes to the store (Firestore), by collection or erase operation.",
            ["collection"],
            buckets=_STORE_BUCKETS,
            registry=r,
        )
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # The default registry's process collectors, re-registered here (they are stateless).
            r.register(collector)
        self._sources = _Sources()
        r.register(self._sources)
        self._http: dict[tuple[str, str, int], Histogram] = {}

    def add_source(self, source: GaugeSource) -> Callable[[], None]:
        """Read more gauges from ``source`` at every scrape (the hot path pays
        nothing for them); returns the function that removes it again."""
        self._sources.sources.append(source)
        return lambda: self._sources.sources.remove(source)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered."""
        key = (method, route, status)
        child = self._http.get(key)
        if child is None:
            child = self._http[key] = self.http_duration.labels(method, route, str(status))
        child.observe(seconds)

    def observe_flush(self, collection: str, seconds: float, ok: bool) -> None:
        """The write-behind's ``on_flush`` observer: one store write finished."""
        self.store_writes.labels(collection, "ok" if ok else "error").inc()
        self.store_write_duration.labels(collection).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


class _Sources(Collector):
    """Gauges (and counters kept elsewhere) read at scrape time from the sources
    the lifespan registered: this module never reaches into the services."""

    def __init__(self) -> None:
        self.sources: list[GaugeSource] = []

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        for source in list(self.sources):
            yield from source()


def readiness_metrics(ready: bool) -> Iterator[Metric]:
    """``samvad_ready``."""
    gauge = GaugeMetricFamily("samvad_ready", "1 while the server accepts traffic (see /readyz).")
    gauge.add_metric([], 1.0 if ready else 0.0)
    yield gauge


def live_metrics(counts: Mapping[str, int], interruptions: int) -> Iterator[Metric]:
    """Live WebSocket connections, users and sessions, and the interruption stack."""
    for name, key, text in (
        ("samvad_websocket_connections", "connections", "Open WebSocket connections."),
        ("samvad_websocket_users", "users", "Users with an open WebSocket."),
        ("samvad_websocket_sessions", "sessions", "Sessions with a live channel."),
    ):
        yield GaugeMetricFamily(name, text, value=counts[key])
    yield GaugeMetricFamily(
        "samvad_interruptions_live",
        "Interruptions held on the in-memory stack (cleared by erasures).",
        value=interruptions,
    )


def persistence_metrics(
    status: PersistenceStatus, caches: Mapping[str, CacheStats]
) -> Iterator[Metric]:
    """The persistence mode, the write backlog and the view caches."""
    mode = GaugeMetricFamily(
        "samvad_persistence_mode",
        "1 for the current persistence mode (firestore, or memory during an outage).",
        labels=["mode"],
    )
    for candidate in Mode:
        mode.add_metric([candidate.value], 1.0 if status.mode is candidate else 0.0)
    yield mode
    backend = GaugeMetricFamily(
        "samvad_store_backend", "The store behind the cache (always 1).", labels=["backend"]
    )
    backend.add_metric([status.backend], 1.0)
    yield backend
    yield GaugeMetricFamily(
        "samvad_pending_writes",
        "Documents with writes waiting for the store.",
        value=status.pending_documents,
    )
    yield GaugeMetricFamily(
        "samvad_pending_writes_bytes",
        "Estimated memory of the writes waiting for the store.",
        value=status.pending_bytes,
    )
    yield GaugeMetricFamily(
        "samvad_pending_writes_in_flight",
        "Documents being written to the store right now.",
        value=status.pending_in_flight,
    )
    yield GaugeMetricFamily(
        "samvad_oldest_pending_write_age_seconds",
        "Age of the oldest write not yet in the store.",
        value=status.oldest_pending_age,
    )
    yield CounterMetricFamily(
        "samvad_writes_set_aside",
        "Changes Firestore refused for their content, kept in the dead-letter.",
        value=status.writes_set_aside,
    )
    yield GaugeMetricFamily(
        "samvad_replay_lag_seconds",
        "How long the oldest write past its scheduled time has waited "
        "(session activity is scheduled late on purpose).",
        value=status.replay_lag,
    )
    hits = CounterMetricFamily("samvad_cache_hits", "View cache hits, by cache.", labels=["cache"])
    misses = CounterMetricFamily(
        "samvad_cache_misses", "View cache misses (store reads), by cache.", labels=["cache"]
    )
    entries = GaugeMetricFamily(
        "samvad_cache_entries", "Entries in the view cache, by cache.", labels=["cache"]
    )
    size = GaugeMetricFamily(
        "samvad_cache_bytes", "Estimated memory of the view cache, by cache.", labels=["cache"]
    )
    for name, stats in caches.items():
        hits.add_metric([name], stats.hits)
        misses.add_metric([name], stats.misses)
        entries.add_metric([name], stats.entries)
        size.add_metric([name], stats.bytes)
    yield hits
    yield misses
    yield entries
    yield size


def journal_metrics(stats: JournalStats) -> Iterator[Metric]:
    """The write-ahead journal's counters (when it is on)."""
    for name, text, value in (
        ("records", "Writes appended to the journal.", stats.records_appended),
        ("bytes", "Bytes appended to the write-ahead journal.", stats.bytes_appended),
        ("fsyncs", "fsync calls of the write-ahead journal.", stats.fsyncs),
        ("batches", "Group commits of the write-ahead journal.", stats.batches),
    ):
        yield CounterMetricFamily(f"samvad_journal_{name}", text, value=value)
    yield GaugeMetricFamily(
        "samvad_journal_live_bytes",
        "Bytes of journal segments not yet confirmed by Firestore and deleted.",
        value=stats.live_bytes,
    )
