"""The composition root's product: what a running server holds.

Built once in the app's lifespan (``samvad.web.app``), immutable after start,
reached through ``request.state.services`` — never a module-level singleton.
The only thing that changes while the server runs is its :class:`Readiness`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from starlette.requests import HTTPConnection

from samvad.clock import Clock
from samvad.coherence import Coherence
from samvad.config import Settings
from samvad.idempotency import IdempotencyKeys
from samvad.interruptions import InterruptionStack
from samvad.persistence import Persistence
from samvad.service import SessionService
from samvad.web.auth import TokenVerifier
from samvad.web.metrics import Metrics
from samvad.web.realtime import Hub

__all__ = ["Readiness", "ReadinessState", "Services", "services"]


class ReadinessState(enum.Enum):
    """Where the server is in its life (``/readyz``)."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


_TRANSITIONS = {
    ReadinessState.STARTING: {ReadinessState.READY, ReadinessState.STOPPING},
    ReadinessState.READY: {ReadinessState.STOPPING},
    ReadinessState.STOPPING: {ReadinessState.STOPPING},
}


class Readiness:
    """Starting → ready → stopping, once; owned by the app, so ``/readyz`` and
    the metrics can answer before the lifespan built anything and after it
    tore everything down."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = ReadinessState.STARTING

    @property
    def ready(self) -> bool:
        return self.state is ReadinessState.READY

    def _move(self, to: ReadinessState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"A server that is {self.state.value} cannot become {to.value}.")
        self.state = to

    def mark_ready(self) -> None:
        """Start-up finished: accept traffic."""
        self._move(ReadinessState.READY)

    def mark_stopping(self) -> None:
        """Shutdown began (a signal, or the lifespan ending); idempotent."""
        self._move(ReadinessState.STOPPING)


@dataclass(frozen=True, slots=True)
class Services:
    """The resources of one server process, built by the lifespan in dependency
    order and closed by it in reverse (an ``AsyncExitStack``)."""

    settings: Settings
    clock: Clock
    started_at: datetime
    readiness: Readiness
    metrics: Metrics
    persistence: Persistence
    interruptions: InterruptionStack
    #: The use cases both doors call (``samvad.service``).
    service: SessionService
    #: Live WebSocket connections and the conversation engine's glue.
    hub: Hub
    #: First responses of REST writes sent with an Idempotency-Key.
    idempotency: IdempotencyKeys
    #: Checks Firebase ID tokens when ``settings.auth`` is not ``off``
    #: (``samvad.web.auth``); None when authentication is off.
    verify_token: TokenVerifier | None
    #: Coherence with other instances on the same Firestore (``samvad.coherence``);
    #: None with the memory store or ``SAMVAD_COHERENCE`` off.
    coherence: Coherence | None = None


def services(connection: HTTPConnection) -> Services:
    """The services of the app serving ``connection``."""
    # The lifespan's state, copied into every scope; ``connection.state`` wraps
    # the same dict in a new object per request.
    state = connection.scope.get("state")
    found: Services | None = state.get("services") if state else None
    if found is None:
        found = connection.state.services
    return found
