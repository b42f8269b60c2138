"""The ``Idempotency-Key`` header of the REST writes (``samvad.idempotency``).

A handler wrapped by :func:`idempotent` calls :func:`claim_key` once it has
checked who may act for whom and validated the request, right before the use
case writes: the same key with the same request is answered with the first
response (``Idempotent-Replayed: true``) and writes nothing; with another
request it is a 422. A request without the header is not touched.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from samvad.errors import InvalidField
from samvad.idempotency import Claim, Recorded, fingerprint
from samvad.web.services import services

__all__ = [
    "HEADER",
    "MAX_KEY_LENGTH",
    "REPLAYED_HEADER",
    "claim_key",
    "idempotent",
    "read_key",
]

HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255

Handler = Callable[[Request], Awaitable[Response]]


_RAW_HEADER = HEADER.encode()
#: Where :func:`idempotent` leaves a keyed request's claim for :func:`claim_key`
#: (the scope, not ``request.state``: that builds an object per request).
_PENDING = "samvad.idempotency"


def _has_key(request: Request) -> bool:
    return any(name == _RAW_HEADER for name, _ in request.scope["headers"])


def read_key(request: Request) -> str | None:
    """The request's key, or None without the header; a bad value is a 400."""
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidField("Idempotency-Key", "must be sent once")
    key = values[0]
    # Header bytes arrive as latin-1: anything past ASCII is above "~".
    if not (0 < len(key) <= MAX_KEY_LENGTH and all(" " <= c <= "~" for c in key)):
        raise InvalidField(
            "Idempotency-Key", f"must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )
    return key


@dataclass(slots=True)
class _Pending:
    route: str
    claim: Claim | None = None


class _Replay(Exception):
    """Raised by :func:`claim_key` to answer with a recorded response."""

    def __init__(self, recorded: Recorded) -> None:
        super().__init__("replayed")
        self.recorded = recorded


def idempotent(route: str) -> Callable[[Handler], Handler]:
    """Make a REST write handler honour ``Idempotency-Key`` (records are per
    user and ``route``)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            # The value is checked in claim_key, after the caller is
            # authenticated: who may not act gets a 401/403, not a 400.
            if not _has_key(request):
                return await handler(request)
            pending = _Pending(route=route)
            request.scope[_PENDING] = pending
            try:
                response = await handler(request)
            except _Replay as replay:
                return _replayed(replay.recorded)
            except BaseException:
                if pending.claim is not None:
                    services(request).idempotency.abandon(pending.claim)
                raise
            claim = pending.claim
            if claim is not None:
                keys = services(request).idempotency
                if 200 <= response.status_code < 300:
                    keys.complete(
                        claim,
                        status=response.status_code,
                        content_type=response.headers.get("content-type", ""),
                        body=bytes(response.body),
                    )
                else:
                    keys.abandon(claim)
            return response

        return run

    return wrap


async def claim_key(request: Request, user_id: str, *request_parts: object) -> None:
    """Answer now with the recorded response if the request's key has one (or
    refuse a reuse with 422); else make this request the one that answers it.

    ``request_parts`` are what makes two requests the same (the parsed body,
    and whatever else the write takes from the request). Without a key, nothing.
    """
    pending: _Pending | None = request.scope.get(_PENDING)
    if pending is None:
        return
    key = read_key(request)
    assert key is not None  # the header is there: idempotent() saw it
    answer = await services(request).idempotency.begin(
        user_id=user_id, route=pending.route, key=key, request=fingerprint(request_parts)
    )
    if isinstance(answer, Recorded):
        raise _Replay(answer)
    pending.claim = answer


def _replayed(recorded: Recorded) -> Response:
    headers = {REPLAYED_HEADER: "true"}
    if recorded.content_type:
        headers["content-type"] = recorded.content_type
    return Response(content=recorded.body, status_code=recorded.status, headers=headers)
