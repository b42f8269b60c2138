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

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from samvad.journal import JournalStats
from samvad.models import Mode, PersistenceStatus
from samvad.persistence import CacheStats

__all__ = [
    "CONTENT_TYPE",
    "UNMATCHED_ROUTE",
    "GaugeSource",
    "LatencyHistogram",
    "LoopCounter",
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
        self.http_duration = LatencyHistogram(
            "samvad_http_request_duration_seconds",
            "HTTP request latency, by method, route template and status.",
            _HTTP_BUCKETS,
        )
        r.register(self.http_duration)
        self.ws_opened = LoopCounter(
            "samvad_websocket_connections_opened",
            "WebSocket connections accepted by the server.",
        )
        r.register(self.ws_opened)
        self.ws_frames = LoopCounter(
            "samvad_websocket_frames_received",
            "Client WebSocket frames, by what they turned out to be.",
            ["type"],
        )
        r.register(self.ws_frames)
        self.messages = LoopCounter(
            "samvad_messages",
            "Conversation messages stored, by role and transport.",
            ["role", "transport"],
        )
        r.register(self.messages)
        self.interruptions = LoopCounter(
            "samvad_interruptions",
            "Barge-ins: replies cut (or amended late) with an interruption context pushed.",
        )
        r.register(self.interruptions)
        self.rate_limited = LoopCounter(
            "samvad_rate_limited",
            "Requests or frames refused by a rate limit, by limit.",
            ["limit"],
        )
        r.register(self.rate_limited)
        # Observed by the write-behind, on the event loop: lock-free too.
        self.store_writes = LoopCounter(
            "samvad_store_writes",
            "Writes to the store (Firestore), by collection or erase operation and outcome.",
            ["collection", "outcome"],
        )
        r.register(self.store_writes)
        self.store_write_duration = LatencyHistogram(
            "samvad_store_write_duration_seconds",
            "Latency of writes to the store (Firestore), by collection or erase operation.",
            _STORE_BUCKETS,
            labelnames=["collection"],
        )
        r.register(self.store_write_duration)
        #: Per (collection, ok): the two children a store write counts in.
        self._flush_children: dict[tuple[str, bool], tuple[_CountChild, _LatencyChild]] = {}
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # The default registry's process collectors, re-registered here (they are stateless).
            r.register(collector)
        self._sources = _Sources()
        r.register(self._sources)

    def add_source(self, source: GaugeSource) -> Callable[[], None]:
        """Read more gauges from ``source`` at every scrape (the hot path pays
        nothing for them); returns the function that removes it again."""
        self._sources.sources.append(source)
        return lambda: self._sources.sources.remove(source)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered."""
        self.http_duration.child(method, route, status).observe(seconds)

    def observe_flush(self, collection: str, seconds: float, ok: bool) -> None:
        """The write-behind's ``on_flush`` observer: one store write finished."""
        children = self._flush_children.get((collection, ok))
        if children is None:
            children = self._flush_children[(collection, ok)] = (
                self.store_writes.labels(collection, "ok" if ok else "error"),
                self.store_write_duration.child(collection),
            )
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


class _LatencyChild:
    """The bucket counts of one label set (not cumulative: summed at scrape time)."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # Prometheus buckets are "<= le": the first bound not below the value.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class LatencyHistogram(Collector):
    """A Prometheus histogram observed from the event loop only, without locks.

    ``prometheus_client.Histogram`` takes a lock for the sum and for the
    bucket of every observation (it may be shared by threads) and its
    ``labels()`` builds a key per call: about a tenth of the web layer's own
    CPU per ``GET state``. The HTTP latency and the store writes' are only
    ever observed on the event loop's thread, so plain counters do; the exposition (``_bucket``,
    ``_count``, ``_sum`` and ``_created`` samples) is the one ``Histogram``
    gives.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: tuple[float, ...],
        labelnames: Iterable[str] = ("method", "route", "status"),
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.labelnames = tuple(labelnames)
        self._les = (*(floatToGoString(b) for b in self.bounds), "+Inf")  # type: ignore[no-untyped-call]
        # Keyed by the label values as given (an HTTP status as an int): str() at scrape time.
        self._children: dict[tuple[object, ...], _LatencyChild] = {}

    def child(self, *values: object) -> _LatencyChild:
        """The counters of one set of label values, in ``labelnames`` order
        (made on first use; keep it: looking it up costs a lookup)."""
        found = self._children.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {values}.")
            found = self._children[values] = _LatencyChild(self.bounds)
        return found

    def describe(self) -> Iterable[Metric]:
        return (Metric(self.name, self.documentation, "histogram"),)

    def collect(self) -> Iterable[Metric]:
        histogram = Metric(self.name, self.documentation, "histogram")
        created = Metric(f"{self.name}_created", self.documentation, "gauge")
        names = self.labelnames
        for values, child in list(self._children.items()):
            labels = {name: str(value) for name, value in zip(names, values, strict=True)}
            total = 0
            for le, count in zip(self._les, child.counts, strict=True):
                total += count
                histogram.add_sample(f"{self.name}_bucket", {**labels, "le": le}, float(total))
            histogram.add_sample(f"{self.name}_count", labels, float(total))
            histogram.add_sample(f"{self.name}_sum", labels, child.sum)
            created.add_sample(f"{self.name}_created", labels, child.created)
        yield histogram
        if prometheus_metrics._use_created:
            yield created


class _CountChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Count ``amount`` more (never negative: a counter only goes up)."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LoopCounter(Collector):
    """A Prometheus counter incremented on the event loop's thread only, without
    locks (``prometheus_client.Counter`` takes one per increment); the same
    ``labels(...).inc()`` use and the same exposition (``_total`` and
    ``_created`` samples). Unlabelled, it is its own child (``inc()``)."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _CountChild] = {}
        self._unlabelled = None if self.labelnames else self._child(())

    def _child(self, values: tuple[str, ...]) -> _CountChild:
        found = self._children.get(values)
        if found is None:
            found = self._children[values] = _CountChild()
        return found

    def labels(self, *values: str) -> _CountChild:
        """The counter of these label values (keep it: looking it up costs a lookup)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {values}.")
        return self._child(tuple(str(v) for v in values))

    def inc(self, amount: float = 1.0) -> None:
        """Count an unlabelled counter up."""
        if self._unlabelled is None:
            raise ValueError(f"{self.name} has labels: use labels(...).inc().")
        self._unlabelled.inc(amount)

    def describe(self) -> Iterable[Metric]:
        return (Metric(self.name, self.documentation, "counter"),)

    def collect(self) -> Iterable[Metric]:
        counter = Metric(self.name, self.documentation, "counter")
        created = Metric(f"{self.name}_created", self.documentation, "gauge")
        for values, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            counter.add_sample(f"{self.name}_total", labels, child.value)
            created.add_sample(f"{self.name}_created", labels, child.created)
        yield counter
        if prometheus_metrics._use_created:
            yield created


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
