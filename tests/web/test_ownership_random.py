"""Two users, a few hundred random steps over a small shared pool of session ids.

Each step is one of start, start with resume, message, state, end, delete,
refresh and disconnect, by one of two users on one of their two devices, with
their ID token or the service key (and now and then the REST doors to the same
sessions: create, and a history message naming one). A model of who holds which session id says
what the server must answer (a start on the other user's session is refused
with ``conflict``; a delete of another user's session with 403; an erasure
closes the devices on what it erased, an ``end`` those of the session). After
every step no frame has crossed users; after every step the write-behind is
drained and no document in Firestore has either.

The run is seeded: a failure names the seed, and ``SAMVAD_OWNERSHIP_SEED``
replays it. It stops after :data:`STEPS` steps or :data:`TIME_BUDGET` seconds,
whichever comes first, and says how many it took.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from google.cloud.firestore import AsyncClient

from tests.support.auth_emulator import AuthEmulator, AuthUser
from tests.support.ownership import ERASED, HOLD, Device, World, headers_for, two_users

pytestmark = pytest.mark.firestore

STEPS = 300
#: Seconds of steps at most (a slow machine runs fewer; the count is reported).
TIME_BUDGET = 40.0
POOL = ("s-alpha", "s-beta", "s-gamma")
DEVICES_PER_USER = 2
CREDENTIALS = ("token", "service-key")
SEED_VARIABLE = "SAMVAD_OWNERSHIP_SEED"


@dataclass
class Slot:
    """One device place of a user: its socket, and the session it started (if any)."""

    user: AuthUser
    name: str
    device: Device | None = None
    session: str | None = None

    @property
    def started(self) -> bool:
        return self.device is not None and self.session is not None and not self.device.closed


class Model:
    """Who holds which session id, and which devices are on which session."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.users = (world.victim, world.attacker)
        self.owner: dict[str, str | None] = dict.fromkeys(POOL)
        self.slots = [
            Slot(user=user, name=f"u{u}-d{d}")
            for u, user in enumerate(self.users)
            for d in range(DEVICES_PER_USER)
        ]
        self._opened = 0
        #: What happened, for the summary: the run must have hit the attack paths.
        self.events: Counter[str] = Counter()
        #: The last user who held each session id (it stays after an erasure).
        self.last_holder: dict[str, str] = {}
        #: Every document the two users can have, but logged interruptions (off).
        self.paths = [
            *(
                f"{collection}/{user.uid}"
                for collection in ("user_states", "user_profiles")
                for user in self.users
            ),
            *(f"sessions/{session_id}" for session_id in POOL),
        ]
        #: The step being taken (for the failure message).
        self.current = ""

    def doing(self, what: str) -> str:
        self.current = what
        return what

    def name(self, user: AuthUser) -> str:
        return f"u{self.users.index(user)}"

    def on(self, user: AuthUser, session_id: str | None = None) -> list[Slot]:
        """The user's started devices (on ``session_id``, or on any session)."""
        return [
            s
            for s in self.slots
            if s.user is user and s.started and session_id in (None, s.session)
        ]

    async def expect_closed(self, slots: list[Slot], code: int) -> None:
        self.events[f"devices closed with {code}"] += len(slots)
        for slot in slots:
            assert slot.device is not None
            closed = await slot.device.wait_closed()
            assert closed == code, (
                f"{slot.name} on {slot.session} closed with {closed}, not {code}; "
                f"its frames: {[frame['type'] for frame in slot.device.frames]}"
            )
            slot.session = None

    def check_open(self) -> None:
        """No device the model has on a session was closed behind its back."""
        for slot in self.slots:
            device = slot.device
            if device is not None and slot.session is not None:
                assert not device.closed, (
                    f"{device.name} on {slot.session} was closed ({device.close_code}); "
                    f"its frames: {[frame['type'] for frame in device.frames]}"
                )

    # -- steps -----------------------------------------------------------------------

    async def start(self, rng: random.Random, slot: Slot) -> str:
        session_id = rng.choice(POOL)
        credential = rng.choice(CREDENTIALS)
        resume_from = rng.choice((None, 0))
        user = slot.user
        if slot.device is None or slot.device.closed or slot.session is not None:
            if slot.device is not None and not slot.device.closed:
                await self.disconnect(slot)
            self._opened += 1
            slot.device = await self.world.device(user, f"{slot.name}#{self._opened}")
            slot.session = None
        holder = self.owner[session_id]
        what = self.doing(f"{slot.name} start {session_id} resume={resume_from} ({credential})")
        answer = await slot.device.start(user, credential, session_id, resume_from=resume_from)
        if holder is not None and holder != user.uid:
            assert answer["type"] == "error" and answer["code"] == "conflict", (what, answer)
            self.events["refused: the other user's session"] += 1
        else:
            assert answer["type"] == "started", (what, answer)
            if self.last_holder.get(session_id) not in (None, user.uid):
                # The attack: an id the other user held, erased since.
                assert answer["lastSeq"] == 0, (what, answer)
                self.events["started: an id the other user held, erased"] += 1
            self.owner[session_id] = self.last_holder[session_id] = user.uid
            slot.session = session_id
        return what

    async def message(self, rng: random.Random, slot: Slot) -> str:
        assert slot.device is not None
        # Some replies stay in flight (until the next message, an end, an
        # erasure, or the orphan deadline): what an erasure must cancel.
        held = rng.random() < 0.2
        what = self.doing(f"{slot.name} message on {slot.session}{' (held)' if held else ''}")
        text = f"{HOLD if held else ''} {slot.user.uid} says {rng.randrange(10**6)}"
        ack = await slot.device.say(text, whole_reply=not held)
        assert ack is not None, f"{what}: not acknowledged"
        return what

    async def state(self, rng: random.Random, slot: Slot) -> str:
        assert slot.device is not None
        what = self.doing(f"{slot.name} state")
        await slot.device.set_state({"note": slot.user.uid, "n": rng.randrange(10**6)})
        assert slot.device.of_type("state"), f"{what}: no state frame"
        return what

    async def end(self, rng: random.Random, slot: Slot) -> str:
        assert slot.device is not None and slot.session is not None
        session_id = slot.session
        together = self.on(slot.user, session_id)
        what = self.doing(f"{slot.name} end {session_id}")
        await slot.device.send({"type": "end"})
        await self.expect_closed(together, 1000)
        return what

    async def disconnect(self, slot: Slot) -> str:
        assert slot.device is not None
        what = self.doing(f"{slot.name} disconnect from {slot.session}")
        await slot.device.close()
        slot.session = None
        return what

    async def delete(self, rng: random.Random, user: AuthUser) -> str:
        session_id = rng.choice(POOL)
        credential = rng.choice(CREDENTIALS)
        holder = self.owner[session_id]
        held_by = "nobody" if holder is None else f"u{[u.uid for u in self.users].index(holder)}"
        what = self.doing(f"{self.name(user)} delete {session_id} ({credential}, {held_by}'s)")
        holders = [u for u in self.users if u.uid == holder]
        on_it = self.on(holders[0], session_id) if holders else []
        response = await self.world.http.delete(
            f"/api/session/{session_id}", headers=headers_for(credential, user)
        )
        if holder is None:
            assert response.status_code == 404, (what, response.text)
        elif holder != user.uid and credential == "token":
            assert response.status_code == 403, (what, response.text)
        else:
            # Its holder, or the service, which may delete any session.
            assert response.status_code == 200, (what, response.text)
            await self.expect_closed(on_it, ERASED)
            self.owner[session_id] = None
        return what

    async def create(self, rng: random.Random, user: AuthUser) -> str:
        """``POST /api/session/create``: the REST door to the same rule."""
        session_id = rng.choice(POOL)
        credential = rng.choice(CREDENTIALS)
        holder = self.owner[session_id]
        what = self.doing(f"{self.name(user)} create {session_id} ({credential})")
        response = await self.world.http.post(
            "/api/session/create",
            json={"sessionId": session_id, "userId": user.uid, "metadata": {"note": user.uid}},
            headers=headers_for(credential, user),
        )
        if holder is not None and holder != user.uid:
            assert response.status_code == 409, (what, response.text)
            self.events["refused: the other user's session"] += 1
        else:
            assert response.status_code == 200, (what, response.text)
            self.owner[session_id] = self.last_holder[session_id] = user.uid
        return what

    async def append(self, rng: random.Random, user: AuthUser) -> str:
        """``POST /api/session/{userId}/history`` naming a session of the pool."""
        session_id = rng.choice(POOL)
        credential = rng.choice(CREDENTIALS)
        holder = self.owner[session_id]
        what = self.doing(f"{self.name(user)} append to history of {session_id} ({credential})")
        response = await self.world.http.post(
            f"/api/session/{user.uid}/history",
            json={"role": "user", "content": f"{user.uid} wrote", "sessionId": session_id},
            headers=headers_for(credential, user),
        )
        if holder is not None and holder != user.uid:
            assert response.status_code == 409, (what, response.text)
            self.events["refused: the other user's session"] += 1
        else:
            assert response.status_code == 200, (what, response.text)
        return what

    async def refresh(self, rng: random.Random, user: AuthUser) -> str:
        credential = rng.choice(CREDENTIALS)
        what = self.doing(f"{self.name(user)} refresh ({credential})")
        on_them = self.on(user)
        response = await self.world.http.post(
            "/api/session/refresh", json={"userId": user.uid}, headers=headers_for(credential, user)
        )
        assert response.status_code == 200, response.text
        await self.expect_closed(on_them, ERASED)
        for session_id, holder in self.owner.items():
            if holder == user.uid:
                self.owner[session_id] = None
        return what

    async def step(self, rng: random.Random) -> str:
        slot = rng.choice(self.slots)
        roll = rng.random()
        if roll < 0.06:
            return await self.delete(rng, slot.user)
        if roll < 0.09:
            return await self.refresh(rng, slot.user)
        if roll < 0.11:
            return await self.create(rng, slot.user)
        if roll < 0.13:
            return await self.append(rng, slot.user)
        if not slot.started:
            return await self.start(rng, slot)
        if roll < 0.45:
            return await self.message(rng, slot)
        if roll < 0.65:
            return await self.state(rng, slot)
        if roll < 0.72:
            return await self.end(rng, slot)
        if roll < 0.82:
            return await self.disconnect(slot)
        return await self.start(rng, slot)  # the same device place joins another session


@pytest.fixture
async def world(
    auth_emulator_env: AuthEmulator,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> AsyncIterator[World]:
    async with two_users(
        auth_emulator_env, firestore_emulator, firestore_project, firestore_client
    ) as world:
        yield world


async def test_random_steps_of_two_users_never_cross(world: World) -> None:
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    model = Model(world)
    done: list[str] = []
    deadline = time.monotonic() + TIME_BUDGET
    try:
        while len(done) < STEPS and time.monotonic() < deadline:
            done.append(await model.step(rng))
            await world.check_frames()
            model.check_open()
            await world.check_documents(model.paths)
    except Exception as exc:
        recent = "\n  ".join(done[-15:])
        raise AssertionError(
            f"seed {seed} (replay with {SEED_VARIABLE}={seed}): step {len(done) + 1} "
            f"({model.current}) failed with {type(exc).__name__}: {exc}\n"
            f"after:\n  {recent}"
        ) from exc
    print(f"{len(done)} random steps, seed {seed}: {dict(model.events)}")
    await world.check_documents()  # every collection, once
