from __future__ import annotations

import pytest

from samvad.config import Settings, auth_emulator_host
from samvad.errors import ConfigError
from samvad.web.app import create_app


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.cache_ttl == 1800.0
    assert settings.history_cap == 100
    assert settings.flush_interval == 1.5
    assert settings.cache_max_bytes == 256 * 1024 * 1024
    assert settings.max_pending_bytes == 256 * 1024 * 1024
    assert settings.store == "auto"
    assert settings.port == 8080
    assert not settings.firestore_configured


def test_values_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SAMVAD_CACHE_TTL_SECONDS": "60",
            "SAMVAD_HISTORY_CAP": "20",
            "SAMVAD_STORE": "Memory",
            "SAMVAD_FLUSH_INTERVAL_SECONDS": "0.5",
            "SAMVAD_CACHE_MAX_BYTES": "1048576",
            "SAMVAD_MAX_PENDING_BYTES": "2097152",
            "SAMVAD_PERSIST_INTERRUPTIONS": "yes",
            "SAMVAD_CORS_ORIGINS": "https://a.example, https://b.example",
            "GOOGLE_CLOUD_PROJECT": "my-project",
            "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8085",
            "PORT": "9000",
        }
    )
    assert settings.cache_ttl == 60.0
    assert settings.history_cap == 20
    assert settings.store == "memory"
    assert settings.flush_interval == 0.5
    assert (settings.cache_max_bytes, settings.max_pending_bytes) == (1048576, 2097152)
    assert settings.persist_interruptions is True
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.project == "my-project"
    assert settings.emulator_host == "127.0.0.1:8085"
    assert settings.port == 9000
    assert settings.firestore_configured


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("SAMVAD_CACHE_TTL_SECONDS", "soon", "must be a number"),
        ("SAMVAD_CACHE_TTL_SECONDS", "nan", "finite"),
        ("SAMVAD_HISTORY_CAP", "0", "at least 1"),
        ("SAMVAD_HISTORY_CAP", "ten", "must be an integer"),
        ("SAMVAD_HISTORY_MAX_BYTES", "2000000", "at most"),
        ("SAMVAD_STORE", "postgres", "must be one of"),
        ("SAMVAD_PERSIST_INTERRUPTIONS", "maybe", "true or false"),
        ("SAMVAD_PORT", "70000", "at most"),
        ("SAMVAD_FIRESTORE_DEADLINE_SECONDS", "0", "at least"),
        ("SAMVAD_IDEMPOTENCY_TTL_SECONDS", "0", "at least"),
        ("SAMVAD_IDEMPOTENCY_CACHE_BYTES", "-1", "at least"),
        ("SAMVAD_CACHE_MAX_BYTES", "1000", "at least"),
        ("SAMVAD_MAX_PENDING_BYTES", "lots", "must be an integer"),
        ("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json", "not a readable file"),
    ],
)
def test_a_bad_value_fails_with_the_variable_name(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)
    assert fragment in str(info.value)


def test_idempotency_keys_are_kept_a_day_by_default_and_configurable() -> None:
    assert Settings.from_env({}).idempotency_ttl == 86_400.0
    settings = Settings.from_env(
        {"SAMVAD_IDEMPOTENCY_TTL_SECONDS": "172800", "SAMVAD_IDEMPOTENCY_CACHE_BYTES": "0"}
    )
    assert (settings.idempotency_ttl, settings.idempotency_cache_bytes) == (172_800.0, 0)


def test_blank_values_mean_the_default() -> None:
    assert Settings.from_env({"SAMVAD_HISTORY_CAP": "  "}).history_cap == 100


# -- the Auth emulator switch: with emulators only ---------------------------------------

EMULATOR_SWITCH = {"FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099"}


@pytest.mark.parametrize(
    "environ",
    [
        {"SAMVAD_STORE": "firestore", "GOOGLE_CLOUD_PROJECT": "prod-project"},
        {"GOOGLE_CLOUD_PROJECT": "prod-project"},  # auto: Firestore is configured
        {"SAMVAD_STORE": "firestore"},  # real Firestore through the ambient credentials
    ],
    ids=["firestore", "auto-with-project", "firestore-ambient"],
)
def test_the_auth_emulator_switch_is_refused_beside_cloud_firestore(
    environ: dict[str, str],
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**environ, **EMULATOR_SWITCH})
    assert "FIREBASE_AUTH_EMULATOR_HOST" in str(info.value)
    assert "not verified" in str(info.value)


@pytest.mark.parametrize(
    "environ",
    [
        {
            "SAMVAD_STORE": "firestore",
            "GOOGLE_CLOUD_PROJECT": "demo-project",
            "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8085",
        },
        {"SAMVAD_STORE": "memory", "GOOGLE_CLOUD_PROJECT": "demo-project"},
        {},  # auto with nothing configured: the local emulator, or memory
    ],
    ids=["firestore-emulator", "memory", "auto-unconfigured"],
)
def test_the_auth_emulator_switch_is_allowed_with_emulators_and_memory(
    environ: dict[str, str],
) -> None:
    settings = Settings.from_env({**environ, **EMULATOR_SWITCH})
    assert auth_emulator_host(settings, environ={}) == "127.0.0.1:9099"


def test_the_switch_is_seen_in_the_process_environment_whatever_the_settings_say() -> None:
    # firebase-admin reads the variable itself: settings built in code do not hide it.
    settings = Settings(store="firestore", project="prod-project")
    assert settings.auth_emulator_host is None
    with pytest.raises(ConfigError, match="FIREBASE_AUTH_EMULATOR_HOST"):
        auth_emulator_host(settings, environ=EMULATOR_SWITCH)
    assert auth_emulator_host(settings, environ={}) is None


def test_the_command_line_store_is_checked_too() -> None:
    settings = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "p", "SAMVAD_STORE": "memory"})
    assert auth_emulator_host(settings, environ=EMULATOR_SWITCH) is not None
    with pytest.raises(ConfigError, match="FIREBASE_AUTH_EMULATOR_HOST"):
        auth_emulator_host(settings.replace(store="firestore"), environ=EMULATOR_SWITCH)


async def test_the_app_refuses_to_start_with_the_switch_beside_cloud_firestore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9099")
    app = create_app(Settings(store="firestore", project="prod-project"))
    with pytest.raises(ConfigError, match="FIREBASE_AUTH_EMULATOR_HOST"):
        async with app.router.lifespan_context(app):
            pass
