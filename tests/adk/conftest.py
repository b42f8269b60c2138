"""Fixtures for the ADK tests: Samvad stores on the emulator, services over them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from samvad.adk import SamvadSessionService
from samvad.config import Settings
from samvad.firestore_client import make_client
from samvad.stores.base import HistoryBounds, Store
from samvad.stores.firestore import FirestoreStore

SETTINGS = Settings(store="firestore", flush_linger=0.0, shutdown_flush_deadline=10.0)

MakeStore = Callable[[], Store]


def firestore_store(host: str, project: str, settings: Settings = SETTINGS) -> FirestoreStore:
    """A Firestore store on the emulator (open it, or use ``async with``)."""
    return FirestoreStore(
        lambda: make_client(project=project, emulator_host=host),
        bounds=HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes),
        deadline=5.0,
    )


@pytest.fixture
async def emulator_store(firestore_emulator: str, firestore_project: str) -> AsyncIterator[Store]:
    """An open Firestore store for this test's project."""
    async with firestore_store(firestore_emulator, firestore_project) as store:
        yield store


def samvad_service(store: Store, **options: Any) -> SamvadSessionService:
    options.setdefault("settings", SETTINGS)
    options.setdefault("mirror_history", False)
    return SamvadSessionService(store=store, **options)
