"""The store a configuration asks for."""

from __future__ import annotations

import logging

from samvad.config import Settings
from samvad.firestore_client import client_from_settings
from samvad.stores.base import HistoryBounds, Store
from samvad.stores.firestore import FirestoreStore
from samvad.stores.memory import MemoryStore

__all__ = ["build_store"]

logger = logging.getLogger(__name__)


def build_store(settings: Settings) -> Store:
    """The store ``settings`` ask for; ``auto`` means Firestore when one is configured."""
    bounds = HistoryBounds(cap=settings.history_cap, max_bytes=settings.history_max_bytes)
    use_firestore = settings.store == "firestore" or (
        settings.store == "auto" and settings.firestore_configured
    )
    if not use_firestore:
        if settings.store == "auto":
            logger.warning("No Firestore configured: running memory-only, data is lost on restart")
        return MemoryStore(bounds=bounds)
    client_from_settings(settings)  # fail at start-up, naming the missing variable
    return FirestoreStore(
        lambda: client_from_settings(settings),
        bounds=bounds,
        deadline=settings.firestore_deadline,
    )
