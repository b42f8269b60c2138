"""Write-ahead at the edge: nothing that acknowledges a write leaves the server
before the write is in the journal.

A handler acknowledges a write by sending something: the REST response, the
WebSocket ``ack`` frame. The start of an HTTP response waits until the journal
has, on disk, the writes that request made (its
:class:`~samvad.persistence.WriteReceipt`: its newest record, and with it every
record before it); :func:`journal_hold` gives what to wait for and the HTTP
edge (``samvad.web.middleware.HttpEdge``) waits for it. A request that wrote
nothing — a read, an answer replayed for a retry, a refusal — waits for every
write submitted before it: what it shows or acknowledges may be another
request's write, and nothing a response shows may be lost to a crash (with
nothing in flight that costs one check, no wait). WebSocket frames are held
by the endpoint itself (:mod:`samvad.web.realtime`: no frame leaves before the
journal has every write submitted before it was queued, one wait per batch of
frames), which spares every frame a wrapper. Either way one group commit is
shared by all the writes of the moment. A journal that cannot write turns the
response into a 503 (:func:`unavailable_response`); on a WebSocket the error
closes the connection before the frame is sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Scope

from samvad.journal import JournalUnavailable
from samvad.persistence import Persistence, WriteReceipt
from samvad.web.http_errors import error_response

__all__ = ["Hold", "journal_hold", "unavailable_response"]

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
