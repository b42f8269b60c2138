"""The session status lifecycle as clients see it.

A session is ``active`` until it is ended, or ``abandoned`` once it has been
idle longer than ``session_idle_timeout``. The background sweep marks idle
sessions abandoned in the store; until it has, the status is derived on read
here, so a listing never shows an idle session as active.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from samvad.clock import truncate_ms
from samvad.models import Session, SessionStatus
from samvad.persistence import Persistence
from samvad.stores.base import SessionCursor
from samvad.validation import MAX_ID_LENGTH

__all__ = [
    "effective_status",
    "idle_cutoff",
    "list_user_sessions",
]

# A position after every session id this API accepts (at most 128 characters;
# U+10FFFF sorts after any other character, in code points and in UTF-8).
_LAST_ID = "\U0010ffff" * MAX_ID_LENGTH
_MS = timedelta(milliseconds=1)


def idle_cutoff(persistence: Persistence) -> datetime:
    """Sessions whose last activity is older than this are abandoned."""
    idle = timedelta(seconds=persistence.settings.session_idle_timeout)
    return truncate_ms(truncate_ms(persistence.clock.now()) - idle)


def effective_status(session: Session, cutoff: datetime) -> SessionStatus:
    """The stored status, except that an active session idle past the time-out is
    ``abandoned`` already, before the background sweep gets to mark it."""
    if (
        session.status is SessionStatus.ACTIVE
        and session.last_activity is not None
        and session.last_activity < cutoff
    ):
        return SessionStatus.ABANDONED
    return session.status


def _position(session: Session) -> tuple[datetime, str]:
    assert session.last_activity is not None  # listings only hold sessions with one
    return (session.last_activity, session.id)


async def list_user_sessions(
    persistence: Persistence,
    user_id: str,
    *,
    status: SessionStatus | None,
    limit: int,
    cursor: SessionCursor | None,
) -> tuple[list[Session], str | None, bool]:
    """One page of a user's sessions by *effective* status, the next cursor, and
    whether the page is complete (False when built without Firestore)."""
    cutoff = idle_cutoff(persistence)
    if status is SessionStatus.ACTIVE:
        page = await persistence.list_sessions(
            user_id, status=SessionStatus.ACTIVE, limit=limit, cursor=cursor
        )
        fresh = [s for s in page.sessions if effective_status(s, cutoff) is SessionStatus.ACTIVE]
        # Newest first: once one is idle, every later one is too.
        next_cursor = page.next_cursor if len(fresh) == len(page.sessions) else None
        return fresh, next_cursor, page.complete
    if status is not SessionStatus.ABANDONED:
        page = await persistence.list_sessions(user_id, status=status, limit=limit, cursor=cursor)
        return list(page.sessions), page.next_cursor, page.complete
    # Abandoned: those marked so, merged with the active ones idle past the
    # cut-off (the idle ones start right below it in the same ordering).
    idle_start = SessionCursor(last_activity=cutoff - _MS, session_id=_LAST_ID)
    active_cursor = idle_start
    if cursor is not None and (cursor.last_activity, cursor.session_id) < (
        idle_start.last_activity,
        idle_start.session_id,
    ):
        active_cursor = cursor
    marked = await persistence.list_sessions(
        user_id, status=SessionStatus.ABANDONED, limit=limit, cursor=cursor
    )
    idle = await persistence.list_sessions(
        user_id, status=SessionStatus.ACTIVE, limit=limit, cursor=active_cursor
    )
    merged = {s.id: s for s in marked.sessions}
    for session in idle.sessions:
        if effective_status(session, cutoff) is SessionStatus.ABANDONED:
            merged.setdefault(session.id, session)
    ordered = sorted(merged.values(), key=_position, reverse=True)
    sessions = ordered[:limit]
    more = len(ordered) > limit or marked.next_cursor is not None or idle.next_cursor is not None
    next_cursor = None
    if more and sessions:
        last_activity, session_id = _position(sessions[-1])
        next_cursor = SessionCursor(last_activity=last_activity, session_id=session_id).encode()
    return sessions, next_cursor, marked.complete and idle.complete
