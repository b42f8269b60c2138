"""Two users on one live server, for the ownership tests (``tests/web/test_ownership*.py``).

Every text and state a user sends carries their uid, so "nothing crossed
users" is checkable without knowing what the server does: no frame a device
receives, and no document stored in Firestore under a user, may contain
another user's uid.

- :class:`Device` is a raw WebSocket that records every frame it receives and
  how it was closed;
- :class:`HeldResponder` keeps a reply in flight for as long as a test wants
  (a message containing :data:`HOLD`), so erasures can hit a streaming reply
  deterministically;
- :class:`OffsetClock` is the system clock, moved forward on demand, so idle
  expiry is reached without sleeping;
- :func:`assert_no_frame_crossed` and :func:`assert_no_document_crossed` are
  the two invariants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from google.cloud.firestore import AsyncClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from samvad.config import Settings
from samvad.responder import ReplyContext
from samvad.web.app import create_app
from tests.support.auth_emulator import AuthEmulator, AuthUser
from tests.support.server import LiveServer, live_server

Frame = dict[str, Any]

#: The close code of a device whose session was erased (docs/protocol.md).
ERASED = 4410
#: The service key of the ownership servers.
SERVICE_KEY = "ownership-service-key-0123456789"
#: A message containing this word gets a reply that stays in flight until released.
HOLD = "HOLD"
#: Seconds any single wait may take before the test fails (never a timing assertion:
#: only a bound on a hang).
WAIT = 15.0
#: The Firestore collections whose documents belong to a user.
COLLECTIONS = ("user_states", "user_profiles", "sessions", "interruptions")


class OffsetClock:
    """The system clock, which a test can move forward (both wall and monotonic time)."""

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self._offset)

    def monotonic(self) -> float:
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("A clock cannot be moved backwards.")
        self._offset += seconds


class HeldResponder:
    """Quotes the message in one chunk, then says "Done."; a message containing
    :data:`HOLD` waits for :meth:`release` before its second chunk."""

    def __init__(self) -> None:
        self._released = asyncio.Event()
        self._running: set[asyncio.Future[None]] = set()

    async def reply(self, context: ReplyContext) -> AsyncIterator[str]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running.add(done)
        try:
            yield f'You said: "{context.message}". '
            if HOLD in context.message:
                await self._released.wait()
            yield "Done."
        finally:
            self._running.discard(done)
            done.set_result(None)

    def release(self) -> None:
        """Let every held reply (and any later one) finish."""
        self._released.set()

    async def drained(self) -> None:
        """Return once no reply is being produced (after :meth:`release`)."""
        async with asyncio.timeout(WAIT):
            while self._running:
                await asyncio.gather(*self._running)
        # The reply task broadcasts its end right after the stream finished.
        for _ in range(5):
            await asyncio.sleep(0)


@dataclass
class World:
    """A live server, two users (the victim and the attacker), and the devices opened."""

    server: LiveServer
    clock: OffsetClock
    responder: HeldResponder
    http: httpx.AsyncClient
    firestore: AsyncClient
    victim: AuthUser
    attacker: AuthUser
    devices: list[Device] = field(default_factory=list)

    @property
    def uids(self) -> tuple[str, str]:
        return (self.victim.uid, self.attacker.uid)

    async def device(self, user: AuthUser, name: str) -> Device:
        """A new WebSocket of ``user`` (recorded, checked, closed at the end)."""
        device = await Device.open(self.server, user.uid, name)
        self.devices.append(device)
        return device

    async def check_frames(self) -> None:
        """Once every frame queued for an open device arrived: none crossed users."""
        for device in self.devices:
            await device.sync()
        assert_no_frame_crossed(self.devices, self.uids)

    async def check_documents(self, paths: Iterable[str] | None = None) -> None:
        """Once the write-behind drained: no document in Firestore crossed users
        (of ``paths``, or every one)."""
        await drain_writes(self.server)
        await assert_no_document_crossed(self.firestore, self.uids, paths)

    async def check_nothing_crossed(self) -> None:
        """Both invariants, after every held reply was let go."""
        self.responder.release()
        await self.responder.drained()
        await self.check_frames()
        await self.check_documents()


def ownership_settings(
    auth: AuthEmulator, emulator_host: str, project: str, **overrides: Any
) -> Settings:
    """Auth on (the emulator's tokens and :data:`SERVICE_KEY`), Firestore on the
    emulator, and no limit or delay that would slow a test down."""
    options: dict[str, Any] = {
        "store": "firestore",
        "emulator_host": emulator_host,
        "project": project,
        "auth": "firebase",
        "auth_project": auth.project,
        "api_keys": (SERVICE_KEY,),
        "flush_linger": 0.0,
        "ws_reply_chunk_delay": 0.0,
        "ws_rate_burst": 100_000,
        "refresh_rate_per_minute": 100_000,
        "delete_rate_per_minute": 100_000,
        "shutdown_flush_deadline": 5.0,
    }
    options.update(overrides)
    return Settings(**options)


@contextlib.asynccontextmanager
async def two_users(
    auth: AuthEmulator,
    emulator_host: str,
    project: str,
    firestore: AsyncClient,
    **overrides: Any,
) -> AsyncIterator[World]:
    """A live server with :class:`HeldResponder` and an :class:`OffsetClock`, and
    two users signed up on the Auth emulator (``FIREBASE_AUTH_EMULATOR_HOST``
    must be set: use the ``auth_emulator_env`` fixture)."""
    clock = OffsetClock()
    settings = ownership_settings(auth, emulator_host, project, **overrides)
    responder = HeldResponder()
    app = create_app(settings, clock=clock)
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        server.services.hub.responder = responder
        world = World(
            server=server,
            clock=clock,
            responder=responder,
            http=http,
            firestore=firestore,
            victim=auth.sign_up(),
            attacker=auth.sign_up(),
        )
        try:
            yield world
        finally:
            responder.release()
            for device in world.devices:
                await device.close()


def token_for(credential: str, user: AuthUser) -> str:
    """The ``start`` token: the user's own ID token, or the service key."""
    return user.id_token if credential == "token" else SERVICE_KEY


def headers_for(credential: str, user: AuthUser) -> dict[str, str]:
    """REST headers acting for ``user``: their ID token, or the service key."""
    if credential == "token":
        return {"Authorization": f"Bearer {user.id_token}"}
    return {"X-API-Key": SERVICE_KEY}


@dataclass(eq=False)
class Device:
    """One WebSocket of a user, recording every frame it receives."""

    owner: str
    name: str
    ws: ClientConnection
    frames: list[Frame] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, server: LiveServer, owner: str, name: str) -> Device:
        ws = await connect(f"{server.ws_url}/ws", open_timeout=WAIT, close_timeout=2)
        device = cls(owner=owner, name=name, ws=ws)
        device._reader = asyncio.create_task(device._read(), name=f"device-{name}")
        return device

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(json.loads(raw))
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self._changed.set()

    @property
    def closed(self) -> bool:
        return self._reader is not None and self._reader.done()

    @property
    def close_code(self) -> int | None:
        """The close code the server sent (None while open, or without a close frame)."""
        return self.ws.close_code if self.closed else None

    def __repr__(self) -> str:
        return f"<Device {self.name} of {self.owner}>"

    async def send(self, frame: Frame) -> int:
        """Send ``frame``; the index of the next frame to arrive (for :meth:`wait_for`)."""
        cursor = len(self.frames)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps(frame))
        return cursor

    async def wait_for(self, match: Callable[[Frame], bool], *, since: int = 0) -> Frame | None:
        """The first frame from index ``since`` on that matches; None if the socket
        closed without one."""
        async with asyncio.timeout(WAIT):
            while True:
                for frame in self.frames[since:]:
                    if match(frame):
                        return frame
                since = len(self.frames)
                if self.closed:
                    return None
                self._changed.clear()
                await self._changed.wait()

    async def wait_closed(self) -> int | None:
        """Wait until the server closes the socket; its close code."""
        assert self._reader is not None
        async with asyncio.timeout(WAIT):
            await asyncio.shield(self._reader)
        return self.close_code

    async def start(
        self,
        user: AuthUser,
        credential: str,
        session_id: str,
        *,
        resume_from: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Frame:
        """Send ``start``; the answer: ``started``, an ``error``, or ``{"type": "closed"}``."""
        frame: Frame = {
            "type": "start",
            "userId": user.uid,
            "sessionId": session_id,
            "token": token_for(credential, user),
        }
        if resume_from is not None:
            frame["resume"] = {"lastSeq": resume_from}
        if metadata is not None:
            frame["metadata"] = dict(metadata)
        cursor = await self.send(frame)
        answer = await self.wait_for(lambda f: f["type"] in ("started", "error"), since=cursor)
        if answer is None:
            return {"type": "closed", "code": self.close_code}
        if answer["type"] == "started" and resume_from is not None:
            # The resume frame follows at once: have it recorded before going on.
            await self.wait_for(lambda f: f["type"] == "resume", since=cursor)
        return answer

    async def say(self, text: str, *, whole_reply: bool = True) -> Frame | None:
        """Send a message; its ack (None if refused or closed), after the reply
        ended (``whole_reply``) or once its first chunk came."""
        cursor = await self.send({"type": "message", "text": text})
        ack = await self.wait_for(lambda f: f["type"] in ("ack", "error"), since=cursor)
        if ack is None or ack["type"] != "ack":
            return None
        begun = await self.wait_for(
            lambda f: f["type"] == "reply.start" and f.get("inReplyTo") == ack["seq"], since=cursor
        )
        if begun is None:
            return ack
        reply_id = begun["replyId"]
        ends = ("reply.end", "interrupted") if whole_reply else ("reply.chunk",)
        await self.wait_for(
            lambda f: f["type"] in ends and f.get("replyId") == reply_id, since=cursor
        )
        return ack

    async def set_state(self, state: Mapping[str, Any]) -> None:
        """Send a state update and wait for the echo (or an error)."""
        cursor = await self.send({"type": "state", "state": dict(state)})
        await self.wait_for(lambda f: f["type"] in ("state", "error"), since=cursor)

    async def sync(self) -> None:
        """Return once every frame queued for this device before now has arrived."""
        if self.closed:
            return
        ts = uuid.uuid4().hex
        cursor = await self.send({"type": "ping", "ts": ts})
        await self.wait_for(lambda f: f["type"] == "pong" and f.get("ts") == ts, since=cursor)

    async def close(self) -> None:
        """Close from the client side (a dropped connection, as the server sees it)."""
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), WAIT)

    def of_type(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if f["type"] == kind]


def assert_no_frame_crossed(devices: Iterable[Device], uids: Iterable[str]) -> None:
    """No device received anything carrying another user's uid."""
    everyone = tuple(uids)
    for device in devices:
        for index, frame in enumerate(device.frames):
            text = json.dumps(frame)
            for uid in everyone:
                if uid != device.owner:
                    assert uid not in text, (
                        f"{device.name} (user {device.owner}) received frame {index} carrying "
                        f"user {uid}'s data: {frame}"
                    )


def _owner(collection: str, doc_id: str, data: Mapping[str, Any]) -> str | None:
    if collection in ("user_states", "user_profiles"):
        return doc_id
    owner = data.get("userId")
    return owner if isinstance(owner, str) else None


async def stored_documents(
    client: AsyncClient, paths: Iterable[str] | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """(collection, id, data) of the documents at ``paths`` that exist, in one
    batched read; without ``paths``, of every document of the users' collections."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    if paths is not None:
        references = [client.document(path) for path in paths]
        async for snapshot in client.get_all(references):
            if snapshot.exists:
                collection = snapshot.reference.parent.id
                found.append((collection, snapshot.id, snapshot.to_dict() or {}))
        return found
    for collection in COLLECTIONS:
        async for snapshot in client.collection(collection).stream():
            found.append((collection, snapshot.id, snapshot.to_dict() or {}))
    return found


async def assert_no_document_crossed(
    client: AsyncClient, uids: Iterable[str], paths: Iterable[str] | None = None
) -> None:
    """No stored document of one user holds another user's uid (their texts, state,
    metadata), and every document has an owner. ``paths`` limits the check to
    those documents (default: every document of the users' collections)."""
    everyone = tuple(uids)
    for collection, doc_id, data in await stored_documents(client, paths):
        owner = _owner(collection, doc_id, data)
        assert owner is not None, f"{collection}/{doc_id} has no owner: {data}"
        text = json.dumps(data, default=str)
        for uid in everyone:
            if uid != owner:
                assert uid not in text, (
                    f"{collection}/{doc_id} of user {owner} holds user {uid}'s data: {data}"
                )


async def drain_writes(server: LiveServer) -> None:
    """Wait until the write-behind has written everything to Firestore."""
    persistence = server.services.persistence
    async with asyncio.timeout(WAIT * 2):
        await persistence.settle()
        await persistence.writes.flush()
        await persistence.settle()
