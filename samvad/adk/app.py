"""Serve an ADK agent on Samvad: the Samvad app with an :class:`AdkResponder`.

The agent's sessions use the server's own store (one Firestore client) through
a :class:`SamvadSessionService`; at shutdown they are flushed before the
server's write-behind, within the same deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from google.adk.agents.base_agent import BaseAgent
from starlette.applications import Starlette

from samvad.adk.responder import AdkResponder
from samvad.adk.service import SamvadSessionService
from samvad.config import Settings
from samvad.web.app import create_app

__all__ = [
    "create_agent_app",
]


def create_agent_app(
    agent: BaseAgent,
    settings: Settings | None = None,
    *,
    app_name: str | None = None,
    **options: Any,
) -> Starlette:
    """Samvad's ASGI app (``create_app``) answering WebSocket messages with ``agent``.

    ``options`` go to :func:`samvad.web.app.create_app`.
    """
    settings = settings or Settings.from_env()
    app = create_app(settings, **options)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(target: Starlette) -> AsyncIterator[Any]:
        async with inner(target) as state:
            assert state is not None  # Samvad's lifespan yields its services
            services = state["services"]
            sessions = SamvadSessionService(
                settings=settings,
                store=services.persistence.store,
                persistence=services.persistence,
                mirror_history=False,
                clock=services.persistence.clock,
            )
            await sessions.start()
            services.hub.responder = AdkResponder(
                agent, session_service=sessions, app_name=app_name
            )
            # A refresh erases the user's agent sessions with their conversation.
            services.service.add_user_eraser(sessions.erase_user)
            try:
                yield state
            finally:
                # Replies in flight append to the agent's sessions: end the
                # connections (Samvad's shutdown does it too, after this) first.
                await services.hub.close_all(code=1001, reason="server shutting down")
                await sessions.close()

    app.router.lifespan_context = lifespan
    return app
