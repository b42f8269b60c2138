"""Idempotency keys: a REST write retried with the same key answers its first
response and writes nothing again.

A key belongs to one user and one route: its record is the document
``idempotency_keys/{sha256(userId, route, key)}`` holding the user id, a
fingerprint of the request, the first response (status, content type, body)
and ``expireAt`` (for a Firestore TTL policy; an expired record is ignored).

Guarantees:

* **Durable.** The record is written through the same path as the write it
  guards (:meth:`Persistence.submit_record`: the journal, then the
  write-behind), right after it, so the response that acknowledges the write
  also waits for the record to be in the journal. A retry after ``kill -9``
  and a restart finds it replayed into the queue; a retry on another instance
  reads it from Firestore once it is there (normally within
  ``SAMVAD_FLUSH_LINGER_SECONDS`` plus one write).
* **One at a time in a process.** A request with a key that is being answered
  waits for that answer and gets it (or, if it failed, is answered itself).
  Between two instances at the same instant nothing is locked: both may write.
* **Erasure.** A user's erase (here or on another instance) drops the user's
  records from memory and, through the store's erase, from Firestore; a
  request in flight across an erase records nothing.

Only a successful (2xx) answer is recorded: an error leaves the key unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec
from cachetools import LRUCache

from samvad.documents import IDEMPOTENCY_KEYS, Document
from samvad.errors import IdempotencyKeyReused
from samvad.persistence import Persistence
from samvad.writes import FieldsWrite

__all__ = ["Claim", "IdempotencyKeys", "Recorded", "fingerprint", "record_id"]

logger = logging.getLogger(__name__)

# Memory an entry costs besides its body (dataclass, strings, cache slot).
_ENTRY_OVERHEAD = 512


def record_id(user_id: str, route: str, key: str) -> str:
    """The document id of a key's record: no user can name another's."""
    digest = hashlib.sha256()
    for part in (user_id, route, key):
        raw = part.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(4, "big"))
        digest.update(raw)
    return digest.hexdigest()


def fingerprint(parts: Iterable[object]) -> str:
    """What makes two requests the same: their parsed parts, keys sorted (white
    space and key order of the JSON body do not matter)."""
    return hashlib.sha256(msgspec.json.encode(list(parts), order="sorted")).hexdigest()


@dataclass(frozen=True, slots=True)
class Recorded:
    """The first (successful) response to a key."""

    user_id: str
    request: str
    status: int
    content_type: str
    body: bytes
    expire_at: datetime

    def fields(self, route: str, now: datetime) -> Document:
        return {
            "userId": self.user_id,
            "route": route,
            "requestHash": self.request,
            "status": self.status,
            "contentType": self.content_type,
            "body": self.body.decode("utf-8"),
            "createdAt": now,
            "expireAt": self.expire_at,
        }

    @classmethod
    def decode(cls, doc: Document) -> Recorded | None:
        """The record in ``doc``, or None when it is not one this server wrote."""
        try:
            user_id, request = doc["userId"], doc["requestHash"]
            status, content_type = doc["status"], doc["contentType"]
            body, expire_at = doc["body"], doc["expireAt"]
        except KeyError:
            return None
        if not (
            isinstance(user_id, str)
            and isinstance(request, str)
            and isinstance(status, int)
            and isinstance(content_type, str)
            and isinstance(body, str)
            and isinstance(expire_at, datetime)
        ):
            return None
        return cls(user_id, request, status, content_type, body.encode("utf-8"), expire_at)


@dataclass(slots=True)
class Claim:
    """A key this request answers; others with the same key wait for it."""

    doc_id: str
    user_id: str
    route: str
    request: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: The user was erased while the request ran: its answer is not kept.
    erased: bool = False


class IdempotencyKeys:
    """Records of first responses: a byte-bounded cache over the store's
    ``idempotency_keys`` collection, read through on a miss."""

    def __init__(self, persistence: Persistence, *, ttl: float, cache_bytes: int) -> None:
        self.persistence = persistence
        self.ttl = timedelta(seconds=ttl)
        self._cache: LRUCache[str, Recorded] = LRUCache(
            maxsize=max(cache_bytes, 1), getsizeof=_size
        )
        self._claims: dict[str, Claim] = {}
        persistence.add_erase_listener(self._erased)

    async def begin(self, *, user_id: str, route: str, key: str, request: str) -> Recorded | Claim:
        """The recorded answer to ``key`` (raises :class:`IdempotencyKeyReused`
        when it answered another request), or a :class:`Claim` to answer it.

        A claim must be ended with :meth:`complete` or :meth:`abandon`.
        """
        doc_id = record_id(user_id, route, key)
        while True:
            found = self._cached(doc_id)
            if found is not None:
                return self._answer(found, request, doc_id)
            running = self._claims.get(doc_id)
            if running is not None:
                await running.done.wait()
                continue
            claim = Claim(doc_id=doc_id, user_id=user_id, route=route, request=request)
            self._claims[doc_id] = claim
            try:
                found = await self._load(doc_id, user_id)
            except BaseException:
                self.abandon(claim)
                raise
            if found is None:
                return claim
            self._keep(doc_id, found)
            self.abandon(claim)
            return self._answer(found, request, doc_id)

    def complete(self, claim: Claim, *, status: int, content_type: str, body: bytes) -> None:
        """Record the answer to ``claim`` (right after the write it guards)."""
        try:
            if claim.erased or self._claims.get(claim.doc_id) is not claim:
                return
            now = self.persistence.clock.now()
            recorded = Recorded(
                user_id=claim.user_id,
                request=claim.request,
                status=status,
                content_type=content_type,
                body=body,
                expire_at=now + self.ttl,
            )
            self.persistence.submit_record(
                FieldsWrite(
                    collection=IDEMPOTENCY_KEYS,
                    doc_id=claim.doc_id,
                    user_id=claim.user_id,
                    fields=recorded.fields(claim.route, now),
                )
            )
            self._keep(claim.doc_id, recorded)
        finally:
            self.abandon(claim)

    def abandon(self, claim: Claim) -> None:
        """End ``claim`` without an answer to keep (the request failed)."""
        if self._claims.get(claim.doc_id) is claim:
            del self._claims[claim.doc_id]
        claim.done.set()

    def _answer(self, found: Recorded, request: str, doc_id: str) -> Recorded:
        if found.request != request:
            logger.info("idempotency key %s reused for another request", doc_id[:12])
            raise IdempotencyKeyReused(
                "Idempotency-Key was already used with a different request; "
                "use a new key for a new request"
            )
        return found

    def _cached(self, doc_id: str) -> Recorded | None:
        found = self._cache.get(doc_id)
        if found is not None and found.expire_at <= self.persistence.clock.now():
            self._cache.pop(doc_id, None)
            return None
        return found

    def _keep(self, doc_id: str, recorded: Recorded) -> None:
        # Larger than the whole cache: read from the store when needed.
        with contextlib.suppress(ValueError):
            self._cache[doc_id] = recorded

    async def _load(self, doc_id: str, user_id: str) -> Recorded | None:
        doc = await self.persistence.read_record(IDEMPOTENCY_KEYS, doc_id, user_id)
        found = Recorded.decode(doc) if doc is not None else None
        if (
            found is None
            or found.user_id != user_id
            or found.expire_at <= self.persistence.clock.now()
        ):
            return None
        return found

    def _erased(self, user_id: str | None) -> None:
        doomed = [
            doc_id
            for doc_id, recorded in self._cache.items()
            if user_id is None or recorded.user_id == user_id
        ]
        for doc_id in doomed:
            self._cache.pop(doc_id, None)
        if user_id is None:
            return  # what another instance erased is not known: only the cache goes
        for claim in self._claims.values():
            if claim.user_id == user_id:
                claim.erased = True


def _size(recorded: Recorded) -> int:
    return len(recorded.body) + _ENTRY_OVERHEAD
