"""The ``samvad`` command.

``samvad serve`` is the production entry point. With no Firestore configured
(no ``FIRESTORE_EMULATOR_HOST``, ``GOOGLE_CLOUD_PROJECT`` or
``GOOGLE_APPLICATION_CREDENTIALS``) and ``--store auto`` (the default), it
starts the local Firestore emulator with its data kept in
``$SAMVAD_DATA_DIR/firestore`` across restarts and serves against it; where no
emulator is installed it runs memory-only and says so.

Run as a program (``main()`` with no arguments), ``serve`` first executes
itself again with the memory allocator of ``SAMVAD_ALLOCATOR``
(:mod:`samvad.allocator`): same process id, same arguments.

It refuses to start (exit 2) when ``FIREBASE_AUTH_EMULATOR_HOST`` is set and
the store is Cloud Firestore rather than an emulator: that switch turns ID
token verification off (see :func:`samvad.config.auth_emulator_host`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from samvad import __version__
from samvad.config import Settings, auth_emulator_host
from samvad.errors import ConfigError

__all__ = [
    "LOCAL_PROJECT",
    "main",
    "serve",
]

logger = logging.getLogger("samvad")

LOCAL_PROJECT = "samvad-local"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samvad", description="Samvad conversation backend")
    parser.add_argument("--version", action="version", version=f"samvad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="interface to bind (SAMVAD_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (SAMVAD_PORT or PORT, default 8080)")
    serve.add_argument(
        "--store",
        choices=["auto", "firestore", "memory"],
        help="persistence backend (SAMVAD_STORE, default auto)",
    )
    serve.add_argument("--log-format", choices=["text", "json"], help="SAMVAD_LOG_FORMAT")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port, each a full instance (SAMVAD_WORKERS, default 1)",
    )
    return parser


def _embedded_emulator(settings: Settings, stack: ExitStack) -> Settings:
    """Start the local Firestore emulator for an unconfigured ``auto`` store."""
    from samvad.emulator import EmulatorStartError, FirestoreEmulator, find_gcloud

    if find_gcloud() is None:
        logger.warning(
            "No Firestore configured and no Firestore emulator installed: running "
            "memory-only; data is lost on restart. Set GOOGLE_CLOUD_PROJECT or "
            "FIRESTORE_EMULATOR_HOST, or install google-cloud-cli-firestore-emulator."
        )
        return settings.replace(store="memory")
    data_dir = (settings.data_dir / "firestore").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    project = settings.project or LOCAL_PROJECT
    try:
        emulator = FirestoreEmulator.start(
            data_dir=data_dir, log_path=data_dir.parent / "emulator.log", project=project
        )
    except (EmulatorStartError, ValueError):
        logger.exception("The local Firestore emulator did not start: running memory-only")
        return settings.replace(store="memory")
    # stop() exports the project's data into data_dir; the next start imports
    # it. Should this process die without stopping it, the emulator's watchdog
    # exports and stops it instead.
    stack.callback(emulator.stop)
    # The server exports periodically itself (samvad.persistence): a write is
    # confirmed in its journal only once an export holds it.
    logger.info(
        "No Firestore configured: started the local Firestore emulator at %s "
        "(project %s, data kept in %s, process group %d)",
        emulator.host_port,
        project,
        data_dir,
        emulator.pgid,
    )
    return settings.replace(
        store="firestore",
        emulator_host=emulator.host_port,
        project=project,
        emulator_export_dir=data_dir,
    )


def serve(args: argparse.Namespace, *, reexec: bool = False) -> int:
    """Run the server; with ``reexec``, first in ``SAMVAD_ALLOCATOR``'s allocator."""
    from samvad import allocator

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "store", "log_format", "workers"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    settings = Settings.from_env().replace(**overrides)
    # Again after the command line (``--store firestore``), before anything starts.
    auth_emulator_host(settings)
    # Returns only when it did not execute anything (and why, if it could not).
    not_tuned = allocator.reexec(settings.allocator) if reexec else None
    # After that: the server's modules are imported once, by the process that runs it.
    from samvad.logs import configure_logging
    from samvad.server import run, run_workers
    from samvad.web.app import create_app

    configure_logging(settings)
    logger.info("Memory allocator: %s", allocator.describe())
    if not_tuned is not None:
        logger.warning("SAMVAD_ALLOCATOR=hugepages not applied: %s", not_tuned)
    with ExitStack() as stack:
        if settings.store == "auto" and not settings.firestore_configured:
            settings = _embedded_emulator(settings, stack)
        if settings.workers != 1:
            _check_workers(settings)
            run_workers(settings)
        else:
            run(create_app(settings), settings)
    return 0


def _check_workers(settings: Settings) -> None:
    """Several workers are several instances: they must share one truth."""
    if settings.workers < 1:
        raise ConfigError(f"--workers must be at least 1; got {settings.workers}")
    if settings.store == "memory" or not settings.firestore_configured:
        raise ConfigError(
            f"--workers {settings.workers} needs Firestore (each worker is an instance with "
            "its own memory): set GOOGLE_CLOUD_PROJECT or FIRESTORE_EMULATOR_HOST, or use 1 worker"
        )
    if not settings.coherence:
        raise ConfigError(
            f"--workers {settings.workers} with SAMVAD_COHERENCE off would let each worker "
            "serve its own stale copy: turn coherence on or use 1 worker"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            # Only a program may execute itself again, not a caller's process.
            return serve(args, reexec=argv is None)
    except ConfigError as exc:
        print(f"samvad: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
