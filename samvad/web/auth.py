"""Who is calling, and what they may touch.

Authentication is off by default (``SAMVAD_AUTH=off``: every caller may act
for any user, as in local development). With ``SAMVAD_AUTH=firebase``:

- an end user presents a Firebase ID token — ``Authorization: Bearer <token>``
  on REST, the ``token`` field of the WebSocket ``start`` frame — verified with
  firebase-admin by :class:`FirebaseTokenVerifier`; they become a *user*
  principal and may only touch their own state, profile, history and sessions;
- a trusted server-to-server caller presents one of ``SAMVAD_API_KEYS`` —
  ``X-API-Key: <key>`` (or ``Authorization: Bearer <key>``, or the ``start``
  frame's ``token``); it becomes the *service* principal and may act for any
  user, and read the global stats.

Keys are compared in constant time and neither keys nor tokens are ever
logged. Missing or invalid credentials are :class:`~samvad.errors.Unauthorized`
(401 / close 4401); a valid user reaching for another user's data is
:class:`~samvad.errors.Forbidden` (403 / close 4403).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import firebase_admin
from cachetools import TLRUCache
from firebase_admin import auth as firebase_auth
from firebase_admin import credentials as firebase_credentials
from google.auth.credentials import AnonymousCredentials

from samvad.clock import Clock
from samvad.config import Settings
from samvad.errors import AuthUnavailable, ConfigError, Unauthorized
from samvad.principal import ANONYMOUS, SERVICE, Principal, PrincipalKind

#: Verifies a client's ID token and returns the user id it was issued for;
#: raises :class:`samvad.errors.Unauthorized` when the token is not valid.
TokenVerifier = Callable[[str], Awaitable[str]]

__all__ = [
    "ANONYMOUS",
    "SERVICE",
    "FirebaseTokenVerifier",
    "Principal",
    "PrincipalKind",
    "TokenVerifier",
    "api_key_matches",
    "authenticate",
    "authenticate_start",
]

logger = logging.getLogger(__name__)

#: Header carrying a service API key.
API_KEY_HEADER = "x-api-key"
#: Longest credential looked at; Firebase ID tokens are about 1 KiB.
MAX_TOKEN_LENGTH = 8192
#: Tolerated difference between the token issuer's clock and ours (``iat``, ``exp``).
CLOCK_SKEW_SECONDS = 10
#: Verified tokens remembered (until they expire) so a token is verified once.
TOKEN_CACHE_SIZE = 10_000

_INVALID_TOKEN = "The ID token is not valid."


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def api_key_matches(candidate: str, keys: Sequence[str]) -> bool:
    """Whether ``candidate`` is one of ``keys``, in time independent of where they differ.

    Both sides are hashed first so that not even the key lengths leak, and
    every key is compared (no early exit).
    """
    wanted = _digest(candidate)
    found = False
    for key in keys:
        found |= hmac.compare_digest(wanted, _digest(key))
    return found


async def authenticate(
    settings: Settings, verify: TokenVerifier | None, headers: Mapping[str, str]
) -> Principal:
    """The caller of a REST request, from its headers.

    ``X-API-Key`` (a service key) wins over ``Authorization: Bearer``, which
    may carry a service key or a Firebase ID token. Raises
    :class:`Unauthorized` when the credentials are missing or invalid.
    """
    if settings.auth == "off":
        return ANONYMOUS
    key = headers.get(API_KEY_HEADER)
    if key is not None:
        return _service_key(settings, key)
    authorization = headers.get("authorization")
    if authorization is None:
        raise Unauthorized(
            "Credentials are required: send 'Authorization: Bearer <Firebase ID token>'."
        )
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthorized("The Authorization header must be 'Bearer <token>'.")
    return await _bearer(settings, verify, credential)


async def authenticate_start(
    settings: Settings,
    verify: TokenVerifier | None,
    *,
    token: str | None,
    headers: Mapping[str, str],
) -> Principal:
    """The caller of a WebSocket, from its ``start`` frame's token or its
    upgrade request's ``X-API-Key`` header."""
    if settings.auth == "off":
        return ANONYMOUS
    key = headers.get(API_KEY_HEADER)
    if key is not None:
        return _service_key(settings, key)
    if token is None:
        raise Unauthorized("This server needs a token in the start frame.")
    return await _bearer(settings, verify, token)


def _service_key(settings: Settings, key: str) -> Principal:
    if settings.api_keys and api_key_matches(key, settings.api_keys):
        return SERVICE
    raise Unauthorized("The API key is not valid.")


async def _bearer(settings: Settings, verify: TokenVerifier | None, credential: str) -> Principal:
    if len(credential) > MAX_TOKEN_LENGTH:
        raise Unauthorized(_INVALID_TOKEN)
    if settings.api_keys and api_key_matches(credential, settings.api_keys):
        return SERVICE
    if verify is None:
        logger.error("authentication is on but no ID token verifier is configured")
        raise AuthUnavailable("ID tokens cannot be checked right now; try again later.")
    return Principal.user(await verify(credential))


class _NoCredential(firebase_credentials.Base):  # type: ignore[misc]
    """Verifying ID tokens needs the project id and Google's public keys, not
    credentials; this keeps firebase-admin from looking for any (no I/O)."""

    def get_credential(self) -> AnonymousCredentials:
        return AnonymousCredentials()  # type: ignore[no-untyped-call]


class FirebaseTokenVerifier:
    """Verifies Firebase ID tokens with firebase-admin, off the event loop.

    Built in the app's lifespan with :meth:`open` (a named firebase-admin app
    of its own, so several servers can live in one process) and released with
    :meth:`close`. A verified token is remembered until it expires (at most
    :data:`TOKEN_CACHE_SIZE` of them), so a client reconnecting or calling the
    API many times costs one verification per token. Revocation is not checked
    (that is a network call per token): a revoked token stays usable until it
    expires, within the hour.
    """

    def __init__(self, app: Any, client: Any, *, clock: Clock) -> None:
        # Private: use FirebaseTokenVerifier.open().
        self._app = app
        self._client = client
        self._clock = clock
        self._cache: TLRUCache[bytes, tuple[str, float]] = TLRUCache(
            maxsize=TOKEN_CACHE_SIZE,
            ttu=lambda _key, value, _now: value[1],
            timer=self._now,
        )

    @classmethod
    def open(cls, settings: Settings, *, clock: Clock) -> FirebaseTokenVerifier:
        """A verifier for ``settings.firebase_project``'s ID tokens (no network I/O)."""
        project = settings.firebase_project
        if project is None:
            raise ConfigError(
                "SAMVAD_AUTH=firebase needs SAMVAD_AUTH_PROJECT or GOOGLE_CLOUD_PROJECT"
            )
        if settings.auth_emulator_host:
            logger.warning(
                "FIREBASE_AUTH_EMULATOR_HOST is set: ID tokens are accepted WITHOUT "
                "signature checks (Auth emulator). Never set it in production."
            )
        app = firebase_admin.initialize_app(
            _NoCredential(),
            {"projectId": project},
            name=f"samvad-auth-{uuid.uuid4().hex}",
        )
        try:
            client = firebase_auth.Client(app)
        except BaseException:
            firebase_admin.delete_app(app)
            raise
        logger.info("Firebase ID tokens of project %s are accepted", project)
        return cls(app, client, clock=clock)

    def close(self) -> None:
        """Release the firebase-admin app."""
        self._cache.clear()
        firebase_admin.delete_app(self._app)

    def _now(self) -> float:
        return self._clock.now().timestamp()

    async def verify(self, token: str) -> str:
        """The uid ``token`` was issued to; :class:`Unauthorized` if it is not valid."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(_INVALID_TOKEN)
        key = _digest(token)
        cached = self._cache.get(key)
        if cached is not None:
            return cached[0]
        try:
            # Synchronous, and in production it may fetch Google's public keys.
            claims = await asyncio.to_thread(
                self._client.verify_id_token, token, clock_skew_seconds=CLOCK_SKEW_SECONDS
            )
        except firebase_auth.ExpiredIdTokenError:
            raise Unauthorized("The ID token has expired.") from None
        except firebase_auth.CertificateFetchError as exc:
            logger.warning("fetching Google's public keys failed (%s)", type(exc).__name__)
            raise AuthUnavailable("ID tokens cannot be checked right now; try again.") from None
        except (firebase_auth.InvalidIdTokenError, ValueError) as exc:
            logger.debug("ID token rejected (%s)", type(exc).__name__)
            raise Unauthorized(_INVALID_TOKEN) from None
        uid, expires = self._check_claims(claims)
        self._cache[key] = (uid, expires)
        return uid

    def _check_claims(self, claims: Mapping[str, Any]) -> tuple[str, float]:
        # firebase-admin checks exp and iat only for signed tokens; the Auth
        # emulator's are unsigned, so check them here for both.
        now = self._now()
        expires, issued, uid = claims.get("exp"), claims.get("iat"), claims.get("uid")
        if not isinstance(expires, int | float) or not isinstance(issued, int | float):
            raise Unauthorized(_INVALID_TOKEN)
        if expires + CLOCK_SKEW_SECONDS < now:
            raise Unauthorized("The ID token has expired.")
        if issued - CLOCK_SKEW_SECONDS > now:
            raise Unauthorized(_INVALID_TOKEN)
        if not isinstance(uid, str) or not uid:
            raise Unauthorized(_INVALID_TOKEN)
        return uid, float(expires) + CLOCK_SKEW_SECONDS
