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

from google.auth.credentials import AnonymousCredentials
from google.cloud.firestore import AsyncClient

from samvad.config import Settings
from samvad.errors import ConfigError

logger = logging.getLogger(__name__)

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
            return AsyncClient(
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
            return AsyncClient(
                project=project or credentials.project_id,
                database=database,
                credentials=credentials,
            )
        return AsyncClient(project=project, database=database)


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
