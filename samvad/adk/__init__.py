"""Google ADK on Samvad: a session service, registered for ``samvad://`` URIs.

Importing this package registers the ``samvad`` scheme with ADK's service
registry, so ``adk web --session_service_uri=samvad://`` and ``adk api_server``
store their sessions through :class:`SamvadSessionService`. Needs the
``samvad[adk]`` extra.
"""

from __future__ import annotations

from samvad.adk.documents import Collections
from samvad.adk.registry import register, service_from_uri
from samvad.adk.service import SamvadSessionService

__all__ = ["Collections", "SamvadSessionService", "register", "service_from_uri"]

register()
