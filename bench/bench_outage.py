"""Firestore cut for 30 s in the middle of a WebSocket load: what clients see, what is lost.

    python bench/bench_outage.py [--connections 500] [--rate 250] [--duration 80]
                                 [--cut-at 20] [--cut-for 30] [--json PATH]

The Firestore emulator (started here unless FIRESTORE_EMULATOR_HOST is set)
sits behind a fault-injection proxy (``tests/support/faultproxy.py``, run in
a thread of this process); ``python -m samvad serve --store firestore`` runs
in its own process pointed at the proxy, with a short Firestore deadline and
probe interval so the outage is noticed fast. Generator processes
(``bench/_ws_load.py``) open ``--connections`` WebSocket sessions and send
``--rate`` messages per second in total for ``--duration`` seconds. At
``--cut-at`` seconds the proxy resets every Firestore connection and refuses
new ones for ``--cut-for`` seconds, then proxies again.

Reported: errors the clients saw (error frames, unexpected closes, messages
never acknowledged, replies not complete), message-to-ack latency before,
during and after the cut, how long the server took to notice and to drain its
backlog (every write made before the restore in Firestore), and, once
``/healthz`` shows no pending writes, every acknowledged user message looked
up in Firestore directly (not through the proxy): the
number missing must be 0. Each connection sends fewer than 50 messages, so
its history (100 messages with the replies) never trims an acknowledged one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import threading
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ServerProcess, emit, ms, percentiles, raise_open_files
from bench._ws_load import LoadConfig, LoadRun, merge_results
from samvad.documents import PROFILES
from samvad.firestore_client import close_client, make_client
from tests.support.faultproxy import FaultProxy

_T = TypeVar("_T")


class ProxyThread:
    """A :class:`FaultProxy` on its own event loop in a background thread."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = self._call(FaultProxy.start(host, int(port)))

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.cut)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(self.proxy.restore)

    def close(self) -> None:
        self._call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class HealthPoller:
    """``/healthz`` every ``interval`` seconds: (time, mode, pending, replay lag)."""

    def __init__(self, server: ServerProcess, interval: float = 0.2) -> None:
        self.server = server
        self.interval = interval
        self.samples: list[tuple[float, str, int, float]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                p = self.server.healthz(timeout=2)["persistence"]
                self.samples.append(
                    (time.time(), p["mode"], p["pendingWrites"], p["replayLagSeconds"])
                )
            except OSError:
                self.failures += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def missing_in_firestore(
    host: str, project: str, acks: list[tuple[str, str, int, str]]
) -> dict[str, Any]:
    """Look every acknowledged message up in the users' profile documents."""
    client = make_client(project=project, emulator_host=host)
    try:
        users = sorted({user for user, _, _, _ in acks})
        stored: dict[str, set[str]] = {}
        for start in range(0, len(users), 100):
            chunk = users[start : start + 100]
            refs = [client.collection(PROFILES).document(u) for u in chunk]
            async for snapshot in client.get_all(refs):
                doc = snapshot.to_dict() or {}
                stored[snapshot.id] = {
                    str(m.get("id"))
                    for m in doc.get("conversationHistory", [])
                    if isinstance(m, dict)
                }
        missing = [a for a in acks if a[3] not in stored.get(a[0], set())]
        return {
            "acknowledged_messages": len(acks),
            "users": len(users),
            "profiles_found": sum(1 for u in users if u in stored),
            "missing": len(missing),
            "missing_examples": [list(m) for m in missing[:10]],
        }
    finally:
        await close_client(client)


def phase_latency(samples: list[tuple[float, int]], lo: float, hi: float) -> dict[str, Any]:
    return ms(percentiles([lat for at, lat in samples if lo <= at < hi]))


def run(args: argparse.Namespace, host: str) -> dict[str, Any]:
    project = "bench-outage-" + uuid.uuid4().hex[:8]
    proxy = ProxyThread(host)
    env = {
        "FIRESTORE_EMULATOR_HOST": proxy.proxy.host_port,
        "GOOGLE_CLOUD_PROJECT": project,
        "SAMVAD_LOG_LEVEL": "WARNING",
        "SAMVAD_FIRESTORE_DEADLINE_SECONDS": str(args.deadline),
        "SAMVAD_PROBE_INTERVAL_SECONDS": str(args.probe_interval),
        "SAMVAD_PROBE_MAX_INTERVAL_SECONDS": str(args.probe_max_interval),
        "SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS": str(args.chunk_delay),
    }
    figures: dict[str, Any] = {
        "connections": args.connections,
        "rate_per_second": args.rate,
        "duration_s": args.duration,
        "cut_at_s": args.cut_at,
        "cut_for_s": args.cut_for,
        "server": "python -m samvad serve --store firestore (1 process) -> proxy -> emulator",
        "server_env": {k: v for k, v in env.items() if k.startswith("SAMVAD_")},
    }
    server = ServerProcess(store="firestore", env=env, open_files=args.connections + 1000)
    try:
        with server:
            poller = HealthPoller(server)
            load = LoadRun(
                LoadConfig(
                    url=server.ws_url,
                    connections=args.connections,
                    rate=args.rate,
                    duration=args.duration,
                    processes=args.processes,
                    user_prefix="outage",
                    collect_acks=True,
                    ack_timeout=15.0,
                )
            )
            load.start()
            load.go()
            go = load.go_at
            time.sleep(args.cut_at)
            cut_at = time.time()
            proxy.cut()
            time.sleep(args.cut_for)
            restored_at = time.time()
            proxy.restore()
            merged = merge_results(load.results())
            load_done = time.time()
            # Drained: nothing pending any more (the load has stopped).
            drained_at = None
            deadline = time.time() + args.drain_timeout
            while time.time() < deadline:
                p = server.healthz()["persistence"]
                if p["mode"] == "firestore" and p["pendingWrites"] == 0:
                    drained_at = time.time()
                    break
                time.sleep(0.2)
            poller.stop()
            samples = poller.samples
            noticed = next(
                (t for t, mode, _, _ in samples if t >= cut_at and mode == "memory"), None
            )
            back = next(
                (t for t, mode, _, _ in samples if t >= restored_at and mode == "firestore"), None
            )
            # Replayed: every write still pending was made after the restore
            # (the oldest pending write is younger than the time since).
            caught_up = next(
                (
                    t
                    for t, mode, _, lag in samples
                    if t >= restored_at and mode == "firestore" and lag < t - restored_at
                ),
                None,
            )
            flaps = sum(
                1
                for (t0, m0, _, _), (t1, m1, _, _) in itertools.pairwise(samples)
                if t0 >= restored_at and m0 == "firestore" and m1 == "memory"
            )
            peak_pending = max((n for t, _, n, _ in samples if cut_at <= t), default=0)
            c, r = cut_at - go, restored_at - go
            figures["clients"] = {
                "connected": merged.connected,
                "connect_failures": merged.connect_failures,
                "sent": merged.sent,
                "acked": merged.acked,
                "unacked": merged.unacked,
                "error_frames": dict(merged.errors),
                "unexpected_closes": dict(merged.closes),
                "replies_complete": merged.replies_complete,
                "replies_incomplete": merged.replies_incomplete,
                "client_visible_errors": merged.unacked
                + sum(merged.errors.values())
                + sum(merged.closes.values())
                + merged.replies_incomplete
                + merged.connect_failures,
            }
            figures["message_to_ack"] = {
                "before_cut": phase_latency(merged.samples, 0, c),
                "during_cut": phase_latency(merged.samples, c, r),
                "after_restore": phase_latency(merged.samples, r, float("inf")),
            }
            figures["server"] = {
                "noticed_outage_after_s": round(noticed - cut_at, 2) if noticed else None,
                "firestore_mode_again_after_restore_s": round(back - restored_at, 2)
                if back
                else None,
                "backlog_replayed_after_restore_s": round(caught_up - restored_at, 2)
                if caught_up
                else None,
                "back_to_memory_mode_after_restore": flaps,
                "peak_pending_documents": peak_pending,
                "load_ended_after_restore_s": round(load_done - restored_at, 1),
                "drained_after_load_end_s": round(drained_at - load_done, 2)
                if drained_at
                else None,
                "healthz_failures": poller.failures,
                "health_timeline": [
                    (round(t - go, 1), mode, n, lag) for t, mode, n, lag in samples[::10]
                ],
            }
            figures["firestore_check"] = asyncio.run(
                missing_in_firestore(host, project, merged.acks)
            )
    finally:
        proxy.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--rate", type=float, default=250.0)
    parser.add_argument("--duration", type=float, default=80.0)
    parser.add_argument("--cut-at", type=float, default=20.0)
    parser.add_argument("--cut-for", type=float, default=30.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=1.0)
    parser.add_argument("--probe-interval", type=float, default=0.5)
    parser.add_argument("--probe-max-interval", type=float, default=2.0)
    parser.add_argument("--chunk-delay", type=float, default=0.02)
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.duration * args.rate / args.connections >= 50:
        parser.error("each connection must send fewer than 50 messages (the history keeps 100)")
    raise_open_files(args.connections + 1000)
    import os

    host = os.environ.get("FIRESTORE_EMULATOR_HOST")
    emulator = None
    if not host:
        from samvad.emulator import FirestoreEmulator

        emulator = FirestoreEmulator.start()
        host = emulator.host_port
    try:
        figures = run(args, host)
        figures["emulator"] = host
    finally:
        if emulator is not None:
            emulator.stop()
    emit("outage", figures, args.json)


if __name__ == "__main__":
    main()
