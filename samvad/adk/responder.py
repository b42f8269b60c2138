"""``AdkResponder``: an ADK agent answering on Samvad's WebSocket.

Each user message runs the agent once with ``Runner.run_async`` in ADK's
streaming (SSE) mode, on the Samvad session of the same user and id (held by a
:class:`~samvad.adk.service.SamvadSessionService`). Text parts stream out as
reply chunks the moment the model produces them; the aggregated response ADK
sends after a streamed turn is not repeated, and tool calls and their results
stay between the agent and its tools.

Barge-in cancels the reply task; the run is closed with it (``aclosing``), so
the model call and the tool calls in flight are cancelled too, and ADK never
stores the cut-off reply. Before the next run the agent is told what happened:
what the user heard goes into its session as its own reply, marked
``interrupted``, and the new message starts with a note saying what the user
heard and what they did not (:func:`interruption_note`).

The WebSocket layer already writes both sides of the conversation to the
user's Samvad history, so the session service here does not mirror them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from google.adk.agents._streaming_mode import StreamingMode
from google.adk.agents.base_agent import BaseAgent
from google.adk.agents.run_config import RunConfig
from google.adk.events.event import Event
from google.adk.runners import Runner
from google.adk.sessions.base_session_service import BaseSessionService, GetSessionConfig
from google.genai import types

from samvad.config import Settings
from samvad.responder import ReplyContext
from samvad.responders import interruption_note

__all__ = [
    "AdkResponder",
]

logger = logging.getLogger(__name__)

_EXISTS = GetSessionConfig(num_recent_events=0)


def _text(event: Event) -> str:
    content = event.content
    if content is None or not content.parts:
        return ""
    return "".join(part.text for part in content.parts if part.text and not part.thought)


class AdkResponder:
    """A :class:`samvad.responder.Responder` that runs an ADK agent.

    ``session_service`` defaults to a :class:`SamvadSessionService` built from
    ``settings`` (its own Firestore client; :func:`samvad.adk.app.create_agent_app`
    shares the server's instead). ``app_name`` defaults to the agent's name.
    Call :meth:`aclose` at shutdown: it flushes the sessions it owns.
    """

    def __init__(
        self,
        agent: BaseAgent,
        *,
        session_service: BaseSessionService | None = None,
        settings: Settings | None = None,
        app_name: str | None = None,
        run_config: RunConfig | None = None,
    ) -> None:
        self.agent = agent
        self.app_name = app_name or agent.name
        self._settings = settings
        self._service = session_service
        self._owns_service = session_service is None
        self._runner: Runner | None = None
        self.run_config = run_config or RunConfig(streaming_mode=StreamingMode.SSE)

    @property
    def session_service(self) -> BaseSessionService:
        if self._service is None:
            from samvad.adk.service import SamvadSessionService

            self._service = SamvadSessionService(settings=self._settings, mirror_history=False)
        return self._service

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = Runner(
                agent=self.agent, app_name=self.app_name, session_service=self.session_service
            )
        return self._runner

    async def aclose(self) -> None:
        """Flush and close the session service, when this responder built it."""
        service = self._service
        if self._owns_service and service is not None:
            close: Any = getattr(service, "close", None)
            if close is not None:
                await close()

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        service = self.session_service
        session = await service.get_session(
            app_name=self.app_name,
            user_id=context.user_id,
            session_id=context.session_id,
            config=_EXISTS,
        )
        if session is None:
            session = await service.create_session(
                app_name=self.app_name, user_id=context.user_id, session_id=context.session_id
            )
        parts: list[types.Part] = []
        cut = context.interruption
        if cut is not None:
            if cut.heard.strip():
                # The run was cancelled before ADK stored the reply: what the
                # user heard becomes the agent's turn, marked as cut off.
                await service.append_event(
                    session,
                    Event(
                        invocation_id=f"samvad-interruption-{cut.message_id or 'reply'}",
                        author=self.agent.name,
                        content=types.Content(role="model", parts=[types.Part(text=cut.heard)]),
                        interrupted=True,
                        custom_metadata={"samvad": {"heard": cut.heard, "cut": cut.cut}},
                    ),
                )
            parts.append(types.Part(text=interruption_note(cut)))
        parts.append(types.Part(text=context.message))
        streamed = False
        run = self.runner.run_async(
            user_id=context.user_id,
            session_id=context.session_id,
            new_message=types.Content(role="user", parts=parts),
            run_config=self.run_config,
        )
        # Closing the run on the way out (barge-in cancels this generator)
        # cancels the model and tool calls in flight.
        async with contextlib.aclosing(run) as events:
            async for event in events:
                if event.author == "user":
                    continue
                text = _text(event)
                if event.partial:
                    if text:
                        streamed = True
                        yield text
                    continue
                # A final event repeats what its partials streamed.
                if text and not streamed:
                    yield text
                streamed = False
