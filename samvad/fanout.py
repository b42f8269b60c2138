"""Fan-out across instances: what one instance tells a user's devices, the
user's devices on every other instance hear too.

The conversation engine (:mod:`samvad.conversation`) tells the devices of
*this* instance; the change feed (:mod:`samvad.coherence`) carries every write
to the others. :class:`RemoteFanOut` subscribes to the feed and turns another
instance's writes into the same events for the devices here:

* a message stored by a live session there (a user's message, or a reply as
  stored — live messages carry their session's sequence number) becomes a
  ``message`` frame for the user's devices here;
* a change of the user's state there becomes a ``state`` frame with the state
  as this instance now holds it;
* an erasure there erases the live sessions here (their devices are closed
  with 4410), as the use cases do for an erasure made here.

Within the feed's staleness (``docs/deploy.md``). Reply chunks are not
announced: they reach the devices of the instance streaming the reply, which
is where the devices of one session should be; the stored reply reaches the
others as a ``message``. A message appended through REST is not announced to
devices here either, as on the instance that stored it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from samvad.coherence import RemoteChange
from samvad.conversation import Engine, MessageStored
from samvad.documents import STATES
from samvad.persistence import Persistence
from samvad.writes import EraseScope, FieldsWrite, ProfileWrite

__all__ = ["RemoteFanOut"]

logger = logging.getLogger(__name__)


class RemoteFanOut:
    """Tells this instance's devices what other instances told theirs."""

    def __init__(self, engine: Engine, persistence: Persistence) -> None:
        self.engine = engine
        self.persistence = persistence
        self._loads: set[asyncio.Task[Any]] = set()

    def __call__(self, change: RemoteChange) -> None:
        write = change.write
        if isinstance(write, ProfileWrite):
            self._messages(write)
        elif isinstance(write, FieldsWrite):
            if write.collection == STATES:
                self._state(write.user_id)
        elif write.scope is EraseScope.USER:
            self.engine.erase_user(write.target_id)
        else:
            self.engine.erase_session(write.target_id)

    def _messages(self, write: ProfileWrite) -> None:
        devices = self.engine.devices_of(write.user_id)
        if not devices:
            return
        for message in write.append:
            if message.seq is not None:  # stored by a live session, not through REST
                self.engine.fanout.send(devices, MessageStored(message))

    def _state(self, user_id: str) -> None:
        if not self.engine.devices_of(user_id):
            return
        cached = self.persistence.states.peek(user_id)
        if cached is not None:
            self.engine.state_changed(cached.value)
            return
        # Not cached here (the write was laid over loads): read it, then tell.
        task = asyncio.create_task(self._load_state(user_id), name="samvad-fanout-state")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _load_state(self, user_id: str) -> None:
        try:
            state = await self.persistence.get_state(user_id)
        except Exception:
            logger.warning("fan-out: the state of %s could not be read", user_id, exc_info=True)
            return
        if state is not None:
            self.engine.state_changed(state)

    async def close(self) -> None:
        """Wait for state reads started by :meth:`__call__` (at shutdown)."""
        for task in list(self._loads):
            task.cancel()
        await asyncio.gather(*self._loads, return_exceptions=True)
