"""Building and closing google-cloud-firestore ``AsyncClient`` objects.

Three ways to reach Firestore, in order of precedence:
1. ``FIRESTORE_EMULATOR_HOST`` — the local emulator, with anonymous credentials.
2. ``GOOGLE_APPLICATION_CREDENTIALS`` — a service-account key file.
3. Application Default Credentials (Cloud Run, GKE, ``gcloud auth application-default``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.auth.credentials import AnonymousCredentials
from google.cloud.firestore import AsyncClient, Client
from google.cloud.firestore_v1 import base_client

from samvad.config import Settings
from samvad.errors import ConfigError

__all__ = [
    "RECONNECT_OPTIONS",
    "SamvadAsyncClient",
    "client_from_settings",
    "close_client",
    "make_client",
    "sync_client_from_settings",
]

logger = logging.getLogger(__name__)

# gRPC's defaults reconnect after 1 s x1.6 per failure, up to 120 s: after a
# 30 s outage a channel took 12-19 s to notice Firestore was back (3 runs
# through tests/support/faultproxy.py); with these options 0.4-0.8 s. A local
# subchannel pool keeps a recreated client from inheriting the old backoff.
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.use_local_subchannel_pool", 1),
]


class SamvadAsyncClient(AsyncClient):
    """``AsyncClient`` whose gRPC channel reconnects promptly after an outage.

    The library builds its channel in ``_firestore_api_helper`` with fixed
    options; this override builds the same channel with
    :data:`RECONNECT_OPTIONS` added (checked against google-cloud-firestore
    2.34; ``tests/test_firestore_client.py`` guards the assumption).
    """

    def _firestore_api_helper(self, transport: Any, client_class: Any, client_module: Any) -> Any:
        if self._firestore_api_internal is None:
            if self._emulator_host is not None:
                token = getattr(self._credentials, "id_token", None) or "owner"
                channel = grpc.aio.insecure_channel(
                    self._emulator_host,
                    options=[
                        ("Authorization", f"Bearer {token}"),
                        *base_client._GRPC_MSG_SIZE_OPTIONS,
                        *RECONNECT_OPTIONS,
                    ],
                )
            else:
                channel = transport.create_channel(
                    self._target,
                    credentials=self._credentials,
                    options=[*base_client._DEFAULT_CHANNEL_OPTIONS, *RECONNECT_OPTIONS],
                )
            self._transport = transport(host=self._target, channel=channel)
            self._firestore_api_internal = client_class(
                transport=self._transport, client_options=self._client_options
            )
            client_module._client_info = self._client_info
        return self._firestore_api_internal


_EMULATOR_ENV = "FIRESTORE_EMULATOR_HOST"
_LOCAL_PROJECT = "samvad-local"


@contextmanager
def _emulator_env(host_port: str | None) -> Iterator[None]:
    # The client library reads FIRESTORE_EMULATOR_HOST only in its
    # constructor; setting it for the duration of the constructor lets one
    # process talk to several emulators (tests, the fault-injection proxy).
    # The constructor does no I/O and does not yield to the event loop.
    previous = os.environ.get(_EMULATOR_ENV)
    if host_port is None:
        os.environ.pop(_EMULATOR_ENV, None)
    else:
        os.environ[_EMULATOR_ENV] = host_port
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_EMULATOR_ENV, None)
        else:
            os.environ[_EMULATOR_ENV] = previous


def make_client(
    *,
    project: str | None,
    database: str = "(default)",
    emulator_host: str | None = None,
    credentials_file: str | None = None,
) -> AsyncClient:
    """An ``AsyncClient`` for the emulator at ``emulator_host`` or for real Firestore."""
    if emulator_host:
        with _emulator_env(emulator_host):
            return SamvadAsyncClient(
                project=project or _LOCAL_PROJECT,
                database=database,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            )
    with _emulator_env(None):
        if credentials_file:
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                os.path.expanduser(credentials_file),
                scopes=list(AsyncClient.SCOPE),
            )
            return SamvadAsyncClient(
                project=project or credentials.project_id,
                database=database,
                credentials=credentials,
            )
        return SamvadAsyncClient(project=project, database=database)


def sync_client_from_settings(settings: Settings) -> Client:
    """A synchronous ``Client`` like :func:`client_from_settings`'s, for what the
    async client lacks: real-time listeners (``on_snapshot``, used by
    ``samvad.coherence``). Its calls block: run them in a thread."""
    client_from_settings(settings)  # the same checks, the same message
    if settings.emulator_host:
        with _emulator_env(settings.emulator_host):
            return Client(
                project=settings.project or _LOCAL_PROJECT,
                database=settings.database,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            )
    with _emulator_env(None):
        if settings.credentials_file:
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                os.path.expanduser(settings.credentials_file),
                scopes=list(Client.SCOPE),
            )
            return Client(
                project=settings.project or credentials.project_id,
                database=settings.database,
                credentials=credentials,
            )
        return Client(project=settings.project, database=settings.database)


def client_from_settings(settings: Settings) -> AsyncClient:
    """The client ``settings`` describe; fails with the variable's name when incomplete."""
    if not settings.emulator_host and not settings.project and not settings.credentials_file:
        raise ConfigError(
            "GOOGLE_CLOUD_PROJECT (or GOOGLE_APPLICATION_CREDENTIALS, or "
            "FIRESTORE_EMULATOR_HOST) must be set to use Firestore"
        )
    return make_client(
        project=settings.project,
        database=settings.database,
        emulator_host=settings.emulator_host,
        credentials_file=settings.credentials_file,
    )


async def close_client(client: AsyncClient) -> None:
    """Close ``client`` including its gRPC channel.

    ``AsyncClient.close()`` only closes an HTTP session the async client never
    opens; the gRPC channel lives on the GAPIC transport and must be closed
    there, or it lingers until garbage collection.
    """
    client.close()  # type: ignore[no-untyped-call]
    api = getattr(client, "_firestore_api_internal", None)
    if api is None:
        return
    try:
        await api.transport.close()
    except Exception:
        logger.debug("closing the Firestore channel failed", exc_info=True)
