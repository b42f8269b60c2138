"""The REST session API (wire-compatible with the original backend)."""

from __future__ import annotations

from starlette.routing import BaseRoute


def routes() -> list[BaseRoute]:
    """The REST routes, mounted at the root of the app."""
    return []
