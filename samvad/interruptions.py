"""The interruption stack: barge-in context per session, in memory, on the hot path.

A push or a read is a dictionary lookup and a ``deque`` operation: no I/O, no
lock, microseconds. Only the last few interruptions of a session are kept
(3 by default) — enough for the next reply to know what was cut off — while a
count of every interruption feeds the stats and the refresh report.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "Interruption",
    "InterruptionStack",
]


@dataclass(frozen=True, slots=True)
class Interruption:
    """What was cut off, when and why.

    ``heard`` is the part of the reply the user actually heard; ``cut`` is what
    they did not hear.
    """

    session_id: str
    user_id: str
    at: datetime
    reason: str
    heard: str
    cut: str
    message_id: str | None = None


class InterruptionStack:
    """The last ``depth`` interruptions of each session, bounded to ``max_sessions``."""

    def __init__(self, *, depth: int = 3, max_sessions: int = 100_000) -> None:
        if depth < 1:
            raise ValueError("An interruption stack must keep at least one interruption.")
        self._depth = depth
        self._max_sessions = max_sessions
        self._stacks: OrderedDict[str, deque[Interruption]] = OrderedDict()
        self._session_counts: dict[str, int] = {}
        self._session_user: dict[str, str] = {}
        self._user_counts: dict[str, int] = {}
        self._total = 0

    def push(self, interruption: Interruption) -> None:
        """Record an interruption (newest last)."""
        session_id = interruption.session_id
        stack = self._stacks.get(session_id)
        if stack is None:
            stack = self._stacks[session_id] = deque(maxlen=self._depth)
            if len(self._stacks) > self._max_sessions:
                # The oldest session's context goes; its counts stay.
                self._stacks.popitem(last=False)
        stack.append(interruption)
        self._session_counts[session_id] = self._session_counts.get(session_id, 0) + 1
        self._session_user[session_id] = interruption.user_id
        self._user_counts[interruption.user_id] = self._user_counts.get(interruption.user_id, 0) + 1
        self._total += 1

    def recent(self, session_id: str) -> tuple[Interruption, ...]:
        """The kept interruptions of a session, oldest first."""
        stack = self._stacks.get(session_id)
        return tuple(stack) if stack else ()

    def latest(self, session_id: str) -> Interruption | None:
        stack = self._stacks.get(session_id)
        return stack[-1] if stack else None

    def count(self, session_id: str) -> int:
        """Interruptions recorded for a session since it was last cleared."""
        return self._session_counts.get(session_id, 0)

    def user_count(self, user_id: str) -> int:
        return self._user_counts.get(user_id, 0)

    @property
    def total(self) -> int:
        """Interruptions recorded (and not cleared) in this process."""
        return self._total

    def forget_context(self, session_id: str) -> None:
        """Drop a session's kept context (the session ended); its count stays."""
        self._stacks.pop(session_id, None)

    def clear_session(self, session_id: str) -> int:
        """Forget a session entirely; returns how many interruptions it had."""
        self._stacks.pop(session_id, None)
        count = self._session_counts.pop(session_id, 0)
        user_id = self._session_user.pop(session_id, None)
        if user_id is not None and count:
            remaining = self._user_counts.get(user_id, 0) - count
            if remaining > 0:
                self._user_counts[user_id] = remaining
            else:
                self._user_counts.pop(user_id, None)
        self._total -= count
        return count

    def clear_user(self, user_id: str) -> int:
        """Forget every session of a user; returns how many interruptions they had."""
        sessions = [sid for sid, uid in self._session_user.items() if uid == user_id]
        cleared = sum(self.clear_session(session_id) for session_id in sessions)
        self._user_counts.pop(user_id, None)
        return cleared
