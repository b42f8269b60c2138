"""The ``samvad://`` scheme in ADK's service registry.

``samvad://`` builds a :class:`~samvad.adk.service.SamvadSessionService` from
the environment of ``samvad serve`` (``SAMVAD_*``, ``GOOGLE_CLOUD_PROJECT``,
``FIRESTORE_EMULATOR_HOST``, ...). The URI may name the Google Cloud project as
its host and take ``prefix`` (collection prefix) and ``store``
(``auto|firestore|memory``) as query parameters::

    samvad://
    samvad://my-project?prefix=support_bot_
    samvad://?store=memory
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from samvad.config import Settings
from samvad.errors import ConfigError

__all__ = [
    "SCHEME",
    "register",
    "service_from_uri",
]

SCHEME = "samvad"
_STORES = ("auto", "firestore", "memory")


def service_from_uri(uri: str, **kwargs: Any) -> Any:
    """The session service a ``samvad://`` URI describes (ADK passes ``agents_dir``
    and database options in ``kwargs``; they do not apply and are ignored)."""
    from samvad.adk.service import SamvadSessionService

    parsed = urlparse(uri)
    if parsed.scheme != SCHEME:
        raise ConfigError(f"A Samvad session service URI starts with {SCHEME}://; got {uri!r}")
    query = {name: values[-1] for name, values in parse_qs(parsed.query).items()}
    unknown = sorted(set(query) - {"prefix", "store"})
    if unknown:
        raise ConfigError(f"Unknown parameters in {uri!r}: {', '.join(unknown)}")
    settings = Settings.from_env()
    changes: dict[str, object] = {}
    if parsed.hostname:
        changes["project"] = parsed.hostname
    store = query.get("store")
    if store is not None:
        if store not in _STORES:
            raise ConfigError(f"store= must be one of {', '.join(_STORES)}; got {store!r}")
        changes["store"] = store
    if changes:
        settings = settings.replace(**changes)
    return SamvadSessionService(settings=settings, prefix=query.get("prefix", "adk_"))


def register() -> None:
    """Register ``samvad://`` with ADK's service registry (idempotent)."""
    from google.adk.cli.service_registry import get_service_registry

    get_service_registry().register_session_service(SCHEME, service_from_uri)
