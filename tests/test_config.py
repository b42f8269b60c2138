from __future__ import annotations

import pytest

from samvad.config import Settings
from samvad.errors import ConfigError


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.cache_ttl == 1800.0
    assert settings.history_cap == 100
    assert settings.flush_interval == 1.0
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
        ("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json", "not a readable file"),
    ],
)
def test_a_bad_value_fails_with_the_variable_name(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)
    assert fragment in str(info.value)


def test_blank_values_mean_the_default() -> None:
    assert Settings.from_env({"SAMVAD_HISTORY_CAP": "  "}).history_cap == 100
