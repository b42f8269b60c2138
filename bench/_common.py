"""Shared helpers for the benchmark scripts: percentiles, machine facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/max (microseconds) of nanosecond samples."""
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        index = min(len(ordered) - 1, round(q * (len(ordered) - 1)))
        return ordered[index] / 1000

    return {
        "n": len(ordered),
        "p50_us": round(at(0.50), 2),
        "p90_us": round(at(0.90), 2),
        "p99_us": round(at(0.99), 2),
        "max_us": round(ordered[-1] / 1000, 2),
        "mean_us": round(statistics.fmean(ordered) / 1000, 2),
    }


def machine() -> dict[str, Any]:
    """The facts a benchmark figure needs next to it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def emit(name: str, figures: dict[str, Any], json_path: str | None) -> None:
    """Print the figures and, when asked, write them as JSON."""
    report = {"benchmark": name, "machine": machine(), "figures": figures}
    print(json.dumps(report, indent=2))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
