"""Configuration, read from the environment in one place.

Every setting has a ``SAMVAD_*`` variable (or the Google standard name) and a
default suitable for local development. A bad value fails at start-up with an
error that names the variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, cast

from samvad.errors import ConfigError
from samvad.validation import Bounds

__all__ = [
    "AUTH_EMULATOR_VARIABLE",
    "MAX_OBJECT_FIELDS",
    "MAX_OBJECT_KEYS",
    "MIN_API_KEY_LENGTH",
    "Allocator",
    "AuthMode",
    "DemoMode",
    "LogFormat",
    "Settings",
    "StoreMode",
    "auth_emulator_host",
]

StoreMode = Literal["auto", "firestore", "memory"]
LogFormat = Literal["text", "json"]
#: ``samvad serve``'s memory allocator (samvad.allocator).
Allocator = Literal["hugepages", "python"]
AuthMode = Literal["off", "firebase"]
DemoMode = Literal["auto", "on", "off"]

_T = TypeVar("_T")

#: Highest accepted ``SAMVAD_MAX_OBJECT_KEYS`` / ``SAMVAD_MAX_OBJECT_FIELDS``: past
#: these a single merge costs the event loop a noticeable time.
MAX_OBJECT_KEYS = 1000
MAX_OBJECT_FIELDS = 10_000

#: Shortest accepted service API key (``SAMVAD_API_KEYS``).
MIN_API_KEY_LENGTH = 16

#: The variable that makes firebase-admin accept unsigned ID tokens (the Auth emulator's).
AUTH_EMULATOR_VARIABLE = "FIREBASE_AUTH_EMULATOR_HOST"


@dataclass(frozen=True, slots=True)
class Settings:
    """All of Samvad's settings. Build with :meth:`from_env`; override with :meth:`replace`."""

    # Server
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    #: Read by ``samvad serve`` only, as it starts (samvad.allocator).
    allocator: Allocator = "python"

    # Persistence backend
    store: StoreMode = "auto"
    project: str | None = None
    database: str = "(default)"
    emulator_host: str | None = None
    credentials_file: str | None = None
    data_dir: Path = Path(".samvad")

    # Write-ahead journal (``$SAMVAD_DATA_DIR/journal``; see docs/persistence.md).
    # On by default for a process (``from_env``); settings built in code (tests,
    # embedding) ask for it, so that they never share a journal by accident.
    journal: bool = False
    journal_max_bytes: int = 256 * 1024 * 1024
    #: Seconds between exports of the embedded emulator's data (0: only at a clean stop).
    emulator_export_interval: float = 60.0
    #: Where the embedded emulator (``samvad serve`` with nothing configured)
    #: exports its data; set by the command, never from the environment. With
    #: it, a write counts as durable only once an export has it.
    emulator_export_dir: Path | None = None

    # Cache
    cache_ttl: float = 1800.0
    cache_max_entries: int = 50_000
    #: Estimated bytes the view caches may hold in all: half for profiles, a
    #: quarter each for states and sessions (samvad.cache).
    cache_max_bytes: int = 256 * 1024 * 1024

    # History (bytes bound at most 640 KiB: with 256 KiB of preferences a
    # profile document stays below Firestore's 1 MiB)
    history_cap: int = 100
    history_max_bytes: int = 512 * 1024

    # Write-behind
    #: 1.5 s keeps a user talking at one message a second (and its replies)
    #: under half a Firestore write per message (docs/benchmarks.md, section 4).
    flush_interval: float = 1.5
    flush_linger: float = 0.05
    touch_interval: float = 30.0
    flush_concurrency: int = 32
    max_pending_documents: int = 100_000
    #: Estimated bytes the write backlog may hold (samvad.writebehind).
    max_pending_bytes: int = 256 * 1024 * 1024
    firestore_deadline: float = 5.0
    probe_interval: float = 1.0
    probe_max_interval: float = 10.0
    shutdown_flush_deadline: float = 10.0
    retry_max_backoff: float = 30.0

    # REST
    max_body_bytes: int = 64 * 1024
    #: Bound on a JSON object the REST API merges into over time (user state,
    #: profile preferences, session metadata), so that repeated merges can
    #: never grow a document toward Firestore's 1 MiB limit.
    max_merged_object_bytes: int = 256 * 1024
    #: Top-level keys and fields in all (nested ones included) of such a merged
    #: object: the Firestore client's merge is quadratic in the field count, so
    #: these keep one write from stalling the event loop. Far above real use.
    max_object_keys: int = 200
    max_object_fields: int = 2000
    session_idle_timeout: float = 1800.0
    session_retention_days: int = 30
    #: How long an Idempotency-Key answers its first response (``samvad.idempotency``).
    idempotency_ttl: float = 86_400.0
    #: Bytes of first responses kept in memory (a miss reads Firestore).
    idempotency_cache_bytes: int = 16 * 1024 * 1024
    persist_interruptions: bool = False

    # WebSocket
    ws_max_frame_bytes: int = 64 * 1024
    ws_rate_per_second: float = 20.0
    ws_rate_burst: int = 40
    ws_idle_timeout: float = 120.0
    ws_start_timeout: float = 10.0
    ws_send_queue: int = 256
    ws_resume_window: int = 200
    ws_rate_strikes: int = 5
    #: Offer permessage-deflate (RFC 7692) to clients that ask, as browsers
    #: do. Off by default: a compressed connection costs about 41 KiB more
    #: while idle and 1.5x the CPU per message, and its frames bypass the
    #: protocol's fast paths (docs/benchmarks.md, section 27).
    ws_compression: bool = False
    ws_responder: str = "builtin"
    ws_reply_chunk_delay: float = 0.05

    # Security and operations
    auth: AuthMode = "off"
    #: Firebase project whose ID tokens are accepted (default: ``project``).
    auth_project: str | None = None
    #: ``FIREBASE_AUTH_EMULATOR_HOST``: tokens are then NOT signature-checked (tests only).
    auth_emulator_host: str | None = None
    #: Service API keys; kept out of ``repr`` so that logging settings never shows them.
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()
    #: Browser origins allowed to open ``/ws`` besides ``cors_origins`` and the server's own.
    ws_origins: tuple[str, ...] = ()
    refresh_rate_per_minute: int = 5
    delete_rate_per_minute: int = 30
    #: One log line per HTTP request (method, route, status, duration, ids).
    access_log: bool = False

    # The demo page (``/demo``)
    #: ``auto``: served in local mode only (auth off, or no Firestore); ``on``/``off`` force it.
    demo: DemoMode = "auto"
    #: The Firebase Web API key the demo page signs in with (a public identifier, not a secret).
    demo_firebase_api_key: str | None = None

    # Several instances (samvad.coherence, docs/deploy.md)
    #: Announce writes to, and hear them from, other instances on one Firestore.
    coherence: bool = True
    #: Seconds between the change-feed documents of a busy instance.
    coherence_interval: float = 0.05
    #: Worker processes of ``samvad serve`` sharing its port (each a full instance).
    workers: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default: ``os.environ``)."""
        env = _Env(os.environ if environ is None else environ)
        d = cls()
        return cls(
            host=env.text("SAMVAD_HOST", d.host),
            port=env.integer(
                "SAMVAD_PORT", env.integer("PORT", d.port, lo=0, hi=65535), lo=0, hi=65535
            ),
            log_level=env.choice(
                "SAMVAD_LOG_LEVEL", d.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True
            ),
            log_format=cast(
                LogFormat, env.choice("SAMVAD_LOG_FORMAT", d.log_format, ("text", "json"))
            ),
            allocator=cast(
                Allocator, env.choice("SAMVAD_ALLOCATOR", d.allocator, ("hugepages", "python"))
            ),
            store=cast(
                StoreMode, env.choice("SAMVAD_STORE", d.store, ("auto", "firestore", "memory"))
            ),
            project=env.optional("GOOGLE_CLOUD_PROJECT") or env.optional("GCLOUD_PROJECT"),
            database=env.text("SAMVAD_FIRESTORE_DATABASE", d.database),
            emulator_host=env.optional("FIRESTORE_EMULATOR_HOST"),
            credentials_file=env.file("GOOGLE_APPLICATION_CREDENTIALS"),
            data_dir=Path(env.text("SAMVAD_DATA_DIR", str(d.data_dir))),
            journal=env.flag("SAMVAD_JOURNAL", True),
            journal_max_bytes=env.integer(
                "SAMVAD_JOURNAL_MAX_BYTES", d.journal_max_bytes, lo=1024 * 1024
            ),
            emulator_export_interval=env.number(
                "SAMVAD_EMULATOR_EXPORT_INTERVAL_SECONDS", d.emulator_export_interval, lo=0.0
            ),
            cache_ttl=env.number("SAMVAD_CACHE_TTL_SECONDS", d.cache_ttl, lo=1.0),
            cache_max_entries=env.integer("SAMVAD_CACHE_MAX_ENTRIES", d.cache_max_entries, lo=1),
            cache_max_bytes=env.integer("SAMVAD_CACHE_MAX_BYTES", d.cache_max_bytes, lo=64 * 1024),
            history_cap=env.integer("SAMVAD_HISTORY_CAP", d.history_cap, lo=1, hi=10_000),
            history_max_bytes=env.integer(
                "SAMVAD_HISTORY_MAX_BYTES", d.history_max_bytes, lo=4096, hi=640 * 1024
            ),
            flush_interval=env.number("SAMVAD_FLUSH_INTERVAL_SECONDS", d.flush_interval, lo=0.0),
            flush_linger=env.number("SAMVAD_FLUSH_LINGER_SECONDS", d.flush_linger, lo=0.0),
            touch_interval=env.number("SAMVAD_TOUCH_INTERVAL_SECONDS", d.touch_interval, lo=0.0),
            flush_concurrency=env.integer(
                "SAMVAD_FLUSH_CONCURRENCY", d.flush_concurrency, lo=1, hi=1000
            ),
            max_pending_bytes=env.integer(
                "SAMVAD_MAX_PENDING_BYTES", d.max_pending_bytes, lo=64 * 1024
            ),
            max_pending_documents=env.integer(
                "SAMVAD_MAX_PENDING_DOCUMENTS", d.max_pending_documents, lo=1
            ),
            firestore_deadline=env.number(
                "SAMVAD_FIRESTORE_DEADLINE_SECONDS", d.firestore_deadline, lo=0.05, hi=600.0
            ),
            probe_interval=env.number("SAMVAD_PROBE_INTERVAL_SECONDS", d.probe_interval, lo=0.01),
            probe_max_interval=env.number(
                "SAMVAD_PROBE_MAX_INTERVAL_SECONDS", d.probe_max_interval, lo=0.01
            ),
            shutdown_flush_deadline=env.number(
                "SAMVAD_SHUTDOWN_FLUSH_SECONDS", d.shutdown_flush_deadline, lo=0.0
            ),
            retry_max_backoff=env.number(
                "SAMVAD_RETRY_MAX_BACKOFF_SECONDS", d.retry_max_backoff, lo=0.01
            ),
            max_body_bytes=env.integer("SAMVAD_MAX_BODY_BYTES", d.max_body_bytes, lo=1024),
            max_merged_object_bytes=env.integer(
                "SAMVAD_MAX_MERGED_OBJECT_BYTES", d.max_merged_object_bytes, lo=1024, hi=256 * 1024
            ),
            max_object_keys=env.integer(
                "SAMVAD_MAX_OBJECT_KEYS", d.max_object_keys, lo=1, hi=MAX_OBJECT_KEYS
            ),
            max_object_fields=env.integer(
                "SAMVAD_MAX_OBJECT_FIELDS", d.max_object_fields, lo=1, hi=MAX_OBJECT_FIELDS
            ),
            session_idle_timeout=env.number(
                "SAMVAD_SESSION_IDLE_TIMEOUT_SECONDS", d.session_idle_timeout, lo=1.0
            ),
            session_retention_days=env.integer(
                "SAMVAD_SESSION_RETENTION_DAYS", d.session_retention_days, lo=1
            ),
            idempotency_ttl=env.number("SAMVAD_IDEMPOTENCY_TTL_SECONDS", d.idempotency_ttl, lo=1.0),
            idempotency_cache_bytes=env.integer(
                "SAMVAD_IDEMPOTENCY_CACHE_BYTES", d.idempotency_cache_bytes, lo=0
            ),
            persist_interruptions=env.flag("SAMVAD_PERSIST_INTERRUPTIONS", d.persist_interruptions),
            ws_max_frame_bytes=env.integer(
                "SAMVAD_WS_MAX_FRAME_BYTES", d.ws_max_frame_bytes, lo=1024
            ),
            ws_rate_per_second=env.number(
                "SAMVAD_WS_RATE_PER_SECOND", d.ws_rate_per_second, lo=0.01
            ),
            ws_rate_burst=env.integer("SAMVAD_WS_RATE_BURST", d.ws_rate_burst, lo=1),
            ws_idle_timeout=env.number("SAMVAD_WS_IDLE_TIMEOUT_SECONDS", d.ws_idle_timeout, lo=1.0),
            ws_start_timeout=env.number(
                "SAMVAD_WS_START_TIMEOUT_SECONDS", d.ws_start_timeout, lo=0.1
            ),
            ws_send_queue=env.integer("SAMVAD_WS_SEND_QUEUE", d.ws_send_queue, lo=1),
            ws_resume_window=env.integer("SAMVAD_WS_RESUME_WINDOW", d.ws_resume_window, lo=0),
            ws_rate_strikes=env.integer("SAMVAD_WS_RATE_STRIKES", d.ws_rate_strikes, lo=0),
            ws_compression=env.flag("SAMVAD_WS_COMPRESSION", d.ws_compression),
            ws_responder=env.text("SAMVAD_RESPONDER", d.ws_responder),
            ws_reply_chunk_delay=env.number(
                "SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS", d.ws_reply_chunk_delay, lo=0.0, hi=10.0
            ),
            auth=cast(AuthMode, env.choice("SAMVAD_AUTH", d.auth, ("off", "firebase"))),
            auth_project=env.optional("SAMVAD_AUTH_PROJECT"),
            auth_emulator_host=env.optional("FIREBASE_AUTH_EMULATOR_HOST"),
            api_keys=env.secrets("SAMVAD_API_KEYS", min_length=MIN_API_KEY_LENGTH),
            cors_origins=env.items("SAMVAD_CORS_ORIGINS"),
            ws_origins=env.items("SAMVAD_WS_ORIGINS"),
            refresh_rate_per_minute=env.integer(
                "SAMVAD_REFRESH_RATE_PER_MINUTE", d.refresh_rate_per_minute, lo=1
            ),
            delete_rate_per_minute=env.integer(
                "SAMVAD_DELETE_RATE_PER_MINUTE", d.delete_rate_per_minute, lo=1
            ),
            access_log=env.flag("SAMVAD_ACCESS_LOG", d.access_log),
            demo=cast(DemoMode, env.choice("SAMVAD_DEMO", d.demo, ("auto", "on", "off"))),
            demo_firebase_api_key=env.optional("SAMVAD_DEMO_FIREBASE_API_KEY"),
            coherence=env.flag("SAMVAD_COHERENCE", d.coherence),
            coherence_interval=env.number(
                "SAMVAD_COHERENCE_INTERVAL_SECONDS", d.coherence_interval, lo=0.005, hi=5.0
            ),
            workers=env.integer("SAMVAD_WORKERS", d.workers, lo=1, hi=64),
        )._checked()

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (for tests and the CLI)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def firebase_project(self) -> str | None:
        """The Firebase project whose ID tokens are accepted."""
        return self.auth_project or self.project

    def _checked(self) -> Settings:
        if self.auth == "firebase" and self.firebase_project is None:
            raise ConfigError(
                "SAMVAD_AUTH=firebase needs the Firebase project whose ID tokens to accept: "
                "set SAMVAD_AUTH_PROJECT (or GOOGLE_CLOUD_PROJECT)"
            )
        auth_emulator_host(self, environ={})
        return self

    @property
    def demo_enabled(self) -> bool:
        """Whether ``/demo`` is served.

        ``auto`` means local mode: auth off, or no production Firestore (the
        memory store, or an emulator — the embedded one included).
        """
        if self.demo != "auto":
            return self.demo == "on"
        uses_firestore = self.store == "firestore" or (
            self.store == "auto" and self.firestore_configured
        )
        return self.auth == "off" or not uses_firestore or self.emulator_host is not None

    @property
    def merge_bounds(self) -> Bounds:
        """The bounds on an object the API merges into (state, preferences, metadata)."""
        return Bounds(
            max_keys=self.max_object_keys,
            max_fields=self.max_object_fields,
            max_bytes=self.max_merged_object_bytes,
        )

    @property
    def journal_dir(self) -> Path:
        """Where the write-ahead journal lives."""
        return self.data_dir / "journal"

    @property
    def firestore_configured(self) -> bool:
        """True when the environment points at a Firestore (emulator, project or key file)."""
        return bool(self.emulator_host or self.project or self.credentials_file)

    @property
    def real_firestore(self) -> bool:
        """True when the store is Cloud Firestore itself, not an emulator.

        ``auto`` with nothing configured is not: ``samvad serve`` then starts
        the local emulator (or runs memory-only), and sets ``emulator_host``.
        """
        if self.emulator_host:
            return False
        return self.store == "firestore" or (self.store == "auto" and self.firestore_configured)


def auth_emulator_host(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """The Auth emulator ID tokens are taken from, or None; refuses it beside real Firestore.

    With ``FIREBASE_AUTH_EMULATOR_HOST`` set, firebase-admin accepts unsigned
    tokens: anyone can claim to be anyone. That is how tests use the Auth
    emulator, and it must never reach a deployment, so a configuration that
    pairs it with Cloud Firestore (real users' data) raises
    :class:`ConfigError` naming the variable. firebase-admin reads the
    variable from the process environment itself, whatever ``settings``
    say, so ``environ`` (default ``os.environ``) is looked at too.
    """
    env = _Env(os.environ if environ is None else environ)
    host = settings.auth_emulator_host or env.optional(AUTH_EMULATOR_VARIABLE)
    if host is not None and settings.real_firestore:
        raise ConfigError(
            f"{AUTH_EMULATOR_VARIABLE} is set but the store is Cloud Firestore, not an "
            "emulator: with it ID tokens are not verified and anyone could act as any user. "
            f"Unset {AUTH_EMULATOR_VARIABLE} (it is for tests with the emulators only), or "
            "set FIRESTORE_EMULATOR_HOST to use the Firestore emulator"
        )
    return host


class _Env:
    """Typed reads of environment variables that fail with the variable's name."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def optional(self, name: str) -> str | None:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return None
        return raw.strip()

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def _parse(self, name: str, default: _T, parse: Callable[[str], _T], what: str) -> _T:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {what}; got {raw!r}") from None

    def integer(
        self, name: str, default: int, *, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self._parse(name, default, int, "an integer")
        _check_range(name, value, lo, hi)
        return value

    def number(
        self, name: str, default: float, *, lo: float | None = None, hi: float | None = None
    ) -> float:
        value = self._parse(name, default, float, "a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number; got {value!r}")
        _check_range(name, value, lo, hi)
        return value

    def flag(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)

        return self._parse(name, default, parse, "true or false")

    def choice(
        self, name: str, default: str, allowed: tuple[str, ...], *, upper: bool = False
    ) -> str:
        raw = self.optional(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {raw!r}")
        return value

    def items(self, name: str) -> tuple[str, ...]:
        raw = self.optional(name)
        if raw is None:
            return ()
        return tuple(item.strip() for item in raw.split(",") if item.strip())

    def secrets(self, name: str, *, min_length: int) -> tuple[str, ...]:
        values = self.items(name)
        for index, value in enumerate(values, start=1):
            # Never echo a secret, not even a short one: name its position.
            if len(value) < min_length:
                raise ConfigError(
                    f"{name} entry {index} is too short: API keys must have at least "
                    f"{min_length} characters"
                )
        return values

    def file(self, name: str) -> str | None:
        raw = self.optional(name)
        if raw is not None and not Path(raw).expanduser().is_file():
            raise ConfigError(f"{name} points at {raw!r}, which is not a readable file")
        return raw


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise ConfigError(f"{name} must be at least {lo}; got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be at most {hi}; got {value}")
