"""The Firebase Auth emulator (npm ``firebase-tools``) and ID tokens for tests.

:class:`AuthEmulator` starts ``firebase emulators:start --only auth`` from the
repository's ``node_modules`` (``scripts/bootstrap`` installs it from
``package-lock.json``) on free ports, in its own process group, and stops the
group. Its sign-up endpoint issues real (unsigned) Firebase ID tokens, which
firebase-admin accepts while ``FIREBASE_AUTH_EMULATOR_HOST`` is set.

:func:`unsigned_token` crafts tokens of the same shape (expired, for another
project, ...) for the cases the emulator will not issue, and
:class:`GoogleKeys` stands in for Google's public-key endpoint so that the
production path (signed RS256 tokens, no emulator) can be tested offline.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from samvad.emulator import free_port

REPO = Path(__file__).resolve().parents[2]
FIREBASE_BIN = REPO / "node_modules" / ".bin" / "firebase"
#: The project of the emulator this harness starts ("demo-" projects are emulator-only).
DEFAULT_PROJECT = "demo-samvad-auth"
PASSWORD = "correct-horse-battery"


def find_firebase() -> Path | None:
    """The Firebase CLI installed by ``scripts/bootstrap``, or None."""
    return FIREBASE_BIN if os.access(FIREBASE_BIN, os.X_OK) else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_token(claims: dict[str, Any]) -> str:
    """A JWT with ``alg: none`` and no signature, like the Auth emulator's."""
    header = {"alg": "none", "typ": "JWT"}
    return ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), ""])


def id_token_claims(
    uid: str, project: str, *, issued_at: float | None = None, lifetime: float = 3600.0
) -> dict[str, Any]:
    """The claims of a Firebase ID token for ``uid`` in ``project``."""
    now = int(time.time() if issued_at is None else issued_at)
    return {
        "iss": f"https://securetoken.google.com/{project}",
        "aud": project,
        "auth_time": now,
        "user_id": uid,
        "sub": uid,
        "iat": now,
        "exp": int(now + lifetime),
        "firebase": {"identities": {}, "sign_in_provider": "password"},
    }


def token_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a JWT."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


@dataclass(frozen=True)
class AuthUser:
    """A user signed up on the emulator, with a fresh ID token."""

    uid: str
    email: str
    id_token: str


class AuthEmulator:
    """A running Auth emulator (started here, or found at ``FIREBASE_AUTH_EMULATOR_HOST``)."""

    def __init__(
        self, host_port: str, *, process: subprocess.Popen[bytes] | None = None, log: Path | None
    ) -> None:
        self.host_port = host_port
        self._process = process
        self._log = log
        self._project: str | None = None

    @classmethod
    def external(cls, host_port: str) -> AuthEmulator:
        """The emulator someone else runs (``firebase emulators:exec``)."""
        return cls(host_port, log=None)

    @classmethod
    def start(
        cls,
        firebase: Path,
        *,
        workdir: Path,
        project: str = DEFAULT_PROJECT,
        ready_timeout: float = 90.0,
    ) -> AuthEmulator:
        """Start ``firebase emulators:start --only auth`` on free ports and wait until it serves."""
        port, hub, logging_port = free_port(), free_port(), free_port()
        config = {
            "emulators": {
                "auth": {"host": "127.0.0.1", "port": port},
                "hub": {"host": "127.0.0.1", "port": hub},
                "logging": {"host": "127.0.0.1", "port": logging_port},
                "ui": {"enabled": False},
                "singleProjectMode": True,
            }
        }
        (workdir / "firebase.json").write_text(json.dumps(config))
        log = workdir / "auth-emulator.log"
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("FIREBASE_AUTH_EMULATOR_HOST", "FIRESTORE_EMULATOR_HOST")
        }
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    str(firebase),
                    "emulators:start",
                    "--only",
                    "auth",
                    "--project",
                    project,
                    "--config",
                    str(workdir / "firebase.json"),
                ],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        emulator = cls(f"127.0.0.1:{port}", process=process, log=log)
        emulator._project = project
        try:
            emulator._wait_ready(ready_timeout)
        except BaseException:
            emulator.stop()
            raise
        return emulator

    @property
    def project(self) -> str:
        """The project the emulator issues tokens for (their ``aud``)."""
        if self._project is None:
            self._project = str(token_claims(self.sign_up().id_token)["aud"])
        return self._project

    def sign_up(self, email: str | None = None) -> AuthUser:
        """Create a user with email and password; their uid and ID token."""
        email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
        body = self._post(
            "/identitytoolkit.googleapis.com/v1/accounts:signUp?key=fake-api-key",
            {"email": email, "password": PASSWORD, "returnSecureToken": True},
        )
        return AuthUser(uid=body["localId"], email=email, id_token=body["idToken"])

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://{self.host_port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the Auth emulator exited with {self._process.returncode}:\n{self.output()}"
                )
            try:
                self.sign_up()
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        raise RuntimeError(f"the Auth emulator was not ready in {timeout:g} s:\n{self.output()}")

    def output(self) -> str:
        """What the emulator printed (empty for an external one)."""
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """Stop the emulator's process group (nothing for an external one)."""
        process = self._process
        if process is None:
            return
        self._process = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Children (the Java-less node workers) leave with the group; make sure.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class GoogleKeys:
    """Google's ``securetoken`` public keys, played locally.

    Holds an RSA key pair and serves its certificate as ``{kid: PEM}`` over
    HTTP (:meth:`serve`), like the endpoint firebase-admin fetches; tokens
    signed with :meth:`sign` verify against it, tokens signed with
    ``forge=True`` (another key, same ``kid``) do not.
    """

    def __init__(self) -> None:
        self.kid = uuid.uuid4().hex
        self._key = _rsa_key()
        self._forger = _rsa_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securetoken.test")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self._key, hashes.SHA256())
        )
        self.certs = {self.kid: certificate.public_bytes(serialization.Encoding.PEM).decode()}

    def sign(self, claims: dict[str, Any], *, forge: bool = False) -> str:
        """An RS256 token with this ``kid``, signed with the real key or (``forge``) another."""
        key = self._forger if forge else self._key
        signer = crypt.RSASigner.from_string(_pem(key), key_id=self.kid)
        token: bytes = jwt.encode(signer, claims)
        return token.decode()

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve the certificates on 127.0.0.1 (a free port); yields their URL."""
        body = json.dumps(self.certs).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/certs"
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
