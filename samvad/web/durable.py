"""Write-ahead at the edge: nothing that acknowledges a write leaves the server
before the write is in the journal.

A handler acknowledges a write by sending something: the REST response, the
WebSocket ``ack`` frame. This middleware holds the start of an HTTP response
until the journal has, on disk, the writes that request made (its
:class:`~samvad.persistence.WriteReceipt`: its newest record, and with it every
record before it). A request that wrote nothing — a read, an answer replayed
for a retry, a refusal — waits for every write submitted before it: what it
shows or acknowledges may be another request's write, and nothing a response
shows may be lost to a crash (with nothing in flight that costs one check,
no wait). One group commit is shared by all the writes of the moment. A
journal that cannot write turns the response into a 503.

WebSocket scopes pass through untouched: the endpoint holds its frames itself
(:mod:`samvad.web.realtime`: no frame leaves before the journal has every
write submitted before it was queued, one wait per batch of frames), which
spares every frame a wrapper.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from samvad.journal import JournalUnavailable
from samvad.persistence import Persistence, WriteReceipt, current_receipt
from samvad.web.http_errors import error_response

__all__ = ["DurableResponsesMiddleware", "Hold", "journal_hold", "unavailable_response"]

#: Waits until the journal has a receipt's writes (or, given None, every write so far).
Hold = Callable[[WriteReceipt | None], Awaitable[None]]


def _persistence(scope: Scope) -> Persistence | None:
    # The lifespan's state (copied into every request's scope), else the app's.
    state = scope.get("state")
    services = state.get("services") if state else None
    if services is None:
        services = getattr(getattr(scope.get("app"), "state", None), "services", None)
    return services.persistence if services is not None else None


def journal_hold(scope: Scope) -> Hold | None:
    """What an HTTP response of this scope must wait for before it starts, or
    None when there is no journal (nothing to wait for). The caller makes a
    :class:`WriteReceipt` current for the request and, at the response's start,
    awaits the hold with it when it holds a record, else with None; a
    :class:`JournalUnavailable` it raises turns the response into a 503
    (:func:`unavailable_response`)."""
    persistence = _persistence(scope)
    if persistence is None or persistence.journal is None:
        return None
    return persistence.durable


def unavailable_response(exc: JournalUnavailable) -> ASGIApp:
    """The response that replaces one whose writes the journal could not take."""
    return error_response(exc.status_code, exc.message, code=exc.code)


class DurableResponsesMiddleware:
    """Hold responses and frames until the journal has the writes they acknowledge."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        durable = journal_hold(scope)
        if durable is None:
            await self.app(scope, receive, send)
            return
        receipt = WriteReceipt()
        replaced = False

        async def held(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the rest of a response that was replaced by a 503
            if message["type"] == "http.response.start":
                try:
                    # Its own writes; a request that made none waits for what
                    # is in flight, which it may show or acknowledge.
                    await durable(receipt if receipt.record is not None else None)
                except JournalUnavailable as exc:
                    replaced = True
                    await unavailable_response(exc)(scope, receive, send)
                    return
            await send(message)

        token = current_receipt.set(receipt)
        try:
            await self.app(scope, receive, held)
        finally:
            current_receipt.reset(token)
