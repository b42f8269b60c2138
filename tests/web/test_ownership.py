"""No one reaches another user's conversation (issue 15), tried as an attacker would.

Two users with real ID tokens from the Firebase Auth emulator, a live server
on the Firestore emulator. The victim V holds a session S; it is erased
(deleted, or V's data refreshed), ended, or abandoned as idle; then the
attacker A tries to join S in every way a client can: ``start``, ``start``
with ``resume``, as a second device (both users already hold other devices),
and after a reconnect (V's device dropped while a reply was still streaming;
A joins, drops and resumes). Each with a user's own ID token and with the
service key. Then both go on talking.

Whatever A gets — a refusal (``conflict``), or after an erasure a fresh,
empty session of A's own — A's devices never receive anything of V's (no
``started`` of V's session, no replayed or live frame), V's devices nothing
of A's, and after the write-behind drained no document of one user in
Firestore holds anything of the other. Every text, state and metadata a user
sends carries their uid, which is what the checks look for
(``tests/support/ownership.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from google.cloud.firestore import AsyncClient

from tests.support.auth_emulator import AuthEmulator
from tests.support.ownership import (
    ERASED,
    HOLD,
    Device,
    Frame,
    World,
    drain_writes,
    headers_for,
    two_users,
)
from tests.support.server import LiveServer

pytestmark = pytest.mark.firestore

ERASURES = ("delete", "refresh", "end", "idle")
JOINS = ("start", "resume", "second-device", "reconnect")
CREDENTIALS = ("token", "service-key")
#: Erasures after which the session id is free: re-using it starts a fresh, empty session.
FREEING = frozenset({"delete", "refresh"})
#: ``session_idle_timeout`` of the test servers; the clock is moved past it.
IDLE_TIMEOUT = 60.0
#: ``cache_ttl`` of the test servers.
CACHE_TTL = 600.0


@pytest.fixture
async def world(
    auth_emulator_env: AuthEmulator,
    firestore_emulator: str,
    firestore_project: str,
    firestore_client: AsyncClient,
) -> AsyncIterator[World]:
    async with two_users(
        auth_emulator_env,
        firestore_emulator,
        firestore_project,
        firestore_client,
        session_idle_timeout=IDLE_TIMEOUT,
        cache_ttl=CACHE_TTL,
    ) as world:
        yield world


def new_session_id() -> str:
    # Deliberately guessable-looking: the attacker is assumed to know it.
    return "session-" + uuid.uuid4().hex[:8]


async def sweep_idle(server: LiveServer) -> None:
    """What the app's idle sweeper does on its next round."""
    await server.services.persistence.sweep_idle_sessions()


async def erase(w: World, erasure: str, credential: str, session_id: str) -> None:
    """Erase, end or abandon the victim's session (REST with ``credential``, or idle expiry)."""
    headers = headers_for(credential, w.victim)
    if erasure == "delete":
        response = await w.http.delete(f"/api/session/{session_id}", headers=headers)
    elif erasure == "refresh":
        response = await w.http.post(
            "/api/session/refresh", json={"userId": w.victim.uid}, headers=headers
        )
    elif erasure == "end":
        response = await w.http.put(f"/api/session/{session_id}/end", headers=headers)
    else:
        w.clock.advance(IDLE_TIMEOUT + 1)
        await sweep_idle(w.server)
        status = await w.http.get(f"/api/session/{session_id}", headers=headers)
        # Abandoned; or ended already, when its last device left (the reconnect case).
        assert status.json()["session"]["status"] in ("abandoned", "ended"), status.text
        return
    assert response.status_code == 200, response.text


def assert_fresh_and_empty(started: Frame, device: Device, *, resumed: bool) -> None:
    """A ``started`` of a new session: nothing to replay, nothing in flight."""
    assert started["type"] == "started", started
    assert started["lastSeq"] == 0, started
    assert all(m["sessionId"] != started["sessionId"] for m in started["history"]), started
    if resumed:
        resume = device.of_type("resume")[-1]
        assert resume["recovered"] is True and resume["messages"] == [], resume
        assert resume["inFlight"] is None, resume


def assert_conflict(answer: Frame, device: Device) -> None:
    assert answer["type"] == "error" and answer["code"] == "conflict", answer
    assert not device.of_type("started") and not device.of_type("resume"), device.frames


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("join", JOINS)
@pytest.mark.parametrize("erasure", ERASURES)
async def test_the_other_user_gets_nothing_of_an_erased_ended_or_abandoned_session(
    world: World, erasure: str, join: str, credential: str
) -> None:
    w = world
    victim, attacker = w.victim, w.attacker
    session_id = new_session_id()

    # The victim's conversation.
    phone = await w.device(victim, "victim-phone")
    started = await phone.start(victim, "token", session_id, metadata={"note": victim.uid})
    assert started["type"] == "started", started
    assert await phone.say(f"{victim.uid}: my account number is 1234")
    await phone.set_state({"note": victim.uid})
    on_session = [phone]
    if join == "second-device":
        laptop = await w.device(victim, "victim-laptop")
        assert (await laptop.start(victim, "token", session_id, resume_from=0))["type"] == "started"
        on_session.append(laptop)
        own = await w.device(attacker, "attacker-own-session")
        assert (await own.start(attacker, credential, new_session_id()))["type"] == "started"
    if join == "reconnect":
        # The phone drops while a reply streams: the reply goes on, for a resume.
        assert await phone.say(f"{HOLD} {victim.uid}: and my PIN", whole_reply=False)
        await phone.close()
        on_session.remove(phone)

    await erase(w, erasure, credential, session_id)
    if erasure in FREEING:
        for device in on_session:
            assert await device.wait_closed() == ERASED, device
    elif erasure == "end":  # REST end ends the live session as the end frame does
        for device in on_session:
            assert await device.wait_closed() == 1000, device

    # The attacker joins.
    resume_from = None if join == "start" else 0
    intruder = await w.device(attacker, "attacker")
    answer = await intruder.start(attacker, credential, session_id, resume_from=resume_from)
    if erasure in FREEING:
        assert_fresh_and_empty(answer, intruder, resumed=resume_from is not None)
    else:
        assert_conflict(answer, intruder)
    if join == "reconnect" and answer["type"] == "started":
        await intruder.close()
        intruder = await w.device(attacker, "attacker-reconnected")
        again = await intruder.start(attacker, credential, session_id, resume_from=0)
        assert_fresh_and_empty(again, intruder, resumed=True)

    # Both go on: the victim on what is left and on a new session, the attacker on S.
    for device in on_session:
        if not device.closed:
            await device.say(f"{victim.uid}: still here")
    elsewhere = await w.device(victim, "victim-new-session")
    assert (await elsewhere.start(victim, "token", new_session_id()))["type"] == "started"
    assert await elsewhere.say(f"{victim.uid}: a new conversation")
    await elsewhere.set_state({"note": victim.uid, "again": True})
    back = await w.device(victim, "victim-back")
    returned = await back.start(victim, "token", session_id, resume_from=0)
    if answer["type"] == "started":
        # S is the attacker's now: the victim may not join it either.
        assert_conflict(returned, back)
        assert await intruder.say(f"{attacker.uid}: hello")
        await intruder.set_state({"note": attacker.uid})
        open_before = [d for d in w.devices if d.owner == victim.uid and not d.closed]
        await intruder.send({"type": "end"})
        assert await intruder.wait_closed() == 1000
        for device in open_before:
            await device.sync()
            assert not device.closed, f"the attacker's end closed {device}"
    else:
        assert returned["type"] == "started", returned

    await w.check_nothing_crossed()


# -- the attack of issue 15, step by step ----------------------------------------------------


@pytest.mark.parametrize("erasure", ["delete", "refresh"])
@pytest.mark.parametrize("credential", CREDENTIALS)
async def test_the_reported_takeover_after_an_erasure_gets_a_fresh_session_of_its_own(
    world: World, erasure: str, credential: str
) -> None:
    w = world
    victim, attacker = w.victim, w.attacker
    session_id = "session_123"  # the documented example: guessable
    # 1. V starts S with V's token, sends a message, keeps the socket open.
    phone = await w.device(victim, "victim-phone")
    assert (await phone.start(victim, "token", session_id))["type"] == "started"
    assert await phone.say(f"{victim.uid}: my account number is 1234")
    # 2. V deletes S (or clears everything).
    await erase(w, erasure, credential, session_id)
    assert await phone.wait_closed() == ERASED
    laptop = await w.device(victim, "victim-laptop-elsewhere")
    assert (await laptop.start(victim, "token", new_session_id()))["type"] == "started"
    # 3. A starts S with a resume from 0.
    intruder = await w.device(attacker, "attacker")
    started = await intruder.start(attacker, "token", session_id, resume_from=0)
    assert_fresh_and_empty(started, intruder, resumed=True)
    assert started["userId"] == attacker.uid
    # A's message, state and end are A's own, and reach none of V's devices.
    assert await intruder.say(f"{attacker.uid}: whose session is this?")
    await intruder.set_state({"note": attacker.uid})
    await intruder.send({"type": "end"})
    assert await intruder.wait_closed() == 1000
    await laptop.sync()
    assert not laptop.closed, "the attacker's end closed the victim's other device"
    await w.check_nothing_crossed()
    session = (await w.firestore.collection("sessions").document(session_id).get()).to_dict()
    assert session is not None and session["userId"] == attacker.uid
    profile = (await w.firestore.collection("user_profiles").document(attacker.uid).get()).to_dict()
    assert profile is not None
    contents = [m["content"] for m in profile["conversationHistory"]]
    assert f"{attacker.uid}: whose session is this?" in contents
    assert not any("1234" in text for text in contents)


@pytest.mark.parametrize("resume_from", [None, 0])
async def test_a_live_session_of_another_user_is_refused(
    world: World, resume_from: int | None
) -> None:
    w = world
    session_id = new_session_id()
    phone = await w.device(w.victim, "victim-phone")
    assert (await phone.start(w.victim, "token", session_id))["type"] == "started"
    assert await phone.say(f"{w.victim.uid}: hello", whole_reply=False)
    intruder = await w.device(w.attacker, "attacker")
    answer = await intruder.start(w.attacker, "token", session_id, resume_from=resume_from)
    assert_conflict(answer, intruder)
    # The connection stays usable for a start of A's own.
    assert (await intruder.start(w.attacker, "token", new_session_id()))["type"] == "started"
    assert await phone.say(f"{w.victim.uid}: still mine")
    await w.check_nothing_crossed()


async def test_a_live_channel_is_refused_even_when_its_document_is_gone(world: World) -> None:
    """The live side is checked too, not only the stored document: here the
    document vanished behind the server's back (deleted in Firestore directly,
    and the cached copy expired) while V is still connected."""
    w = world
    session_id = new_session_id()
    phone = await w.device(w.victim, "victim-phone")
    assert (await phone.start(w.victim, "token", session_id))["type"] == "started"
    assert await phone.say(f"{w.victim.uid}: hello")
    await drain_writes(w.server)
    await w.firestore.collection("sessions").document(session_id).delete()
    w.clock.advance(CACHE_TTL + 1)  # past cache_ttl: the next read goes to Firestore
    intruder = await w.device(w.attacker, "attacker")
    answer = await intruder.start(w.attacker, "token", session_id, resume_from=0)
    assert_conflict(answer, intruder)
    await w.check_nothing_crossed()


async def test_after_an_end_frame_the_session_stays_its_users(world: World) -> None:
    w = world
    session_id = new_session_id()
    phone = await w.device(w.victim, "victim-phone")
    assert (await phone.start(w.victim, "token", session_id))["type"] == "started"
    assert await phone.say(f"{w.victim.uid}: goodbye")
    await phone.send({"type": "end"})
    assert await phone.wait_closed() == 1000
    intruder = await w.device(w.attacker, "attacker")
    assert_conflict(await intruder.start(w.attacker, "token", session_id, resume_from=0), intruder)
    await w.check_nothing_crossed()
