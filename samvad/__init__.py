"""Samvad: a real-time conversation backend with an in-memory hot path and Firestore durability."""

from __future__ import annotations

__version__ = "0.1.0"
