"""Write-ahead at the edge: nothing leaves the server before the writes made
before it are in the journal.

A handler acknowledges a write by sending something: the REST response, the
WebSocket ``ack`` frame. This middleware holds every HTTP response start and
every outgoing WebSocket frame until the journal has, on disk, every write
submitted before it (``Persistence.durable``): one group commit, shared by all
the writes of the moment. With nothing new in the journal it costs a check.
A journal that cannot write turns the response into a 503; on a WebSocket the
error closes the connection before the frame is sent.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from samvad.journal import JournalUnavailable
from samvad.web.http_errors import error_response

__all__ = ["DurableResponsesMiddleware"]

_HELD = frozenset({"http.response.start", "websocket.send"})


class DurableResponsesMiddleware:
    """Hold responses and frames until the journal has the writes before them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = getattr(scope["app"].state, "services", None)
        if scope["type"] not in ("http", "websocket") or services is None:
            await self.app(scope, receive, send)
            return
        persistence = services.persistence
        if persistence.journal is None:
            await self.app(scope, receive, send)
            return
        replaced = False

        async def held(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the rest of a response that was replaced by a 503
            if message["type"] in _HELD:
                try:
                    await persistence.durable()
                except JournalUnavailable as exc:
                    if message["type"] != "http.response.start":
                        raise
                    replaced = True
                    response = error_response(exc.status_code, exc.message, code=exc.code)
                    await response(scope, receive, send)
                    return
            await send(message)

        await self.app(scope, receive, held)
