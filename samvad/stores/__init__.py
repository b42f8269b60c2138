"""Storage backends behind one contract (:class:`samvad.stores.base.Store`)."""

from __future__ import annotations

from samvad.stores.base import HistoryBounds, Store, StoreUnavailable

__all__ = ["HistoryBounds", "Store", "StoreUnavailable"]
