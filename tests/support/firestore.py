"""Clients for the Firestore emulator in tests."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest
from google.cloud.firestore import AsyncClient

from samvad.firestore_client import close_client, make_client

__all__ = ["close_client", "emulator_missing", "make_emulator_client"]


def make_emulator_client(host_port: str, project: str) -> AsyncClient:
    """An ``AsyncClient`` for ``project`` on the emulator (or proxy) at ``host_port``.

    The library reads ``FIRESTORE_EMULATOR_HOST`` only in its constructor;
    ``make_client`` sets it just for that call and restores the environment,
    so clients for different emulators and proxies can coexist. Close the
    client with ``await close_client(client)``: ``AsyncClient.close()`` is
    synchronous and leaves the gRPC channel open.
    """
    return make_client(project=project, emulator_host=host_port)


def emulator_missing(reason: str) -> NoReturn:
    """Fail the test on CI (``CI`` is ``true`` or ``1``), skip it elsewhere."""
    if os.environ.get("CI", "").strip().lower() in {"true", "1"}:
        pytest.fail(reason)
    pytest.skip(reason)
