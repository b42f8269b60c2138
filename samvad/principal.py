"""Who is acting: the caller of a use case, as the core sees it.

Credentials are checked at the door (``samvad.web.auth`` verifies ID tokens and
API keys); what comes through is a :class:`Principal`, and the use-case layer
(``samvad.service``) decides with it what the caller may touch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from samvad.errors import Forbidden

__all__ = ["ANONYMOUS", "SERVICE", "Principal", "PrincipalKind"]


class PrincipalKind(enum.Enum):
    """The kinds of caller."""

    USER = "user"
    SERVICE = "service"
    #: Authentication is off: anyone may act for any user.
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a user (with their ``uid``) or the service."""

    kind: PrincipalKind
    uid: str | None = None

    @classmethod
    def user(cls, uid: str) -> Principal:
        """The end user ``uid`` (a verified Firebase ID token)."""
        return cls(PrincipalKind.USER, uid)

    @property
    def is_user(self) -> bool:
        """True for an end user, who may only touch their own data."""
        return self.kind is PrincipalKind.USER

    def may_act_for(self, user_id: str | None) -> bool:
        """Whether this caller may read or change ``user_id``'s data."""
        return self.kind is not PrincipalKind.USER or self.uid == user_id

    def require_user(self, user_id: str | None) -> None:
        """Raise :class:`Forbidden` unless this caller may act for ``user_id``."""
        if not self.may_act_for(user_id):
            raise Forbidden("These credentials do not give access to another user's data.")

    def require_service(self) -> None:
        """Raise :class:`Forbidden` for end users (service-only endpoints)."""
        if self.kind is PrincipalKind.USER:
            raise Forbidden("Only a service API key may use this endpoint.")


#: The trusted server-to-server caller (a valid API key).
SERVICE = Principal(PrincipalKind.SERVICE)
#: Every caller while authentication is off.
ANONYMOUS = Principal(PrincipalKind.ANONYMOUS)
