"""The WebSocket endpoint for live voice and chat clients."""

from __future__ import annotations

from starlette.routing import BaseRoute

from samvad.services import Services


class Hub:
    """The live WebSocket connections of this process."""

    def __init__(self, services: Services) -> None:
        self._services = services

    async def close_all(self, *, code: int = 1001, reason: str = "server shutting down") -> None:
        """Close every connection (at shutdown) and wait for their handlers."""


def routes() -> list[BaseRoute]:
    """The WebSocket routes."""
    return []
