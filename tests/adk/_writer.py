"""A separate server process for the restart test: appends events to one ADK
session on the emulator, then shuts down the way a server does (close flushes).

    python -m tests.adk._writer EMULATOR_HOST PROJECT SESSION_ID FIRST COUNT
"""

from __future__ import annotations

import asyncio
import sys

from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.genai import types

from tests.adk.conftest import firestore_store, samvad_service


async def main(host: str, project: str, session_id: str, first: int, count: int) -> None:
    async with (
        firestore_store(host, project) as store,
        samvad_service(store) as service,
    ):
        session = await service.get_session(app_name="app", user_id="u1", session_id=session_id)
        if session is None:
            session = await service.create_session(
                app_name="app", user_id="u1", session_id=session_id, state={"user:name": "Ada"}
            )
        # The session read back after a restart holds every earlier event.
        assert [int(e.invocation_id) for e in session.events] == list(range(first))
        for i in range(first, first + count):
            await service.append_event(
                session,
                Event(
                    invocation_id=str(i),
                    author="user" if i % 2 == 0 else "agent",
                    timestamp=1_700_000_000.0 + i,
                    content=types.Content(role="user", parts=[types.Part(text=f"turn {i}")]),
                    actions=EventActions(state_delta={"turns": i + 1, "app:seen": i}),
                ),
            )
    print("ok", flush=True)


if __name__ == "__main__":
    host, project, session_id, first, count = sys.argv[1:6]
    asyncio.run(main(host, project, session_id, int(first), int(count)))
