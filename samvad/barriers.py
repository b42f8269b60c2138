"""Erase barriers: which writes an erase covers, and which must wait for it.

An erase of a user or of a session raises a *barrier* (``("user", id)`` or
``("session", id)``); every write names the barriers it sits behind
(``Write.barriers``: a session write sits behind its user's and its session's).
:class:`Barriers` keeps the bookkeeping for the write-behind, synchronously,
with no I/O, no clock and no knowledge of the queue. Writes and erases are
identified by *sequence numbers*: the order in which they were submitted, one
numbering for both.

Guarantees, given that the write-behind reports every submission, start and
end of a store write:

* **Raised until done** — a barrier is raised from the submission of an erase
  until the store erase that *started after* the last erase submitted for it
  has completed. Erases that coalesce, fail and are retried, or are submitted
  while another is in flight never lower it early nor leave it raised for
  ever. A write behind a raised barrier is held back, and a reader treats what
  the store holds behind it as gone.
* **Covered writes are void** — a write submitted before an erase of one of
  its barriers is covered by it (:meth:`Barriers.covers`): it is not live data
  any more, whether it is queued, in flight, or failed.
* **An erase waits for writes in flight** behind its barrier
  (:meth:`Barriers.erase_must_wait`), so that it deletes what they leave
  behind rather than run before them.
* **Epoch** — :attr:`Barriers.epoch` changes with every erase submitted: a
  reader that sees it change during a store read reads again behind the erase.
* State is kept only for barriers with an erase pending or writes in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from samvad.writes import Barrier

__all__ = ["Barriers"]


class Barriers:
    """Erases pending and writes in flight, per barrier."""

    __slots__ = ("_latest", "_writing", "epoch")

    def __init__(self) -> None:
        # The sequence number of the newest erase submitted, per raised barrier.
        self._latest: dict[Barrier, int] = {}
        # Writes (not erases) in flight, per barrier they sit behind.
        self._writing: Counter[Barrier] = Counter()
        #: Incremented on every erase submitted.
        self.epoch = 0

    # -- erases ---------------------------------------------------------------

    def erase_submitted(self, barrier: Barrier, seq: int) -> None:
        """An erase of ``barrier`` was submitted with sequence number ``seq``
        (greater than every sequence number handed out before)."""
        self._latest[barrier] = seq
        self.epoch += 1

    def erase_started(self, barrier: Barrier) -> int:
        """An erase of ``barrier`` goes to the store now; returns the mark to pass
        to :meth:`erase_done` when it succeeds.

        The store erase deletes everything there is at the time it runs, so it
        satisfies every erase submitted before it starts.
        """
        try:
            return self._latest[barrier]
        except KeyError:
            raise RuntimeError(f"Cannot start an erase of {barrier}: none was submitted.") from None

    def erase_done(self, barrier: Barrier, mark: int) -> None:
        """The store erase started with ``mark`` succeeded: lower the barrier,
        unless an erase was submitted after it started."""
        if self._latest.get(barrier) == mark:
            del self._latest[barrier]

    def raised(self, barriers: Iterable[Barrier]) -> bool:
        """True while an erase of any of ``barriers`` has not completed."""
        latest = self._latest
        return bool(latest) and any(barrier in latest for barrier in barriers)

    def covers(self, barriers: Iterable[Barrier], seq: int) -> bool:
        """True when an erase of one of ``barriers`` was submitted after the write
        with sequence number ``seq``."""
        latest = self._latest
        return bool(latest) and any(latest.get(barrier, -1) > seq for barrier in barriers)

    # -- writes in flight -----------------------------------------------------

    def writes_started(self, barriers: Iterable[Barrier]) -> None:
        """A write behind ``barriers`` goes to the store now."""
        self._writing.update(barriers)

    def writes_ended(self, barriers: Iterable[Barrier]) -> None:
        """A write started with :meth:`writes_started` ended (succeeded or not)."""
        writing = self._writing
        for barrier in barriers:
            left = writing[barrier] - 1
            if left > 0:
                writing[barrier] = left
            elif barrier in writing:
                del writing[barrier]
            else:
                raise RuntimeError(f"Cannot end a write behind {barrier}: none is in flight.")

    def erase_must_wait(self, barrier: Barrier) -> bool:
        """True while writes behind ``barrier`` are in flight."""
        return self._writing[barrier] > 0

    def __repr__(self) -> str:
        return (
            f"Barriers(raised={sorted(self._latest)}, writing={dict(self._writing)}, "
            f"epoch={self.epoch})"
        )
