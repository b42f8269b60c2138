"""``samvad serve`` with the garbage collector instrumented, for benchmarks only.

    SAMVAD_BENCH_GC=default|freeze|off|T0,T1,T2|freeze+T0,T1,T2 SAMVAD_BENCH_GC_STATS=PATH \\
        python -m bench._serve serve --store memory --port P

``freeze`` calls ``gc.freeze()`` once the server has started (the lifespan
has run), so the objects of start-up are never scanned again; ``T0,T1,T2``
sets the collection thresholds. Every collection's pause is recorded by
generation (``gc.callbacks``) and written as JSON to
``SAMVAD_BENCH_GC_STATS`` when the server exits; with ``SAMVAD_BENCH_GC_TYPES``
set, ``kill -USR1`` writes what the collector tracks, by type, to that path.
This is how the GC figures of ``docs/benchmarks.md`` were measured; the
server itself is unchanged.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import uvicorn

from samvad.cli import main

_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_started: list[float] = [0.0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses[info["generation"]].append(time.perf_counter() - _started[0])


def _write_stats(path: str, mode: str) -> None:
    stats: dict[str, Any] = {"gc": mode, "frozen": gc.get_freeze_count()}
    for generation, pauses in _pauses.items():
        ordered = sorted(pauses)
        stats[f"gen{generation}"] = {
            "collections": len(ordered),
            "total_ms": round(1000 * sum(ordered), 1),
            "max_ms": round(1000 * ordered[-1], 2) if ordered else 0.0,
            "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2) if ordered else 0.0,
        }
    with open(path, "w") as handle:
        json.dump(stats, handle, indent=2)


def _dump_types(path: str) -> None:
    """What the collector tracks, by type (``kill -USR1`` the server)."""
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    with open(path, "w") as handle:
        json.dump({"tracked": sum(counts.values()), "by_type": counts.most_common(40)}, handle)


def _freeze_after_startup() -> None:
    original = uvicorn.Server.startup

    async def startup(self: uvicorn.Server, sockets: Any = None) -> None:
        await original(self, sockets=sockets)
        gc.collect()
        gc.freeze()

    uvicorn.Server.startup = startup  # type: ignore[method-assign]


def run() -> int:
    mode = os.environ.get("SAMVAD_BENCH_GC", "default")
    for part in mode.split("+"):
        if part == "freeze":
            _freeze_after_startup()
        elif part == "off":
            gc.disable()
        elif part != "default":
            t0, t1, t2 = (int(x) for x in part.split(","))
            gc.set_threshold(t0, t1, t2)
    types_path = os.environ.get("SAMVAD_BENCH_GC_TYPES")
    if types_path:
        signal.signal(signal.SIGUSR1, lambda signum, frame: _dump_types(types_path))
    path = os.environ.get("SAMVAD_BENCH_GC_STATS")
    if path:
        gc.callbacks.append(_callback)
        atexit.register(_write_stats, path, mode)
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(run())
