"""Coherence across instances, with Firestore itself as the engine.

Every instance serves from its own caches, so an instance must hear what the
others write and erase. Each instance announces its writes in a *change feed*:
small documents in the ``_samvad_changes`` collection, and listens to the feed
with **one query** (``at >= its start``), whatever the number of users it
caches — not one listen stream per document.

* **Announcing** — each write submitted to :class:`~samvad.persistence.Persistence`
  (a tap) is copied into an :class:`Outbox`, which folds writes to one document
  together; every ``interval`` (50 ms) whatever gathered goes out as one
  feed document: ``{instance, at: server time, expireAt, events: JSON}``. An
  idle instance writes nothing. Writes are announced when they are made, not
  when the write-behind flushes them (at most about once a second per
  document), so another instance learns of them within the interval plus one
  Firestore round trip and one listener delivery.
* **Hearing** — the listener (``on_snapshot`` exists on the synchronous client
  only and calls back in its own thread) hands each new feed document to the
  event loop (``call_soon_threadsafe``). Another instance's write is laid over
  the cached view here and over loads until it has surely been flushed
  (:meth:`Persistence.apply_remote`); a document too large to announce is
  announced as "read it again" instead.
* **Erasure** — an erase is announced when it is submitted and again when it is
  done in the store. On the first, every other instance drops the user's (or
  session's) views and its own queued writes of them and treats the stored
  documents as gone; on the second it reads them again (anything written
  since). Session updates are written only where the session still exists
  (``FieldsWrite.must_exist``), so a late "end" never re-creates an erased one.
* **Cost** — one feed write per instance per interval while it is busy, one
  delete of it after ``retention`` seconds (each instance deletes its own;
  the ``expireAt`` TTL policy catches those of an instance that died), and one
  listener read per feed document for every other instance. Independent of
  how many users are cached; measured in ``bench/bench_coherence.py`` and
  ``docs/deploy.md``.

What it does not promise: a write another instance made in the last moments
before it heard of an erasure (a few hundred milliseconds) may be dropped with
the erasure, and a write already in flight when it hears may still land — an
erasure wins over writes concurrent with it. Reply chunks are not announced
(see ``samvad.fanout``). Subscribers (:meth:`Coherence.subscribe`) hear each
remote write after it was applied here: that is how ``message`` and ``state``
frames reach devices on other instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from samvad.clock import Clock, SystemClock
from samvad.config import Settings
from samvad.documents import (
    INTERRUPTIONS,
    PROFILES,
    SESSIONS,
    STATES,
    decode_message,
    encode_message,
)
from samvad.firestore_client import client_from_settings, close_client, sync_client_from_settings
from samvad.persistence import Persistence
from samvad.writes import Erase, EraseScope, FieldsWrite, Key, ProfileWrite, Write

__all__ = [
    "CHANGES",
    "ChangeFeed",
    "Coherence",
    "CoherenceConfig",
    "FeedStats",
    "Outbox",
    "RemoteChange",
    "decode_events",
    "encode_events",
]

logger = logging.getLogger(__name__)

#: The feed's collection.
CHANGES = "_samvad_changes"
#: Characters of events one feed document carries at most (Firestore's limit is 1 MiB).
MAX_DOC_CHARS = 800_000
#: Events kept while the feed cannot be written; older ones are dropped first.
MAX_UNSENT_EVENTS = 50_000


@dataclass(slots=True)
class _Source:
    """Another instance, as heard: the last of its documents applied here and
    the ones that came early."""

    last: int
    waiting: dict[int, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    filling: asyncio.Task[None] | None = None


def _seq(data: Mapping[str, Any]) -> int:
    seq = data.get("seq")
    return seq if isinstance(seq, int) else 0


@dataclass(frozen=True, slots=True)
class CoherenceConfig:
    """Timing of the change feed (``SAMVAD_COHERENCE_*``)."""

    #: Seconds between feed documents of a busy instance.
    interval: float = 0.05
    #: Seconds a feed document lives before its instance deletes it.
    retention: float = 120.0
    #: Seconds the listener starts before this instance started.
    overlap: float = 5.0
    #: Newest feed documents the listener watches (see ``ChangeFeed._listen``).
    window: int = 50
    #: Seconds between checks that the listener still runs.
    supervise_every: float = 5.0
    #: Bound of one Firestore call of the feed.
    deadline: float = 5.0


@dataclass(frozen=True, slots=True)
class RemoteChange:
    """A write or an erase another instance made, as subscribers hear it (after
    it was applied here; an erase when it was announced)."""

    write: FieldsWrite | ProfileWrite | Erase


@dataclass(slots=True)
class FeedStats:
    """What the feed did (for ``/metrics`` and the benchmark)."""

    docs_published: int = 0
    events_published: int = 0
    docs_received: int = 0
    events_received: int = 0
    docs_deleted: int = 0
    publish_failures: int = 0
    events_dropped: int = 0
    listener_restarts: int = 0
    #: Times documents were missed by the listener and read with a query.
    gaps: int = 0
    docs_filled: int = 0
    #: Times missed documents were gone for good (the caches were dropped).
    lost: int = 0
    #: Seconds from a feed document's server time to its arrival here, recent ones.
    lags: deque[float] | None = None


# -- events: writes as JSON ------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    raise TypeError(f"Cannot announce a value of type {type(value).__name__}.")


def _typed(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$dt" in obj:
        return datetime.fromisoformat(obj["$dt"])
    return obj


def _event(write: Write) -> dict[str, Any] | None:
    if isinstance(write, FieldsWrite):
        if write.collection not in (STATES, SESSIONS):
            return None  # interruption records are never cached
        return {
            "k": "f",
            "c": write.collection,
            "id": write.doc_id,
            "u": write.user_id,
            "s": write.session_id,
            "f": write.fields,
            "d": write.defaults,
            "t": write.touch,
            "x": write.must_exist,
            "mg": list(write.merge),
        }
    if isinstance(write, ProfileWrite):
        return {
            "k": "p",
            "u": write.user_id,
            "m": [encode_message(m) for m in write.append],
            "pr": write.preferences,
            "cap": write.cap,
        }
    return {"k": "e", "scope": write.scope.value, "id": write.target_id}


def encode_events(events: list[dict[str, Any]]) -> str:
    """``events`` as the JSON a feed document carries (datetimes tagged)."""
    return json.dumps(events, default=_plain, separators=(",", ":"), ensure_ascii=False)


def decode_events(text: str) -> list[dict[str, Any]]:
    """The events of a feed document."""
    events = json.loads(text, object_hook=_typed)
    return events if isinstance(events, list) else []


def write_of(event: Mapping[str, Any]) -> FieldsWrite | ProfileWrite | None:
    """The write a ``f`` or ``p`` event describes (None for other events)."""
    kind = event.get("k")
    if kind == "f":
        return FieldsWrite(
            collection=str(event["c"]),
            doc_id=str(event["id"]),
            user_id=str(event["u"]),
            session_id=event.get("s"),
            fields=dict(event.get("f") or {}),
            defaults=dict(event.get("d") or {}),
            touch=bool(event.get("t")),
            must_exist=bool(event.get("x")),
            merge=tuple(str(name) for name in event.get("mg") or ()),
        )
    if kind == "p":
        return ProfileWrite(
            user_id=str(event["u"]),
            append=[decode_message(m) for m in event.get("m") or ()],
            preferences=dict(event.get("pr") or {}),
            cap=int(event.get("cap") or 100),
        )
    return None


def _copy(write: FieldsWrite | ProfileWrite) -> FieldsWrite | ProfileWrite:
    # The write-behind folds later writes into the one it queued: keep our own.
    if isinstance(write, FieldsWrite):
        return FieldsWrite(
            collection=write.collection,
            doc_id=write.doc_id,
            user_id=write.user_id,
            fields=dict(write.fields),
            session_id=write.session_id,
            defaults=dict(write.defaults),
            touch=write.touch,
            must_exist=write.must_exist,
            merge=write.merge,
        )
    return ProfileWrite(
        user_id=write.user_id,
        append=list(write.append),
        preferences=dict(write.preferences),
        cap=write.cap,
    )


class Outbox:
    """Writes waiting to be announced, folded per document in submission order.

    Sans-I/O. An erase closes the current batch, so that writes before it and
    after it are never folded together across it.
    """

    def __init__(self, max_events: int = MAX_UNSENT_EVENTS) -> None:
        self._done: list[dict[str, Any]] = []
        self._open: OrderedDict[Key, FieldsWrite | ProfileWrite] = OrderedDict()
        self._max = max_events
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._done) + len(self._open)

    def add(self, write: Write) -> None:
        """Take ``write`` (copied) to announce it."""
        if isinstance(write, Erase):
            self._close()
            self._append(_event(write))
            return
        if isinstance(write, FieldsWrite) and write.collection == INTERRUPTIONS:
            return
        found = self._open.get(write.key)
        if found is not None:
            found.absorb(write)  # type: ignore[arg-type]  # same key, same type
            return
        self._open[write.key] = _copy(write)
        if len(self) > self._max:
            # The feed cannot be written (Firestore unreachable for long): what
            # was not announced is replaced by "drop everything cached", which
            # is always true and takes one event.
            self._close()
            self.dropped += len(self._done)
            self._done = [{"k": "r"}]

    def add_event(self, event: dict[str, Any]) -> None:
        """Announce ``event`` (an erase being done) after what was added before."""
        self._close()
        self._append(event)

    def _append(self, event: dict[str, Any] | None) -> None:
        if event is not None:
            self._done.append(event)

    def _close(self) -> None:
        for write in self._open.values():
            self._append(_event(write))
        self._open.clear()

    def drain(self) -> tuple[list[str], int]:
        """Everything gathered, as the ``events`` texts of one or more feed
        documents, and how many events they hold."""
        self._close()
        events, self._done = self._done, []
        docs: list[str] = []
        batch: list[str] = []
        size = count = 0
        for event in events:
            try:
                text = encode_events([event])
            except (TypeError, ValueError):
                logger.warning("a write to %s could not be announced", event.get("id"))
                continue
            if len(text) > MAX_DOC_CHARS:
                text = encode_events([_too_large(event)])
            if batch and size + len(text) > MAX_DOC_CHARS:
                docs.append("[" + ",".join(batch) + "]")
                batch, size = [], 0
            batch.append(text[1:-1])
            size += len(text)
            count += 1
        if batch:
            docs.append("[" + ",".join(batch) + "]")
        return docs, count


def _too_large(event: Mapping[str, Any]) -> dict[str, Any]:
    # Too large for one feed document: the others read the document again.
    if event.get("k") == "p":
        return {"k": "i", "c": PROFILES, "id": event["u"], "u": event["u"]}
    return {"k": "i", "c": event.get("c"), "id": event.get("id"), "u": event.get("u")}


# -- the feed: Firestore I/O ------------------------------------------------------------

Receiver = Callable[[list[dict[str, Any]]], None]


class ChangeFeed:
    """Publishes this instance's events and listens to the others'.

    Owns its two clients: an ``AsyncClient`` for writing and a synchronous
    ``Client`` for the listener (the async client has none). Construction does
    no I/O; :meth:`start` begins listening, :meth:`close` sends what is left
    and stops.
    """

    def __init__(
        self,
        async_client_factory: Callable[[], firestore.AsyncClient],
        sync_client_factory: Callable[[], firestore.Client],
        *,
        config: CoherenceConfig | None = None,
        clock: Clock | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.config = config or CoherenceConfig()
        self.clock = clock or SystemClock()
        self.instance_id = instance_id or uuid.uuid4().hex[:16]
        self.outbox = Outbox()
        self.stats = FeedStats(lags=deque(maxlen=10_000))
        self._async_factory = async_client_factory
        self._sync_factory = sync_client_factory
        self._client: firestore.AsyncClient | None = None
        self._sync: firestore.Client | None = None
        self._watch: Any = None
        self._receiver: Receiver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sources: dict[str, _Source] = {}
        self._since: datetime | None = None
        self._seq = 0
        # Feed documents built but not yet written: (id, seq, events).
        self._unsent: list[tuple[str, int, str]] = []
        self._unsent_events = 0
        self._on_lost: Callable[[], None] | None = None
        self._mine: deque[tuple[float, str]] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, receiver: Receiver, *, on_lost: Callable[[], None] | None = None) -> None:
        """Listen for other instances' events (``receiver`` gets them on the loop);
        ``on_lost`` is called when some were missed for good."""
        self._receiver = receiver
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._client = self._async_factory()
        self._sync = await asyncio.to_thread(self._sync_factory)
        self._since = datetime.now(UTC) - timedelta(seconds=self.config.overlap)
        await asyncio.to_thread(self._listen)
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="samvad-feed-publish"),
            asyncio.create_task(self._janitor_loop(), name="samvad-feed-janitor"),
            asyncio.create_task(self._supervise_loop(), name="samvad-feed-listener"),
        ]
        logger.info("coherence: instance %s listening to the change feed", self.instance_id)

    async def close(self) -> None:
        """Announce what is still in the outbox, stop listening, close the clients."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # One short try: the write-behind's own flush, next, must keep its deadline.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(1.0, self.config.deadline)):
                await self._publish()
        watch, self._watch = self._watch, None
        if watch is not None:
            await asyncio.to_thread(watch.unsubscribe)
        if self._sync is not None:
            with contextlib.suppress(Exception):
                self._sync.close()  # type: ignore[no-untyped-call]
        if self._client is not None:
            await close_client(self._client)

    @property
    def listening(self) -> bool:
        """True while the listener runs."""
        return self._watch is not None and bool(self._watch.is_active)

    def publish(self, write: Write) -> None:
        """Announce ``write`` with the next feed document."""
        self.outbox.add(write)
        self._wake.set()

    def publish_event(self, event: dict[str, Any]) -> None:
        """Announce ``event`` with the next feed document."""
        self.outbox.add_event(event)
        self._wake.set()

    # -- publishing ------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._publish()
                failures = 0
            except Exception as exc:
                failures += 1
                logger.warning(
                    "coherence: publishing to the change feed failed (%s); retrying",
                    type(exc).__name__,
                )
                self._wake.set()
                await asyncio.sleep(min(5.0, self.config.interval * 2**failures))
            # One document per interval at most, whatever the load.
            await asyncio.sleep(self.config.interval)

    async def _publish(self) -> None:
        client = self._client
        if client is None:
            return
        if not self._unsent:
            texts, count = self.outbox.drain()
            self.stats.events_dropped = self.outbox.dropped
            if not texts:
                return
            # Ids and numbers are fixed before the first attempt: a retry after
            # a failure (or a commit whose answer was lost) writes the same
            # documents again, never a gap or a second copy.
            for text in texts:
                self._seq += 1
                self._unsent.append((client.collection(CHANGES).document().id, self._seq, text))
            self._unsent_events = count
        expire = datetime.now(UTC) + timedelta(seconds=self.config.retention * 2)
        batch = client.batch()
        for doc_id, seq, text in self._unsent:
            batch.set(
                client.collection(CHANGES).document(doc_id),
                {
                    "instance": self.instance_id,
                    # Numbered per instance: a listener sees what it missed.
                    "seq": seq,
                    "at": firestore.SERVER_TIMESTAMP,
                    "expireAt": expire,
                    "events": text,
                },
            )
        try:
            async with asyncio.timeout(self.config.deadline + 0.5):
                await batch.commit(timeout=self.config.deadline)
        except Exception:
            self.stats.publish_failures += 1
            raise
        now = self.clock.monotonic()
        self._mine.extend((now, doc_id) for doc_id, _, _ in self._unsent)
        self.stats.docs_published += len(self._unsent)
        self.stats.events_published += self._unsent_events
        self._unsent = []
        if len(self.outbox):
            self._wake.set()  # gathered while this batch was retried

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.config.retention / 4))
            try:
                await self._delete_old()
            except Exception:
                logger.warning("coherence: deleting old feed documents failed", exc_info=True)

    async def _delete_old(self) -> None:
        if self._client is None:
            return
        horizon = self.clock.monotonic() - self.config.retention
        old: list[str] = []
        while self._mine and self._mine[0][0] < horizon and len(old) < 400:
            old.append(self._mine.popleft()[1])
        if not old:
            return
        batch = self._client.batch()
        for doc_id in old:
            batch.delete(self._client.collection(CHANGES).document(doc_id))
        async with asyncio.timeout(self.config.deadline + 0.5):
            await batch.commit(timeout=self.config.deadline)
        self.stats.docs_deleted += len(old)

    # -- listening ---------------------------------------------------------------------

    def _listen(self) -> None:
        """(Re)start the listener (in a worker thread: it blocks).

        It listens to the newest ``window`` documents only. Measured on the
        emulator (``docs/deploy.md``): a listener whose results grow — say
        ``at >= start`` with 400 documents in them — delivered new documents
        after 1.6 s at the median, and the client library rebuilds the whole
        result set on every change. A document pushed out of the window
        before it was seen shows as a gap in its instance's numbering, and is
        read by :meth:`_fill`.
        """
        assert self._sync is not None
        query = (
            self._sync.collection(CHANGES)
            .order_by("at", direction=firestore.Query.DESCENDING)
            # Documents committed together share their time: the last numbered
            # shows, so a gap before it is seen.
            .order_by("seq", direction=firestore.Query.DESCENDING)
            .limit(self.config.window)
        )
        self._watch = query.on_snapshot(self._on_snapshot)

    def _on_snapshot(self, docs: Any, changes: Any, read_time: Any) -> None:
        # The listener's own thread: hand over to the event loop, nothing more.
        loop = self._loop
        if loop is None or self._closed:
            return
        arrived = datetime.now(UTC)
        added = []
        for change in changes:
            if change.type.name != "ADDED":
                continue  # removals are the janitor's; documents never change
            data = change.document.to_dict() or {}
            if data.get("instance") != self.instance_id:
                added.append((change.document.id, data))
        if added:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._arrived, added, arrived)

    def _arrived(self, added: list[tuple[str, dict[str, Any]]], arrived: datetime) -> None:
        # Per instance, in the order it numbered its documents.
        added.sort(key=lambda item: (str(item[1].get("instance")), _seq(item[1])))
        for doc_id, data in added:
            at = data.get("at")
            if isinstance(at, datetime):
                if self._since is not None and at < self._since:
                    continue  # from before this instance listened
                if self.stats.lags is not None:
                    self.stats.lags.append(max(0.0, (arrived - at).total_seconds()))
            self._sequence(doc_id, data)

    def _sequence(self, doc_id: str, data: Mapping[str, Any]) -> None:
        """Apply ``data`` now, or after the documents its instance numbered before it."""
        instance, seq = str(data.get("instance")), _seq(data)
        source = self._sources.get(instance)
        if source is None:
            # The first document heard from that instance: nothing before it counts.
            source = self._sources[instance] = _Source(last=seq - 1)
        if seq <= source.last:
            return  # seen already (a listener restart, a gap filled)
        source.waiting[seq] = (doc_id, data)
        self._drain(instance, source)

    def _drain(self, instance: str, source: _Source) -> None:
        while source.last + 1 in source.waiting:
            source.last += 1
            doc_id, data = source.waiting.pop(source.last)
            self._deliver(doc_id, data)
        if source.waiting and source.filling is None:
            first = min(source.waiting)
            task = asyncio.create_task(
                self._fill(instance, source, after=source.last, before=first),
                name="samvad-feed-fill",
            )
            source.filling = task
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def _fill(self, instance: str, source: _Source, *, after: int, before: int) -> None:
        """Read the documents ``instance`` numbered between ``after`` and ``before``."""
        self.stats.gaps += 1
        try:
            query = (
                self._async_client()
                .collection(CHANGES)
                .where(filter=FieldFilter("instance", "==", instance))
                .where(filter=FieldFilter("seq", ">", after))
                .where(filter=FieldFilter("seq", "<", before))
                .order_by("seq")
            )
            async with asyncio.timeout(self.config.deadline + 0.5):
                found = await query.get(timeout=self.config.deadline)
            for snapshot in found:
                data = snapshot.to_dict() or {}
                source.waiting.setdefault(_seq(data), (snapshot.id, data))
            self.stats.docs_filled += len(found)
        except Exception:
            logger.warning("coherence: reading missed feed documents failed", exc_info=True)
        finally:
            source.filling = None
        if min(source.waiting, default=before) > source.last + 1:
            # Gone for good (deleted, or never written): what they said is no
            # longer known here, so nothing cached may be trusted.
            logger.warning(
                "coherence: feed documents %d..%d of instance %s are lost; dropping the caches",
                source.last + 1,
                min(source.waiting, default=before) - 1,
                instance,
            )
            self.stats.lost += 1
            source.last = min(source.waiting, default=before) - 1
            if self._on_lost is not None:
                self._on_lost()
        self._drain(instance, source)

    def _async_client(self) -> firestore.AsyncClient:
        if self._client is None:
            raise RuntimeError("The change feed is not started.")
        return self._client

    def _deliver(self, doc_id: str, data: Mapping[str, Any]) -> None:
        if self._receiver is None:
            return
        try:
            events = decode_events(str(data.get("events", "[]")))
        except ValueError:
            logger.warning("coherence: feed document %s is not readable", doc_id)
            return
        self.stats.docs_received += 1
        self.stats.events_received += len(events)
        try:
            self._receiver(events)
        except Exception:
            logger.exception("coherence: applying feed document %s failed", doc_id)

    async def _supervise_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.supervise_every)
            watch = self._watch
            if watch is None or watch.is_active:
                continue
            logger.warning("coherence: the change-feed listener stopped; restarting it")
            self.stats.listener_restarts += 1
            try:
                await asyncio.to_thread(self._listen)
            except Exception:
                logger.warning("coherence: restarting the listener failed", exc_info=True)


# -- wiring: the feed and the persistence layer ---------------------------------------

Subscriber = Callable[[RemoteChange], None]


class Coherence:
    """Connects one instance's :class:`Persistence` to the change feed."""

    def __init__(self, persistence: Persistence, feed: ChangeFeed) -> None:
        self.persistence = persistence
        self.feed = feed
        self._subscribers: list[Subscriber] = []
        self._watching: set[asyncio.Task[None]] = set()

    @classmethod
    def for_settings(cls, settings: Settings, persistence: Persistence) -> Coherence | None:
        """The coherence ``settings`` ask for: None with coherence off or a store
        that is not Firestore (nothing to share with other instances)."""
        if not settings.coherence or persistence.store.name != "firestore":
            return None
        feed = ChangeFeed(
            lambda: client_from_settings(settings),
            lambda: sync_client_from_settings(settings),
            config=CoherenceConfig(
                interval=settings.coherence_interval, deadline=settings.firestore_deadline
            ),
            clock=persistence.clock,
        )
        return cls(persistence, feed)

    async def start(self) -> None:
        """Announce every write from now on and apply the other instances'."""
        self.persistence.add_write_tap(self._announce)
        await self.feed.start(self._receive, on_lost=self.persistence.drop_caches)

    async def close(self) -> None:
        for task in list(self._watching):
            task.cancel()
        await asyncio.gather(*self._watching, return_exceptions=True)
        await self.feed.close()

    def status(self) -> dict[str, Any]:
        """The feed's figures (``/healthz``): what went out and came in."""
        stats = self.feed.stats
        lags = sorted(stats.lags or ())
        return {
            "instance": self.feed.instance_id,
            "docsPublished": stats.docs_published,
            "eventsPublished": stats.events_published,
            "docsReceived": stats.docs_received,
            "eventsReceived": stats.events_received,
            "docsDeleted": stats.docs_deleted,
            "publishFailures": stats.publish_failures,
            "eventsDropped": stats.events_dropped,
            "listenerRestarts": stats.listener_restarts,
            "gapsFilled": stats.gaps,
            "docsFilled": stats.docs_filled,
            "lost": stats.lost,
            "listening": self.feed.listening,
            # Server time of a feed document to its arrival here (recent ones).
            "lagP50Ms": round(1000 * lags[len(lags) // 2]) if lags else None,
            "lagP99Ms": round(1000 * lags[int(0.99 * (len(lags) - 1))]) if lags else None,
        }

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` with each remote write once it is applied here."""
        self._subscribers.append(subscriber)

    def _announce(self, write: Write) -> None:
        self.feed.publish(write)
        if isinstance(write, Erase):
            task = asyncio.create_task(self._announce_done(write), name="samvad-erase-watch")
            self._watching.add(task)
            task.add_done_callback(self._watching.discard)

    async def _announce_done(self, erase: Erase) -> None:
        # The write-behind keeps the barrier raised until the store erase is
        # done; polling it costs nothing and needs no hook in the queue.
        writes = self.persistence.writes
        while writes.erased((erase.barrier,)):  # noqa: ASYNC110 - a flag owned by the queue
            await asyncio.sleep(self.feed.config.interval)
        self.feed.publish_event({"k": "d", "scope": erase.scope.value, "id": erase.target_id})

    def _receive(self, events: list[dict[str, Any]]) -> None:
        persistence = self.persistence
        for event in events:
            kind = event.get("k")
            if kind in ("f", "p"):
                write = write_of(event)
                if write is None:
                    continue
                persistence.apply_remote(write)
                self._tell(RemoteChange(write))
            elif kind == "e":
                erase = Erase(EraseScope(event["scope"]), str(event["id"]))
                persistence.remote_erase(erase.scope, erase.target_id)
                self._tell(RemoteChange(erase))
            elif kind == "d":
                persistence.remote_erase_done(EraseScope(event["scope"]), str(event["id"]))
            elif kind == "i":
                persistence.invalidate_remote(str(event.get("c")), str(event.get("id")))
            elif kind == "r":
                persistence.drop_caches()

    def _tell(self, change: RemoteChange) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(change)
            except Exception:
                logger.exception("coherence: a subscriber failed")
