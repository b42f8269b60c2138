"""What other instances wrote and erased, as this instance heard it.

:mod:`samvad.coherence` hears of every write another instance makes before
that instance's write-behind has flushed it (a document is written at most
about once a second). :class:`RemoteWrites` keeps those writes for ``ttl``
seconds, by document, so that a load here lays them over what it read from
the store, exactly like this instance's own unconfirmed writes: laying a write
over a document that already holds it changes nothing (fields are replaced
whole, messages merged by id).

It also keeps the erases other instances announced and have not finished: the
store still holds the erased documents until then, so a load must not read
them (:meth:`RemoteWrites.erased`). An announced erase that is never reported
done (its instance died) stops counting after ``hold`` seconds. Synchronous,
no I/O, on an injected timer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from samvad.documents import SESSIONS
from samvad.writes import Barrier, FieldsWrite, Key, ProfileWrite

__all__ = ["RemoteWrites"]

RemoteWrite = FieldsWrite | ProfileWrite


class RemoteWrites:
    """Recent writes of other instances by document, and their erases in progress."""

    def __init__(self, *, ttl: float, hold: float, timer: Callable[[], float]) -> None:
        self._ttl = ttl
        self._hold = hold
        self._timer = timer
        self._by_key: dict[Key, deque[tuple[float, RemoteWrite]]] = {}
        # Expiry order over every key: (expires at, key).
        self._expiry: deque[tuple[float, Key]] = deque()
        # Session documents written, per user (for listing a user's sessions).
        self._sessions_of: dict[str, set[Key]] = {}
        self._session_user: dict[Key, str] = {}
        # Erases announced and not done: barrier -> until when it counts.
        self._erasing: dict[Barrier, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, write: RemoteWrite) -> None:
        """Keep ``write`` (made by another instance) for ``ttl`` seconds."""
        now = self._timer()
        self._prune(now)
        key = write.key
        expires = now + self._ttl
        self._by_key.setdefault(key, deque()).append((expires, write))
        self._expiry.append((expires, key))
        if isinstance(write, FieldsWrite) and write.collection == SESSIONS:
            self._sessions_of.setdefault(write.user_id, set()).add(key)
            self._session_user[key] = write.user_id

    def writes(self, key: Key) -> list[RemoteWrite]:
        """The writes kept for the document ``key``, oldest first."""
        self._prune(self._timer())
        found = self._by_key.get(key)
        return [write for _, write in found] if found else []

    def session_writes(self, user_id: str) -> list[FieldsWrite]:
        """The writes kept for the session documents of ``user_id``, per document in order."""
        self._prune(self._timer())
        out: list[FieldsWrite] = []
        for key in sorted(self._sessions_of.get(user_id, ())):
            for _, write in self._by_key.get(key, ()):
                assert isinstance(write, FieldsWrite)
                out.append(write)
        return out

    def erase(self, barrier: Barrier) -> None:
        """Another instance is erasing ``barrier``: drop what it covers and hold
        loads behind it until :meth:`done` (or ``hold`` seconds)."""
        self._drop(barrier)
        self._erasing[barrier] = self._timer() + self._hold

    def done(self, barrier: Barrier) -> None:
        """The erase of ``barrier`` is done in the store."""
        self._erasing.pop(barrier, None)

    def erased(self, barriers: Iterable[Barrier]) -> bool:
        """True while an announced erase of any of ``barriers`` is not done."""
        if not self._erasing:
            return False
        now = self._timer()
        for barrier in barriers:
            until = self._erasing.get(barrier)
            if until is not None:
                if until > now:
                    return True
                del self._erasing[barrier]
        return False

    def _drop(self, barrier: Barrier) -> None:
        for key, found in list(self._by_key.items()):
            kept = deque(item for item in found if barrier not in item[1].barriers)
            if kept:
                self._by_key[key] = kept
            else:
                self._forget_key(key)
        # The expiry queue keeps stale (expires, key) pairs; _prune skips them.

    def _forget_key(self, key: Key) -> None:
        self._by_key.pop(key, None)
        user_id = self._session_user.pop(key, None)
        if user_id is not None:
            keys = self._sessions_of.get(user_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._sessions_of[user_id]

    def _prune(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            expires, key = expiry.popleft()
            found = self._by_key.get(key)
            if not found:
                continue
            while found and found[0][0] <= expires:
                found.popleft()
            if not found:
                self._forget_key(key)
