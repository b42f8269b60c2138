"""Erase barriers: what an erase covers, holds back and waits for (no I/O, no clock)."""

from __future__ import annotations

import pytest

from samvad.barriers import Barriers
from samvad.writes import session_barrier, user_barrier

U1 = user_barrier("u1")
U2 = user_barrier("u2")
S1 = session_barrier("s1")
SESSION_WRITE = (U1, S1)  # a session write sits behind its user and its session


def test_nothing_is_raised_or_covered_at_first() -> None:
    barriers = Barriers()
    assert not barriers.raised(SESSION_WRITE)
    assert not barriers.covers(SESSION_WRITE, 0)
    assert not barriers.erase_must_wait(U1)
    assert barriers.epoch == 0


def test_an_erase_raises_its_barrier_only() -> None:
    barriers = Barriers()
    barriers.erase_submitted(S1, 5)
    assert barriers.raised((S1,))
    assert barriers.raised(SESSION_WRITE), "a write behind the session is held back"
    assert not barriers.raised((U1,)), "the user's other writes are not"
    assert not barriers.raised((session_barrier("s2"),))
    assert not barriers.raised(())


def test_an_erase_covers_the_writes_submitted_before_it_only() -> None:
    barriers = Barriers()
    barriers.erase_submitted(U1, 5)
    assert barriers.covers((U1,), 4)
    assert barriers.covers(SESSION_WRITE, 4), "one covered barrier is enough"
    assert not barriers.covers((U1,), 6), "a write made after the erase survives it"
    assert not barriers.covers((U2,), 4)
    assert not barriers.covers((), 4), "an erase (behind no barrier) is covered by none"


def test_a_later_erase_moves_the_covering_point() -> None:
    barriers = Barriers()
    barriers.erase_submitted(U1, 5)
    barriers.erase_submitted(U1, 9)
    assert barriers.covers((U1,), 7)


def test_every_erase_submitted_changes_the_epoch() -> None:
    barriers = Barriers()
    barriers.erase_submitted(U1, 1)
    barriers.erase_submitted(U1, 2)
    barriers.erase_submitted(S1, 3)
    assert barriers.epoch == 3


def test_a_completed_erase_lowers_its_barrier_and_forgets_it() -> None:
    barriers = Barriers()
    barriers.erase_submitted(U1, 5)
    mark = barriers.erase_started(U1)
    assert barriers.raised((U1,)), "raised while the store erase runs"
    barriers.erase_done(U1, mark)
    assert not barriers.raised((U1,))
    assert not barriers.covers((U1,), 4), "nothing is kept once the barrier is down"
    assert repr(barriers) == "Barriers(raised=[], writing={}, epoch=1)"


def test_an_erase_submitted_while_another_runs_keeps_the_barrier_raised() -> None:
    barriers = Barriers()
    barriers.erase_submitted(U1, 5)
    first = barriers.erase_started(U1)
    barriers.erase_submitted(U1, 8)  # the store erase running may miss what comes before 8
    barriers.erase_done(U1, first)
    assert barriers.raised((U1,))
    assert barriers.covers((U1,), 7)
    second = barriers.erase_started(U1)
    barriers.erase_done(U1, second)
    assert not barriers.raised((U1,))


def test_a_retried_erase_satisfies_every_erase_submitted_before_it_started() -> None:
    # Two erases coalesce after the first one failed: the one retry lowers the
    # barrier (a count of erases would have stayed at one for ever).
    barriers = Barriers()
    barriers.erase_submitted(U1, 5)
    barriers.erase_started(U1)  # fails: erase_done is never called for it
    barriers.erase_submitted(U1, 8)
    retry = barriers.erase_started(U1)
    barriers.erase_done(U1, retry)
    assert not barriers.raised((U1,))


def test_starting_an_erase_that_was_never_submitted_is_refused() -> None:
    with pytest.raises(RuntimeError, match="none was submitted"):
        Barriers().erase_started(U1)


def test_an_erase_waits_while_writes_behind_its_barrier_are_in_flight() -> None:
    barriers = Barriers()
    barriers.writes_started(SESSION_WRITE)
    barriers.writes_started((U1,))
    assert barriers.erase_must_wait(U1)
    assert barriers.erase_must_wait(S1)
    assert not barriers.erase_must_wait(U2)
    barriers.writes_ended(SESSION_WRITE)
    assert barriers.erase_must_wait(U1), "one write behind the user is still in flight"
    assert not barriers.erase_must_wait(S1)
    barriers.writes_ended((U1,))
    assert not barriers.erase_must_wait(U1)
    assert repr(barriers) == "Barriers(raised=[], writing={}, epoch=0)"


def test_writes_in_flight_do_not_raise_a_barrier() -> None:
    barriers = Barriers()
    barriers.writes_started((U1,))
    assert not barriers.raised((U1,))
    assert not barriers.covers((U1,), 0)


def test_ending_a_write_that_never_started_is_refused() -> None:
    barriers = Barriers()
    barriers.writes_started((U1,))
    with pytest.raises(RuntimeError, match="none is in flight"):
        barriers.writes_ended((U2,))
