"""The Cloud Firestore store, on google-cloud-firestore's ``AsyncClient``.

Every call is bounded: the library's default retry keeps a write going for
about 50 s and a read for minutes when the server is gone, which would stall
the write-behind and any cache miss. Here each call retries transient errors
for at most ``deadline`` seconds and an ``asyncio.timeout`` guards the whole
operation, so a dead Firestore is noticed in one deadline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core.retry import if_transient_error
from google.api_core.retry_async import AsyncRetry
from google.cloud import firestore
from google.cloud.firestore_v1 import _helpers
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath
from google.cloud.firestore_v1.types import firestore as firestore_pb
from google.cloud.firestore_v1.types import write as write_pb

from samvad.documents import (
    IDEMPOTENCY_KEYS,
    INTERRUPTIONS,
    PROFILES,
    SESSIONS,
    STATES,
    Document,
    decode_profile,
    empty_profile,
    encode_profile,
    profile_with,
)
from samvad.firestore_client import close_client
from samvad.models import Profile, SessionStatus, StoreCounts
from samvad.stores.base import (
    ErasureCounts,
    HistoryBounds,
    SessionCursor,
    Store,
    StoreRejected,
    StoreUnavailable,
)
from samvad.writes import Erase, EraseScope, FieldsWrite, ProfileWrite

__all__ = [
    "PROBE_COLLECTION",
    "FirestoreStore",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

PROBE_COLLECTION = "_samvad"
_DELETE_PAGE = 300  # below the 500 writes a batch may hold
_TRANSACTION_ATTEMPTS = 10

# Errors that say something about the request itself; everything else is
# taken as "Firestore is not reachable right now".
_REJECTIONS = (gexc.InvalidArgument, gexc.OutOfRange)
# Errors that say only that Firestore could not be reached.
_UNREACHABLE = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.Unknown,
    gexc.RetryError,
    TimeoutError,
    OSError,
)


class FirestoreStore(Store):
    """Documents in Cloud Firestore (or its emulator).

    The store owns the clients ``client_factory`` makes: it creates one in
    :meth:`open`, replaces it in :meth:`reconnect` and closes it in :meth:`close`.
    """

    name = "firestore"

    def __init__(
        self,
        client_factory: Callable[[], firestore.AsyncClient],
        *,
        bounds: HistoryBounds | None = None,
        deadline: float = 5.0,
    ) -> None:
        super().__init__(bounds=bounds or HistoryBounds())
        self._factory = client_factory
        self._client: firestore.AsyncClient | None = None
        #: Ids of transactions an outage may have left holding locks.
        self._orphans: deque[bytes] = deque(maxlen=10_000)
        #: Transactions whose caller stopped waiting at the deadline.
        self._detached: set[asyncio.Task[Any]] = set()
        self._deadline = deadline
        #: Builds large requests off the event loop (see _offload); made on first use.
        self._encoder: ThreadPoolExecutor | None = None
        self._retry = AsyncRetry(
            predicate=if_transient_error,
            initial=0.05,
            maximum=min(1.0, deadline),
            multiplier=2.0,
            timeout=deadline,
        )

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        if self._client is None:
            self._client = self._factory()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            # Closing the channel fails what the detached transactions still
            # wait for, so they end promptly.
            await close_client(client)
        if self._detached:
            await asyncio.wait(set(self._detached), timeout=self._deadline)
        encoder, self._encoder = self._encoder, None
        if encoder is not None:
            encoder.shutdown(wait=False)

    async def reconnect(self) -> None:
        old, self._client = self._client, self._factory()
        if old is not None:
            await close_client(old)

    @property
    def client(self) -> firestore.AsyncClient:
        if self._client is None:
            raise RuntimeError("FirestoreStore used before open() or after close().")
        return self._client

    # -- plumbing ----------------------------------------------------------

    def _kw(self) -> dict[str, Any]:
        return {"retry": self._retry, "timeout": self._deadline}

    async def _bounded(self, operation: Callable[[], Awaitable[_T]], *, scale: float = 1.0) -> _T:
        """Run one Firestore operation within the deadline, mapping its errors."""
        try:
            async with asyncio.timeout(self._deadline * scale + 0.5):
                return await operation()
        except _REJECTIONS as exc:
            raise StoreRejected(f"Firestore rejected the request: {type(exc).__name__}") from exc
        except (gexc.GoogleAPIError, TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Firestore unavailable: {type(exc).__name__}") from exc
        except asyncio.CancelledError as exc:
            if not _channel_closed():
                raise
            raise StoreUnavailable("Firestore unavailable: the channel was closed") from exc
        except Exception as exc:
            if _caused_by_outage(exc):
                raise StoreUnavailable(f"Firestore unavailable: {type(exc).__name__}") from exc
            if isinstance(exc, ValueError | TypeError):
                # Content the library or protobuf cannot encode (a lone
                # surrogate, an integer beyond 64 bits): Firestore never sees it.
                raise StoreRejected(f"Firestore cannot hold a value: {type(exc).__name__}") from exc
            raise

    def _doc(self, collection: str, doc_id: str) -> Any:
        return self.client.collection(collection).document(doc_id)

    async def _snapshot(self, ref: Any, transaction: Any = None) -> Any:
        """One document's snapshot, reading the response stream to its end.

        ``AsyncDocumentReference.get`` returns on the first message of its
        ``BatchGetDocuments`` stream and leaves the stream unread: each such
        read kept its gRPC call, its task and both messages alive (measured:
        about 0.9 of them per cached user, most of the server's memory per
        user with Firestore; ``docs/benchmarks.md``, section 14; upstream
        googleapis/python-firestore#835). ``get_all``
        read to the end lets the call finish.
        """
        found = None
        async for snapshot in self.client.get_all([ref], transaction=transaction, **self._kw()):
            found = snapshot
        if found is None:
            raise StoreUnavailable("Firestore answered a document read with nothing")
        return found

    async def _offload(self, fields: Document, build: Callable[..., _T], *args: Any) -> _T:
        """``build(*args, fields)``, on the encoder thread unless ``fields`` are a few scalars.

        One thread, not a pool: encoding is CPU-bound Python, so several
        encoders would only take more turns of the GIL from the event loop.
        """
        try:
            if len(fields) <= _SMALL_DOCUMENT and all(
                isinstance(v, _SCALARS) for v in fields.values()
            ):
                return build(*args, fields)
            if self._encoder is None:
                self._encoder = ThreadPoolExecutor(1, thread_name_prefix="samvad-firestore-encode")
            call = functools.partial(build, *args, fields)
            return await asyncio.get_running_loop().run_in_executor(self._encoder, call)
        except (ValueError, TypeError) as exc:
            # A value protobuf cannot hold (an integer beyond 64 bits, a lone
            # surrogate): Firestore would refuse it, so it is refused here.
            raise StoreRejected(f"Firestore cannot hold a value: {type(exc).__name__}") from exc

    # -- reads -------------------------------------------------------------

    async def ping(self) -> None:
        async def probe() -> None:
            await self._doc(PROBE_COLLECTION, "probe").get(retry=None, timeout=self._deadline)

        await self._bounded(probe)
        if self._orphans:
            await self._release_orphans()

    async def get(self, collection: str, doc_id: str) -> Document | None:
        async def read() -> Document | None:
            snapshot = await self._snapshot(self._doc(collection, doc_id))
            return snapshot.to_dict() if snapshot.exists else None

        return await self._bounded(read)

    def _sessions_query(self, user_id: str, status: SessionStatus | None) -> Any:
        query = self.client.collection(SESSIONS).where(filter=FieldFilter("userId", "==", user_id))
        if status is not None:
            query = query.where(filter=FieldFilter("status", "==", status.value))
        return query

    async def list_sessions(
        self,
        *,
        user_id: str,
        status: SessionStatus | None,
        limit: int,
        cursor: SessionCursor | None = None,
    ) -> tuple[list[tuple[str, Document]], SessionCursor | None]:
        query = (
            self._sessions_query(user_id, status)
            .order_by("lastActivity", direction=firestore.Query.DESCENDING)
            .order_by(FieldPath.document_id(), direction=firestore.Query.DESCENDING)
        )
        if cursor is not None:
            query = query.start_after(
                {
                    "lastActivity": cursor.last_activity,
                    FieldPath.document_id(): self._doc(SESSIONS, cursor.session_id),
                }
            )
        query = query.limit(limit + 1)

        async def run() -> list[tuple[str, Document]]:
            snapshots = await query.get(**self._kw())
            return [(s.id, s.to_dict() or {}) for s in snapshots]

        rows = await self._bounded(run)
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last_id, last_doc = rows[-1]
            next_cursor = SessionCursor(last_activity=last_doc["lastActivity"], session_id=last_id)
        return rows, next_cursor

    async def idle_sessions(self, *, before: datetime, limit: int) -> list[tuple[str, Document]]:
        query = (
            self.client.collection(SESSIONS)
            .where(filter=FieldFilter("status", "==", SessionStatus.ACTIVE.value))
            .where(filter=FieldFilter("lastActivity", "<", before))
            .order_by("lastActivity")
            .limit(limit)
        )

        async def run() -> list[tuple[str, Document]]:
            snapshots = await query.get(**self._kw())
            return [(s.id, s.to_dict() or {}) for s in snapshots]

        return await self._bounded(run)

    async def _count(self, query: Any) -> int:
        async def run() -> int:
            result = await query.count(alias="n").get(**self._kw())
            return int(result[0][0].value)

        return await self._bounded(run)

    async def counts(self) -> StoreCounts:
        c = self.client
        active_users, active_sessions, profiles, interruptions = await asyncio.gather(
            self._count(c.collection(STATES).where(filter=FieldFilter("isActive", "==", True))),
            self._count(c.collection(SESSIONS).where(filter=FieldFilter("isActive", "==", True))),
            self._count(c.collection(PROFILES)),
            self._count(c.collection(INTERRUPTIONS)),
        )
        return StoreCounts(
            active_users=active_users,
            active_sessions=active_sessions,
            total_profiles=profiles,
            total_interruptions=interruptions,
        )

    # -- writes ------------------------------------------------------------

    async def write_fields(self, write: FieldsWrite) -> None:
        ref = self._doc(write.collection, write.doc_id)
        # Each top-level field is replaced whole (merge on nested maps would
        # keep keys the client removed): the write's mask names the top-level
        # fields, the same request ``set(merge=[FieldPath(name), ...])``
        # makes, built without the library's quadratic helper (see _encode).
        # Writes that may create a document (sessions: ``createdAt``) read it
        # first, in a transaction: that read also keeps an owner (takes_over),
        # and is what maps merged key by key (``merge``) are merged into.
        if not write.defaults and not write.must_exist and not write.merge:
            await self._settle_orphans()
            client = self.client
            # The whole request, built off the loop: handed a CommitRequest,
            # the GAPIC client uses it as is (from a dict or a Write, it would
            # deep-copy the document on the loop).
            request = await self._offload(
                write.fields, _build_commit, client._database_string, ref._document_path
            )

            async def plain() -> None:
                await client._firestore_api.commit(
                    request=request, metadata=client._rpc_metadata, **self._kw()
                )

            await self._bounded(plain)
            return

        async def with_defaults(transaction: Any) -> None:
            snapshot = await self._snapshot(ref, transaction)
            if write.must_exist and not snapshot.exists:
                return  # erased (perhaps by another instance): do not re-create it
            stored = snapshot.to_dict() if snapshot.exists else {}
            if write.takes_over(stored):
                raise StoreRejected(f"{write.collection}/{write.doc_id} belongs to another user")
            # Maps named in ``merge`` are merged here, on what is stored now.
            fields = write.changes(stored)
            pb = await self._offload(fields, _build_write, ref._document_path, True)
            transaction._add_write_pbs([pb])

        await self._transact(with_defaults)

    async def write_profile(self, write: ProfileWrite, *, now: datetime) -> Profile:
        ref = self._doc(PROFILES, write.user_id)
        cap, max_bytes = self.bounds.cap, self.bounds.max_bytes

        # A transaction makes concurrent appends from several server instances
        # safe: a conflicting commit retries with a fresh read, and merging by
        # message id keeps a retried commit idempotent.
        async def append(transaction: Any) -> Profile:
            snapshot = await self._snapshot(ref, transaction)
            current = (
                decode_profile(
                    write.user_id, snapshot.to_dict() or {}, cap=cap, max_bytes=max_bytes
                )
                if snapshot.exists
                else empty_profile(write.user_id)
            )
            profile = profile_with(
                current,
                messages=write.append,
                preferences=write.preferences,
                now=now,
                cap=cap,
                max_bytes=max_bytes,
            )
            pb = await self._offload(
                encode_profile(profile), _build_write, ref._document_path, False
            )
            transaction._add_write_pbs([pb])
            return profile

        return await self._transact(append)

    async def _transact(self, body: Callable[[Any], Awaitable[_T]]) -> _T:
        """Run ``body`` in a transaction within twice the deadline.

        A transaction an outage cuts off between its reads and its commit keeps
        its locks on the server until it expires (about a minute on the
        emulator), and every later transaction on those documents waits for
        them. Its id is kept and rolled back as soon as Firestore answers
        again (:meth:`_release_orphans`).
        """
        await self._settle_orphans()
        begun: list[bytes] = []
        gave_up = False

        @firestore.async_transactional
        async def txn(transaction: Any) -> _T:
            if gave_up:
                # The caller stopped waiting before this attempt began: a
                # later write may already have been made in its place.
                raise _GaveUp
            if transaction.id is not None:
                begun.append(transaction.id)
            return await body(transaction)

        # The library's transaction wrapper answers any failure, cancellation
        # included, by rolling back with the client's default retry, which
        # goes on for about 40 s when Firestore is gone: cancelled by our
        # deadline, the call would still take that long to return. So the
        # transaction runs in its own task and the deadline only stops the
        # waiting; the task finishes (or fails) on its own, and is kept
        # until then.
        async def attempt() -> _T:
            result: _T = await txn(self.client.transaction(max_attempts=_TRANSACTION_ATTEMPTS))
            return result

        task: asyncio.Task[_T] = asyncio.create_task(attempt(), name="samvad-firestore-transaction")
        self._detached.add(task)
        task.add_done_callback(self._detached_done)

        async def run() -> _T:
            return await asyncio.shield(task)

        try:
            return await self._bounded(run, scale=2.0)
        except StoreUnavailable:
            # The library retries a commit cut by an outage until it goes
            # through: this one may still commit after its caller was told it
            # failed. Every attempt's id is kept, and no other write is made
            # until each is rolled back (:meth:`_settle_orphans`); rolling
            # back one that committed, or that the library rolled back,
            # fails harmlessly.
            gave_up = True
            self._orphans.extend(begun)
            raise

    def _detached_done(self, task: asyncio.Task[Any]) -> None:
        self._detached.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller saw the outcome, or gave up on it

    async def _settle_orphans(self) -> None:
        """Before any write: roll back the transactions an outage cut off, or
        raise StoreUnavailable while that cannot be done.

        A transaction whose caller gave up at the deadline may still commit
        (the library retries its commit while Firestore is unreachable). Had
        a later write — an erase, a newer state — gone out first, the old
        write would land over it: an erased message would come back. Once its
        rollback has answered, the old transaction can no longer commit, or
        it already did and the later write lands after it.
        """
        if self._orphans:
            await self._release_orphans()
            if self._orphans:
                raise StoreUnavailable("a write cut off by an outage may still commit")

    async def _release_orphans(self) -> None:
        """Roll back transactions an outage left open (see :meth:`_transact`)."""
        client = self.client
        while self._orphans:
            transaction_id = self._orphans[0]
            try:
                async with asyncio.timeout(self._deadline + 0.5):
                    # The library exposes rollback only on a live transaction
                    # object; this is the same RPC with the id we kept.
                    await client._firestore_api.rollback(
                        request={
                            "database": client._database_string,
                            "transaction": transaction_id,
                        },
                        metadata=client._rpc_metadata,
                        retry=None,
                        timeout=self._deadline,
                    )
            except _UNREACHABLE:
                return  # still unreachable: try again on the next call
            except asyncio.CancelledError:
                if not _channel_closed():
                    raise
                return  # the prober replaced the client meanwhile: try again
            except Exception as exc:
                if type(exc).__module__.startswith("grpc"):
                    return
                # Committed, rolled back or expired already (the emulator
                # answers InvalidArgument "Invalid transaction"): nothing held.
                logger.debug("rollback of an orphaned transaction: %s", type(exc).__name__)
            # Callers release concurrently (each write settles first): the one
            # that got here first took this id off already, and a second
            # rollback of it is harmless; only the id this call rolled back
            # is taken off, never one nobody has rolled back yet.
            if self._orphans and self._orphans[0] == transaction_id:
                self._orphans.popleft()

    async def erase(self, erase: Erase) -> ErasureCounts:
        await self._settle_orphans()
        if erase.scope is EraseScope.USER:
            user_id = erase.target_id

            async def delete_user_docs() -> None:
                batch = self.client.batch()
                batch.delete(self._doc(STATES, user_id))
                batch.delete(self._doc(PROFILES, user_id))
                await batch.commit(**self._kw())

            await self._bounded(delete_user_docs)
            sessions = await self.delete_where(SESSIONS, where={"userId": user_id})
            interruptions = await self.delete_where(INTERRUPTIONS, where={"userId": user_id})
            await self.delete_where(IDEMPOTENCY_KEYS, where={"userId": user_id})
            return ErasureCounts(sessions=sessions, interruptions=interruptions)

        session_id = erase.target_id
        ref = self._doc(SESSIONS, session_id)

        async def delete_session() -> int:
            snapshot = await self._snapshot(ref)
            await ref.delete(**self._kw())
            return 1 if snapshot.exists else 0

        sessions = await self._bounded(delete_session)
        interruptions = await self.delete_where(INTERRUPTIONS, where={"sessionId": session_id})
        return ErasureCounts(sessions=sessions, interruptions=interruptions)

    # -- queries by field (the ADK session service; erasure) ------------------

    def _where(self, collection: str, where: Mapping[str, Any]) -> Any:
        query: Any = self.client.collection(collection)
        for name, value in where.items():
            query = query.where(filter=FieldFilter(FieldPath(name).to_api_repr(), "==", value))
        return query

    async def select(
        self, collection: str, *, where: Mapping[str, Any]
    ) -> list[tuple[str, Document]]:
        # Paged by document id: one unbounded query could outlive the deadline.
        query = self._where(collection, where).order_by(FieldPath.document_id())
        rows: list[tuple[str, Document]] = []
        last: Any = None
        while True:
            page_query = query.limit(_SELECT_PAGE)
            if last is not None:
                page_query = page_query.start_after(last)

            async def page(q: Any = page_query) -> list[Any]:
                return list(await q.get(**self._kw()))

            snapshots = await self._bounded(page)
            rows.extend((s.id, s.to_dict() or {}) for s in snapshots)
            if len(snapshots) < _SELECT_PAGE:
                return rows
            last = snapshots[-1]

    async def delete_where(self, collection: str, *, where: Mapping[str, Any]) -> int:
        """Delete every document of ``collection`` matching ``where``, in pages."""
        await self._settle_orphans()
        query = self._where(collection, where).select([]).limit(_DELETE_PAGE)
        deleted = 0
        while True:

            async def page() -> int:
                snapshots = await query.get(**self._kw())
                if snapshots:
                    batch = self.client.batch()
                    for snapshot in snapshots:
                        batch.delete(snapshot.reference)
                    await batch.commit(**self._kw())
                return len(snapshots)

            count = await self._bounded(page, scale=2.0)
            deleted += count
            if count < _DELETE_PAGE:
                return deleted


_SELECT_PAGE = 500  # documents per page of select()


class _GaveUp(Exception):
    """A transaction attempt begun after its caller stopped waiting: it commits nothing."""


def _channel_closed() -> bool:
    """True when a CancelledError being handled did not come from cancelling
    the running task.

    grpc.aio raises ``asyncio.CancelledError`` from a call whose channel was
    closed under it: the prober's :meth:`FirestoreStore.reconnect` does that
    to every call in flight. That is an outage to map like any other, not a
    cancellation to pass on (it reached a reader as a bare CancelledError
    once in CI, and a transaction it cut was not kept for rollback).
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


def _caused_by_outage(exc: BaseException) -> bool:
    """True when ``exc`` is, or was raised while handling, an outage.

    Two library behaviours make this necessary: grpc.aio raises its own error
    types from a channel closed under it (after ``reconnect``), and when
    ``begin_transaction`` fails or is cancelled by our deadline, the
    transaction wrapper tries to roll back a transaction that never began and
    raises ``ValueError("...cannot be rolled back")`` instead, with the real
    cause only in the exception's context.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _REJECTIONS):
            return False
        if isinstance(
            current, gexc.GoogleAPIError | TimeoutError | OSError | asyncio.CancelledError
        ):
            return True
        if type(current).__module__.startswith("grpc"):
            return True
        current = current.__cause__ or current.__context__
    return False


# -- encoding ----------------------------------------------------------------
#
# The library turns a dict into a Write in two slow steps. ``set(merge=[paths])``
# compares every merge path with every leaf path of the document
# (``DocumentExtractorForMerge._apply_merge_paths``): a state of 3,600 keys
# took 32 s of CPU, on the event loop. And every value goes through proto-plus
# marshalling, about ten times slower than building the protobuf directly. So
# the Write is built here, as raw protobuf with the same content (the store
# contract tests run against the emulator), in time linear in the document's
# size, and off the event loop unless the document is a handful of scalars.

_RawWrite = write_pb.Write.pb()
_SCALARS = (str, int, float, bool, datetime, type(None))
_SMALL_DOCUMENT = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


_RawCommit = firestore_pb.CommitRequest.pb()


def _build_write(path: str, merge: bool, fields: Document) -> write_pb.Write:
    """The Write that sets ``fields`` of the document at ``path``.

    With ``merge``, only the top-level fields named are replaced (an upsert,
    as ``set(merge=[FieldPath(name), ...])``); without, the whole document is.
    """
    raw = _RawWrite()
    _fill_write(raw, path, fields, merge)
    wrapped: write_pb.Write = write_pb.Write.wrap(raw)
    return wrapped


def _build_commit(database: str, path: str, fields: Document) -> firestore_pb.CommitRequest:
    """A CommitRequest of one merged write of ``fields`` (see :func:`_build_write`)."""
    raw = _RawCommit(database=database)
    _fill_write(raw.writes.add(), path, fields, True)
    wrapped: firestore_pb.CommitRequest = firestore_pb.CommitRequest.wrap(raw)
    return wrapped


def _fill_write(out: Any, path: str, fields: Document, merge: bool) -> None:
    out.update.name = path
    target = out.update.fields
    for name, value in fields.items():
        _encode_value(value, target[name])
    if merge:
        out.update_mask.field_paths.extend(FieldPath(name).to_api_repr() for name in fields)


def _encode_value(value: Any, out: Any) -> None:
    """Encode ``value`` into the protobuf ``Value`` message ``out`` (as ``encode_value`` does)."""
    if value is None:
        out.null_value = 0
    elif value is True or value is False:
        out.boolean_value = value
    elif isinstance(value, int):
        out.integer_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, dict):
        out.map_value.SetInParent()  # an empty map is still a map
        fields = out.map_value.fields
        for name, item in value.items():
            _encode_value(item, fields[name])
    elif isinstance(value, list | tuple):
        out.array_value.SetInParent()
        values = out.array_value.values
        for item in value:
            _encode_value(item, values.add())
    elif isinstance(value, datetime):
        if hasattr(value, "timestamp_pb"):  # DatetimeWithNanoseconds, read from Firestore
            out.timestamp_value.CopyFrom(value.timestamp_pb())
            return
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # as the library takes a naive time
        micros = (value - _EPOCH) // _MICROSECOND
        seconds, micro = divmod(micros, 1_000_000)
        out.timestamp_value.seconds = seconds
        out.timestamp_value.nanos = micro * 1000
    else:
        # Anything rarer (bytes, references, geo points): the library's encoder.
        out.CopyFrom(_helpers.encode_value(value)._pb)
