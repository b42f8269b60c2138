"""What a running server holds: built in the app's lifespan, reached through
``request.state.services`` (never a module-level singleton)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.requests import HTTPConnection

from samvad.config import Settings
from samvad.interruptions import InterruptionStack
from samvad.persistence import Persistence
from samvad.ratelimit import RateLimits
from samvad.responder import Responder
from samvad.service import SessionService
from samvad.web.metrics import Metrics

#: Verifies a client's ID token and returns the user id it was issued for;
#: raises :class:`samvad.errors.Unauthorized` when the token is not valid.
TokenVerifier = Callable[[str], Awaitable[str]]


@dataclass(slots=True)
class Services:
    """The resources of one server process."""

    settings: Settings
    persistence: Persistence
    interruptions: InterruptionStack
    started_at: datetime
    #: The use cases both doors call (``samvad.service``).
    service: SessionService
    #: Live WebSocket connections (``samvad.web.realtime.Hub``), set by the lifespan.
    hub: Any = None
    #: Writes the assistant's replies on the WebSocket; None means the one
    #: ``settings.ws_responder`` names, built by the hub on first use.
    responder: Responder | None = None
    #: Checks Firebase ID tokens (REST ``Authorization`` and the ``start`` frame's
    #: ``token``) when ``settings.auth`` is not ``off``; see ``samvad.web.auth``.
    verify_token: TokenVerifier | None = None
    #: Per-user limits of refresh and session deletion; None: unlimited.
    limits: RateLimits | None = None
    #: This app's Prometheus metrics; None: not recorded.
    metrics: Metrics | None = None
    #: True from the end of start-up until shutdown begins (``/readyz``).
    ready: bool = False
    #: Extra components keyed by name, for optional features.
    extras: dict[str, Any] = field(default_factory=dict)


def services(connection: HTTPConnection) -> Services:
    """The services of the app serving ``connection``."""
    found: Services = connection.state.services
    return found
