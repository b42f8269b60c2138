"""Building clients: the reconnect-friendly channel talks to the real emulator."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.cloud.firestore_v1 import base_client

from samvad.config import Settings
from samvad.errors import ConfigError
from samvad.firestore_client import (
    SamvadAsyncClient,
    client_from_settings,
    close_client,
    make_client,
)


def test_the_library_still_builds_its_channel_where_we_override_it() -> None:
    # SamvadAsyncClient replaces BaseClient._firestore_api_helper; if the
    # library renames it or its module constants, fail here, not in production.
    helper = base_client.BaseClient._firestore_api_helper
    assert list(inspect.signature(helper).parameters) == [
        "self",
        "transport",
        "client_class",
        "client_module",
    ]
    assert ("grpc.keepalive_time_ms", 30000) in base_client._DEFAULT_CHANNEL_OPTIONS


def test_settings_without_any_firestore_fail_naming_the_variables() -> None:
    with pytest.raises(ConfigError, match="GOOGLE_CLOUD_PROJECT"):
        client_from_settings(Settings())


def _service_account_key(path: Path) -> Path:
    """A syntactically valid service-account key for a project that does not exist."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "key-project",
                "private_key_id": "0" * 40,
                "private_key": pem,
                "client_email": "samvad@key-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return path


async def test_a_key_file_builds_a_production_client_with_the_reconnect_channel(
    tmp_path: Path,
) -> None:
    key = _service_account_key(tmp_path / "key.json")
    client = make_client(project=None, emulator_host=None, credentials_file=str(key))
    try:
        assert isinstance(client, SamvadAsyncClient)
        assert client.project == "key-project"
        assert client._emulator_host is None
        # Building the API object builds the channel (no network I/O yet).
        assert client._firestore_api is not None
    finally:
        await close_client(client)


@pytest.mark.firestore
async def test_an_emulator_client_reads_and_writes(
    firestore_emulator: str, firestore_project: str
) -> None:
    client = make_client(project=firestore_project, emulator_host=firestore_emulator)
    assert isinstance(client, SamvadAsyncClient)
    try:
        ref = client.collection("c").document("d")
        await ref.set({"x": 1})
        assert (await ref.get()).to_dict() == {"x": 1}
    finally:
        await close_client(client)
