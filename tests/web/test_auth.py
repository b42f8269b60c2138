"""``samvad.web.auth`` without the Auth emulator: principals, API keys, header
parsing, and ID token verification with crafted tokens.

Emulator-shaped (unsigned) tokens are verified offline while
``FIREBASE_AUTH_EMULATOR_HOST`` is set; signed RS256 tokens go through
firebase-admin's production path against :class:`GoogleKeys`, a local stand-in
for Google's public-key endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import firebase_admin
import httpx
import pytest
from firebase_admin import _token_gen

from samvad.clock import Clock, ManualClock, SystemClock
from samvad.config import Settings
from samvad.errors import AuthUnavailable, ConfigError, Forbidden, Unauthorized
from samvad.web.app import create_app
from samvad.web.auth import (
    ANONYMOUS,
    CLOCK_SKEW_SECONDS,
    SERVICE,
    FirebaseTokenVerifier,
    Principal,
    api_key_matches,
    authenticate,
    authenticate_start,
)
from tests.support.auth_emulator import GoogleKeys, id_token_claims, unsigned_token
from tests.support.server import live_server

PROJECT = "demo-samvad-unit"
KEY = "service-key-0123456789abcdef"
OTHER_KEY = "second-service-key-0123456789"
T0 = datetime(2025, 1, 10, 17, 0, 0, tzinfo=UTC)

# -- principals and keys -------------------------------------------------------------------


def test_a_user_may_act_only_for_themselves() -> None:
    alice = Principal.user("alice")
    assert alice.may_act_for("alice")
    assert not alice.may_act_for("bob")
    assert not alice.may_act_for(None)
    alice.require_user("alice")
    with pytest.raises(Forbidden):
        alice.require_user("bob")
    with pytest.raises(Forbidden):
        alice.require_service()


def test_the_service_and_anonymous_callers_may_act_for_anyone() -> None:
    for principal in (SERVICE, ANONYMOUS):
        assert principal.may_act_for("alice") and principal.may_act_for("bob")
        principal.require_service()
        assert not principal.is_user


def test_api_keys_match_exactly() -> None:
    keys = (KEY, OTHER_KEY)
    assert api_key_matches(KEY, keys)
    assert api_key_matches(OTHER_KEY, keys)
    assert not api_key_matches(KEY[:-1], keys)
    assert not api_key_matches(KEY + "x", keys)
    assert not api_key_matches(KEY.upper(), keys)
    assert not api_key_matches("", keys)
    assert not api_key_matches(KEY, ())


# -- reading credentials from headers ------------------------------------------------------


class FakeVerifier:
    """Accepts ``good-<uid>``; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, token: str) -> str:
        self.calls.append(token)
        if token.startswith("good-"):
            return token.removeprefix("good-")
        raise Unauthorized("The ID token is not valid.")


ON = Settings(auth="firebase", auth_project=PROJECT, api_keys=(KEY,))


async def test_with_auth_off_every_caller_is_anonymous() -> None:
    verify = FakeVerifier()
    assert await authenticate(Settings(), verify, {}) is ANONYMOUS
    assert await authenticate(Settings(), verify, {"authorization": "Bearer junk"}) is ANONYMOUS
    assert verify.calls == []


async def test_a_bearer_id_token_makes_a_user() -> None:
    principal = await authenticate(ON, FakeVerifier(), {"authorization": "Bearer good-alice"})
    assert principal == Principal.user("alice")
    lower = await authenticate(ON, FakeVerifier(), {"authorization": "bearer   good-bob "})
    assert lower == Principal.user("bob")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer"},
        {"authorization": "Bearer "},
        {"authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"authorization": "good-alice"},
        {"authorization": "Bearer bad-token"},
        {"authorization": "Bearer " + "x" * 9000},
        {"x-api-key": "not-the-key-0123456789"},
        {"x-api-key": ""},
        {"x-api-key": "not-the-key", "authorization": "Bearer good-alice"},
    ],
    ids=[
        "none",
        "bearer-without-token",
        "bearer-blank",
        "basic",
        "no-scheme",
        "invalid-token",
        "oversized-token",
        "wrong-key",
        "empty-key",
        "wrong-key-wins-over-token",
    ],
)
async def test_missing_or_invalid_credentials_are_unauthorized(headers: dict[str, str]) -> None:
    verify = FakeVerifier()
    with pytest.raises(Unauthorized):
        await authenticate(ON, verify, headers)
    assert all(len(token) < 9000 for token in verify.calls), "oversized tokens are not verified"


async def test_a_service_key_in_either_header_makes_the_service() -> None:
    verify = FakeVerifier()
    assert await authenticate(ON, verify, {"x-api-key": KEY}) is SERVICE
    assert await authenticate(ON, verify, {"authorization": f"Bearer {KEY}"}) is SERVICE
    assert verify.calls == [], "a service key is never sent to the token verifier"


async def test_without_configured_keys_no_key_is_accepted() -> None:
    settings = ON.replace(api_keys=())
    with pytest.raises(Unauthorized):
        await authenticate(settings, FakeVerifier(), {"x-api-key": KEY})


async def test_without_a_verifier_tokens_cannot_be_checked_503() -> None:
    with pytest.raises(AuthUnavailable):
        await authenticate(ON, None, {"authorization": "Bearer good-alice"})


async def test_the_start_frame_takes_a_token_or_the_upgrades_api_key() -> None:
    verify = FakeVerifier()
    user = await authenticate_start(ON, verify, token="good-alice", headers={})
    assert user == Principal.user("alice")
    assert await authenticate_start(ON, verify, token=KEY, headers={}) is SERVICE
    assert await authenticate_start(ON, verify, token=None, headers={"x-api-key": KEY}) is SERVICE
    with pytest.raises(Unauthorized):
        await authenticate_start(ON, verify, token=None, headers={})
    with pytest.raises(Unauthorized):
        await authenticate_start(ON, verify, token="good-alice", headers={"x-api-key": "nope"})


# -- configuration -------------------------------------------------------------------------


def test_firebase_auth_without_a_project_fails_at_start_up_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="SAMVAD_AUTH_PROJECT"):
        Settings.from_env({"SAMVAD_AUTH": "firebase"})
    settings = Settings.from_env({"SAMVAD_AUTH": "firebase", "GOOGLE_CLOUD_PROJECT": "p1"})
    assert settings.firebase_project == "p1"
    own = Settings.from_env(
        {"SAMVAD_AUTH": "firebase", "GOOGLE_CLOUD_PROJECT": "p1", "SAMVAD_AUTH_PROJECT": "p2"}
    )
    assert own.firebase_project == "p2"


def test_short_api_keys_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError, match="SAMVAD_API_KEYS entry 2") as caught:
        Settings.from_env({"SAMVAD_API_KEYS": f"{KEY},short-secret"})
    assert "short-secret" not in str(caught.value)
    settings = Settings.from_env({"SAMVAD_API_KEYS": f" {KEY} , {OTHER_KEY} "})
    assert settings.api_keys == (KEY, OTHER_KEY)


def test_settings_never_show_api_keys_in_their_repr() -> None:
    assert KEY not in repr(Settings(api_keys=(KEY,)))


# -- verifying Firebase ID tokens: emulator-shaped tokens ----------------------------------


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unsigned emulator tokens are verified offline: nothing listens there.
    monkeypatch.setenv("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9")


@pytest.fixture
def open_verifier() -> Iterator[Any]:
    opened: list[FirebaseTokenVerifier] = []

    def open_(clock: Clock, project: str = PROJECT) -> FirebaseTokenVerifier:
        settings = Settings(auth="firebase", auth_project=project)
        verifier = FirebaseTokenVerifier.open(settings, clock=clock)
        opened.append(verifier)
        return verifier

    yield open_
    for verifier in opened:
        verifier.close()


def _token(uid: str = "alice", project: str = PROJECT, **changes: Any) -> str:
    claims = id_token_claims(uid, project, issued_at=T0.timestamp())
    claims.update(changes)
    return unsigned_token({k: v for k, v in claims.items() if v is not None})


@pytest.mark.usefixtures("emulated")
async def test_an_emulator_token_gives_its_uid(open_verifier: Any) -> None:
    verifier = open_verifier(ManualClock(T0))
    assert await verifier.verify(_token("alice")) == "alice"


@pytest.mark.usefixtures("emulated")
async def test_an_expired_token_is_refused(open_verifier: Any) -> None:
    verifier = open_verifier(ManualClock(T0))
    expired = _token(iat=int(T0.timestamp()) - 7200, exp=int(T0.timestamp()) - 3600)
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(expired)


@pytest.mark.usefixtures("emulated")
async def test_a_cached_token_is_refused_once_it_expires(open_verifier: Any) -> None:
    clock = ManualClock(T0)
    verifier = open_verifier(clock)
    token = _token(exp=int(T0.timestamp()) + 60)
    assert await verifier.verify(token) == "alice"
    clock.advance(60 + CLOCK_SKEW_SECONDS - 1)
    assert await verifier.verify(token) == "alice"
    clock.advance(2)
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(token)


@pytest.mark.usefixtures("emulated")
async def test_a_token_of_another_project_is_refused(open_verifier: Any) -> None:
    verifier = open_verifier(ManualClock(T0))
    with pytest.raises(Unauthorized):
        await verifier.verify(_token(project="someone-elses-project"))
    with pytest.raises(Unauthorized):
        # Right audience, wrong issuer.
        await verifier.verify(_token(iss="https://securetoken.google.com/someone-else"))
    with pytest.raises(Unauthorized):
        # A custom token (not an ID token).
        await verifier.verify(
            _token(
                aud="https://identitytoolkit.googleapis.com/google.identity.identitytoolkit.v1.IdentityToolkit"
            )
        )


@pytest.mark.usefixtures("emulated")
async def test_a_token_issued_in_the_future_is_refused(open_verifier: Any) -> None:
    verifier = open_verifier(ManualClock(T0))
    later = int(T0.timestamp()) + CLOCK_SKEW_SECONDS + 60
    with pytest.raises(Unauthorized):
        await verifier.verify(_token(iat=later, exp=later + 3600))


@pytest.mark.usefixtures("emulated")
@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "eyJhbGciOiJub25lIn0.bm90IGpzb24.",
        unsigned_token({"just": "claims"}),
        _token(sub=None),
        _token(sub=""),
        _token(sub="x" * 129),
        _token(exp="tomorrow"),
        _token(iat=None),
        "x" * 9000,
    ],
    ids=[
        "empty",
        "garbage",
        "three-junk-segments",
        "two-segments",
        "payload-not-json",
        "no-claims",
        "no-subject",
        "empty-subject",
        "long-subject",
        "exp-not-a-number",
        "no-iat",
        "oversized",
    ],
)
async def test_malformed_tokens_are_refused(open_verifier: Any, token: str) -> None:
    verifier = open_verifier(ManualClock(T0))
    with pytest.raises(Unauthorized):
        await verifier.verify(token)


@pytest.mark.usefixtures("emulated")
async def test_a_token_is_verified_once_then_served_from_the_cache(open_verifier: Any) -> None:
    verifier = open_verifier(ManualClock(T0))
    client = verifier._client
    calls: list[str] = []
    real = client.verify_id_token

    def spy(token: str, **options: Any) -> Any:
        calls.append(token)
        return real(token, **options)

    client.verify_id_token = spy
    token = _token("alice")
    for _ in range(3):
        assert await verifier.verify(token) == "alice"
    assert calls == [token]
    with pytest.raises(Unauthorized):
        await verifier.verify(_token(project="elsewhere"))
    with pytest.raises(Unauthorized):
        await verifier.verify(_token(project="elsewhere"))
    assert len(calls) == 3, "refused tokens are not cached"


# -- verifying Firebase ID tokens: the production path (signed, no emulator) ---------------


@pytest.fixture
def google_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[GoogleKeys]:
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    keys = GoogleKeys()
    with keys.serve() as url:
        # Read when a verifier is built: open verifiers after this fixture.
        monkeypatch.setattr(_token_gen, "ID_TOKEN_CERT_URI", url)
        yield keys


async def test_a_correctly_signed_token_is_accepted(
    google_keys: GoogleKeys, open_verifier: Any
) -> None:
    verifier = open_verifier(SystemClock())
    assert await verifier.verify(google_keys.sign(id_token_claims("alice", PROJECT))) == "alice"


async def test_a_forged_signature_is_refused(google_keys: GoogleKeys, open_verifier: Any) -> None:
    verifier = open_verifier(SystemClock())
    forged = google_keys.sign(id_token_claims("alice", PROJECT), forge=True)
    with pytest.raises(Unauthorized):
        await verifier.verify(forged)


async def test_unsigned_tokens_are_refused_outside_the_emulator(
    google_keys: GoogleKeys, open_verifier: Any
) -> None:
    verifier = open_verifier(SystemClock())
    with pytest.raises(Unauthorized):
        await verifier.verify(unsigned_token(id_token_claims("alice", PROJECT)))


async def test_a_signed_but_expired_token_is_refused(
    google_keys: GoogleKeys, open_verifier: Any
) -> None:
    verifier = open_verifier(SystemClock())
    old = id_token_claims("alice", PROJECT, issued_at=datetime.now(UTC).timestamp() - 7200)
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(google_keys.sign(old))


async def test_unreachable_public_keys_are_a_503_not_a_401(
    monkeypatch: pytest.MonkeyPatch, open_verifier: Any
) -> None:
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(_token_gen, "ID_TOKEN_CERT_URI", "http://127.0.0.1:9/certs")
    verifier = open_verifier(SystemClock())
    with pytest.raises(AuthUnavailable):
        await verifier.verify(GoogleKeys().sign(id_token_claims("alice", PROJECT)))


# -- the app -------------------------------------------------------------------------------


@pytest.mark.usefixtures("emulated")
async def test_the_lifespan_owns_its_firebase_app_and_deletes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = set(firebase_admin._apps)
    settings = Settings(store="memory", auth="firebase", auth_project=PROJECT, api_keys=(KEY,))
    caplog.set_level(logging.DEBUG)
    token = unsigned_token(id_token_claims("alice", PROJECT))
    async with (
        live_server(create_app(settings)) as server,
        live_server(create_app(settings)) as second,
        httpx.AsyncClient() as http,
    ):
        assert len(set(firebase_admin._apps) - before) == 2, "one named app per server"
        for url in (server.url, second.url):
            own = await http.post(
                f"{url}/api/session/alice/state",
                json={"language": "en"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert own.status_code == 200
        refused = await http.get(
            f"{server.url}/api/session/alice/state", headers={"Authorization": "Bearer nope"}
        )
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json() == {
            "success": False,
            "error": "The ID token is not valid.",
            "code": "unauthorized",
        }
        keyed = await http.get(f"{server.url}/api/session/stats", headers={"X-API-Key": KEY})
        assert keyed.status_code == 200
    assert set(firebase_admin._apps) == before
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert token not in logged and KEY not in logged, "credentials are never logged"
