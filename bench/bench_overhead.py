"""Request-handling CPU of Samvad next to a bare Starlette app, same server settings, one run.

    .venv/bin/python bench/bench_overhead.py --json bench/results/overhead.json

(6 minutes at a load average of 15 on two cores, 2 of them filling histories;
less on a quieter machine. ``--profile DIR`` instead records py-spy profiles
of the Samvad server, see below.) Two servers run side by side, each in its own
process, both exactly as ``samvad serve`` runs an app (``SamvadServer``:
uvicorn with uvloop and httptools, the same options, the same
garbage-collector tuning at start-up) with logging at WARNING:

* **A**: ``python -m samvad serve --store memory`` (the memory store, so the
  request layer is measured and not Firestore's client; ``--store firestore``
  with FIRESTORE_EMULATOR_HOST and GOOGLE_CLOUD_PROJECT set uses the
  emulator), with the benchmark responder that answers in one chunk
  (``SAMVAD_RESPONDER=bench._responders:one_chunk``, no delay) and the
  WebSocket rate limit lifted;
* **B**: ``python -m bench._bare serve``: a bare Starlette app with the same
  paths doing the trivial equivalent (JSON in, JSON out; a WebSocket JSON echo).

Workloads, each run on A and B alternately (A B B A A B: three repetitions,
interleaved, the order reversed in every other one), a window of
``--window`` seconds each after a warm-up. The reversal matters: the same
tree measured in the first and in the last place of each repetition
(``bench_ws_overhead.py`` with one checkout as both trees, 2026-11-30)
came out 8 % dearer in the first place (median of six pairs).

* ``get_state``: ``GET /api/session/{u}/state`` over 1,000 users with a
  saved state (every read a cache hit);
* ``post_history_empty``: ``POST /api/session/{u}/history`` over 10,000
  users new to each window (histories of 0 or 1 message; every append
  gets a write of its own);
* ``post_history_full``: the same over 100 users whose histories were first
  filled to the 100-message cap (every append trims one). How many appends
  of one user a flush takes together depends on the throughput reached, so
  the report gives Samvad's store writes per request (from its
  ``samvad_store_writes_total``) and, when the windows differ enough, a line
  fitted through them that separates the CPU per write from the rest;
* ``ws_message``: 1,000 WebSocket connections, each sending a ``message``,
  reading Samvad's ``ack``, ``reply.start``, one ``reply.chunk`` and
  ``reply.end`` (the user's message and the reply appended to the user's
  history and written behind), then the next (B: one JSON frame echoed).
  With 1,000 users each sends at most about one message per flush interval
  at the rates this machine reaches, so most exchanges get a write of their own;
* ``ws_idle_memory``: RSS growth per idle WebSocket connection (A: after
  ``start``/``started``; B: after one echo), 1,000 more connections per
  repetition, held open.

``ws_message``'s client polls its sockets without sleeping during a window
(``--ws-client polling``, the default; ``sleeping`` is how sections 12 to 26 of
docs/benchmarks.md measured). A closed-loop client sleeps whenever it waits for
the server: then every server write that finds it asleep also wakes it, and on
these VMs that wake-up is an inter-processor interrupt charged to the writing
server's system time, about 17 µs per Samvad exchange (``perf record -e
cpu-clock``: ``sock_def_readable`` under the server's ``write``). Samvad is the
slower side, so its client is nearly always asleep; the bare echo's client is
the slower side, so it is nearly always awake and the echo hardly ever pays.
With the client polling, neither server pays to wake the load generator, a
cost a server answering remote clients does not have (docs/benchmarks.md,
section 27).

CPU per request is the server process's CPU time (user + system, all
threads, from ``/proc``) from the start of a window until the write-behind
has settled after it (``--settle`` seconds after A's windows; its flushes
are part of the cost), divided by the requests completed in the window.
HTTP load comes from ``wrk`` (Debian package ``wrk``, one thread, 50
connections) when installed, else from ``bench/_http_load.py``; WebSocket load
from the lean client in ``bench/_ws_raw.py`` in its own process. On two or
more cores the servers are pinned to CPU 0 and everything else (this script,
wrk, the WebSocket client, py-spy) to CPU 1 (``--no-pin`` to leave it to the
scheduler); the report gives the generator's CPU so a starved server shows.
Each window records the 1-minute load average: the machine is shared, so
compare the ratios within one run, not the absolute figures across runs.

``--profile DIR``: no A/B run; the Samvad server is sampled by ``py-spy
record`` (``--rate`` 250 Hz, non-blocking, raw collapsed stacks written to
DIR) during one window of each of ``get_state``, ``post_history_full`` and
``ws_message``, and the top frames (own time, and time including callees
for Samvad's and the frameworks' functions) are printed and put in the JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ServerProcess, emit, get_json, post_json
from bench._http_load import run_load
from bench._wrk import GET_STATE, POST_HISTORY, POST_STATE, run_wrk, wrk_available
from bench._ws_raw import Exchange, WsClientProcess

STATE_USERS = 1000
EMPTY_USERS = 10_000
FULL_USERS = 100
HISTORY_CAP = 100
HTTP_CONNECTIONS = 50
WS_CONNECTIONS = 1000
IDLE_CONNECTIONS = 1000
QUESTION = "What documents do I need for a home loan?"
BODY = ('{"role":"user","content":"' + QUESTION + '"}').encode()
STATE_BODY = b'{"language":"en","conversationContext":{"topic":"home loans","step":1}}'

SAMVAD_ENV = {
    "SAMVAD_LOG_LEVEL": "WARNING",
    "SAMVAD_RESPONDER": "bench._responders:one_chunk",
    "SAMVAD_RESPONDER_CHUNK_DELAY_SECONDS": "0",
    "SAMVAD_WS_RATE_PER_SECOND": "1000000",
    "SAMVAD_WS_RATE_BURST": "1000000",
}

MESSAGE = ('{"type":"message","text":"' + QUESTION + '"}').encode()
SAMVAD_WS = Exchange(
    message=MESSAGE,
    end_prefix=b'{"type":"reply.end"',
    hello=b'{"type":"start","userId":"ws-{i}","historyLimit":0}',
)
SAMVAD_IDLE = Exchange(
    message=MESSAGE,
    end_prefix=b'{"type":"reply.end"',
    hello=b'{"type":"start","userId":"idle-{i}","historyLimit":0}',
)
BARE_WS = Exchange(message=MESSAGE, end_prefix=None)


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def store_writes(server: ServerProcess) -> float | None:
    """Samvad's ``samvad_store_writes_total``, all collections and outcomes (None: no metric)."""
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("samvad_store_writes_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines) if lines else None


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.generator = args.generator or ("wrk" if wrk_available() else "python")
        self.pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
        self.server_cpus = {0}
        self.other_cpus = set(range(1, os.cpu_count() or 1))
        if self.pinned:
            os.sched_setaffinity(0, self.other_cpus)  # children inherit it
        env = dict(SAMVAD_ENV)
        self.samvad = ServerProcess(store=args.store, env=env, python=args.python)
        self.bare = ServerProcess(module="bench._bare", env={}, python=args.python)
        # --baseline-root: Samvad from another checkout, a third server in every round.
        self.base = (
            ServerProcess(store=args.store, env=env, python=args.python, root=args.baseline_root)
            if args.baseline_root
            else None
        )
        self.ws: WsClientProcess | None = None

    # -- servers ---------------------------------------------------------------------

    def start(self) -> None:
        for _, server in self.servers():
            server.start()
            if self.pinned:
                pin(server.pid, self.server_cpus)
        self.ws = WsClientProcess()

    def stop(self) -> None:
        if self.ws is not None:
            self.ws.stop()
        for _, server in self.servers():
            server.stop()

    def servers(self) -> list[tuple[str, ServerProcess]]:
        found = [("samvad", self.samvad), ("bare", self.bare)]
        if self.base is not None:
            found.append(("base", self.base))
        return found

    def samvads(self) -> list[ServerProcess]:
        """The Samvad servers (with --baseline-root, two versions of it)."""
        return [server for name, server in self.servers() if name != "bare"]

    def settle(self) -> None:
        """Let Samvad's write-behind flush what the last load queued."""
        time.sleep(self.args.settle)

    # -- one HTTP window -------------------------------------------------------------

    def http(
        self, server: ServerProcess, script: str, request_for: Callable[[int], Any], seconds: float
    ) -> dict[str, Any]:
        if self.generator == "wrk":
            figures, _ = run_wrk(server.url, script, connections=HTTP_CONNECTIONS, duration=seconds)
        else:
            figures = run_load(
                server.url, request_for, connections=HTTP_CONNECTIONS, duration=seconds
            )
            figures["requests"] = figures.get("n", 0)
        return figures

    def window(
        self, name: str, server: ServerProcess, run: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Run one measured window; CPU counted until the write-behind has settled."""
        writes_before = store_writes(server) if name != "bare" else None
        generator_before = children_cpu() + sum(os.times()[:2])
        cpu_before = server.cpu_seconds()
        started = time.monotonic()
        figures = run()
        wall = time.monotonic() - started
        generator = children_cpu() + sum(os.times()[:2]) - generator_before
        cpu_window = server.cpu_seconds() - cpu_before
        if name != "bare":
            self.settle()
        cpu = server.cpu_seconds() - cpu_before
        requests = figures["requests"]
        writes = store_writes(server) if writes_before is not None else None
        rate = figures.get("requests_per_second") or requests / figures.get("elapsed_s", wall)
        kept = (
            "p50_ms",
            "p99_ms",
            "non_2xx",
            "socket_errors",
            "frames",
            "errors",
            "closes",
            "not_drained",
        )
        return {
            "requests": requests,
            "requests_per_second": round(rate, 1),
            "cpu_s": round(cpu, 3),
            "cpu_us_per_request": round(1e6 * cpu / requests, 1) if requests else None,
            "of_which_after_window_us": round(1e6 * (cpu - cpu_window) / requests, 1)
            if requests
            else None,
            "server_cpu_percent": round(
                100 * cpu / (wall + (self.args.settle if name != "bare" else 0)), 1
            ),
            "store_writes_per_request": round((writes - writes_before) / requests, 3)
            if writes is not None and writes_before is not None and requests
            else None,
            "generator_cpu_s": round(figures.get("client_cpu_s", generator), 2),
            "wall_s": round(wall, 2),
            "load1": load1(),
            **{k: figures[k] for k in kept if k in figures},
        }

    def alternate(
        self,
        workload: str,
        make_run: Callable[[str, ServerProcess, int], Callable[[], dict[str, Any]]],
        warmup: Callable[[str, ServerProcess], None] | None = None,
    ) -> dict[str, Any]:
        if warmup is not None:
            for name, server in self.servers():
                warmup(name, server)
            self.settle()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in self.servers()}
        for rep in range(self.args.repetitions):
            servers = self.servers()
            for name, server in servers if rep % 2 == 0 else servers[::-1]:
                figures = self.window(name, server, make_run(name, server, rep))
                runs[name].append(figures)
                print(
                    f"{workload} rep {rep + 1} {name}: {figures['cpu_us_per_request']} µs CPU"
                    f"/request, {figures['requests_per_second']} /s, load {figures['load1']}",
                    file=sys.stderr,
                )
        return summarize(runs)

    # -- workloads -------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        for server in self.samvads():
            for i in range(STATE_USERS):
                post_json(
                    f"{server.url}/api/session/s-{i}/state",
                    {"language": "en", "conversationContext": {"topic": "home loans", "step": i}},
                )
        script = GET_STATE.format(users=STATE_USERS, prefix="s-")
        request_for = partial(_get_state_request, "s-", STATE_USERS)

        def make(name: str, server: ServerProcess, rep: int) -> Callable[[], dict[str, Any]]:
            return lambda: self.http(server, script, request_for, self.args.window)

        def warmup(name: str, server: ServerProcess) -> None:
            self.http(server, script, request_for, self.args.warmup)

        return self.alternate("get_state", make, warmup)

    def post_history_empty(self) -> dict[str, Any]:
        def make(name: str, server: ServerProcess, rep: int) -> Callable[[], dict[str, Any]]:
            prefix = f"e{rep}-"
            script = POST_HISTORY.format(users=EMPTY_USERS, prefix=prefix)
            request_for = partial(_post_history_request, prefix, EMPTY_USERS)
            return lambda: self.http(server, script, request_for, self.args.window)

        def warmup(name: str, server: ServerProcess) -> None:
            script = POST_HISTORY.format(users=EMPTY_USERS, prefix="ew-")
            request_for = partial(_post_history_request, "ew-", EMPTY_USERS)
            self.http(server, script, request_for, self.args.warmup)

        figures = self.alternate("post_history_empty", make, warmup)
        figures["history_length_after"] = self.history_lengths(
            "e0-", EMPTY_USERS, sample=range(0, EMPTY_USERS, EMPTY_USERS // 10)
        )
        return figures

    def history_lengths(self, prefix: str, users: int, sample: range) -> list[int]:
        lengths = []
        for i in sample:
            try:
                profile = get_json(f"{self.samvad.url}/api/session/{prefix}{i % users}/profile")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                lengths.append(0)  # no message yet, no profile
            else:
                lengths.append(profile["profile"]["historyLength"])
        return lengths

    def fill(self) -> dict[str, Any]:
        """Fill the histories of the ``f-`` users to the cap (not measured)."""
        script = POST_HISTORY.format(users=FULL_USERS, prefix="f-")
        request_for = partial(_post_history_request, "f-", FULL_USERS)
        started = time.monotonic()
        sample = range(0, FULL_USERS, FULL_USERS // 10)
        lengths: list[int] = [0]
        while time.monotonic() - started < 120:
            figures = self.http(self.samvad, script, request_for, 2.0)
            if figures.get("non_2xx"):
                raise RuntimeError(f"filling histories: {figures['non_2xx']} non-2xx answers")
            lengths = self.history_lengths("f-", FULL_USERS, sample)
            if min(lengths) >= HISTORY_CAP:
                break
        self.settle()
        return {"seconds": round(time.monotonic() - started, 1), "history_lengths": lengths}

    def post_history_full(self) -> dict[str, Any]:
        filled = self.fill()
        script = POST_HISTORY.format(users=FULL_USERS, prefix="f-")
        request_for = partial(_post_history_request, "f-", FULL_USERS)

        def make(name: str, server: ServerProcess, rep: int) -> Callable[[], dict[str, Any]]:
            return lambda: self.http(server, script, request_for, self.args.window)

        def warmup(name: str, server: ServerProcess) -> None:
            if name == "bare":
                self.http(server, script, request_for, self.args.warmup)

        figures = self.alternate("post_history_full", make, warmup)
        figures["fill"] = filled
        figures["history_lengths_after"] = self.history_lengths(
            "f-", FULL_USERS, range(0, FULL_USERS, FULL_USERS // 10)
        )
        return figures

    def ws_message(self) -> dict[str, Any]:
        assert self.ws is not None
        ws = self.ws
        exchanges = {"samvad": SAMVAD_WS, "bare": BARE_WS, "base": SAMVAD_WS}
        connected = {
            name: ws.connect(name, server.ws_url, WS_CONNECTIONS, exchanges[name])
            for name, server in self.servers()
        }
        warm = {name: ws.run(name, self.args.warmup)["completed"] for name, _ in self.servers()}
        self.settle()

        def make(name: str, server: ServerProcess, rep: int) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                figures = ws.run(name, self.args.window, poll=self.args.ws_client == "polling")
                figures["requests"] = figures["completed"]
                return figures

            return run

        figures = self.alternate("ws_message", make)
        figures["connections"] = {k: v["connected"] for k, v in connected.items()}
        figures["warmup_exchanges"] = warm
        figures["frames_per_message"] = {
            name: round(
                statistics.fmean(r["frames"] / r["requests"] for r in figures["runs"][name]), 2
            )
            for name, _ in self.servers()
        }
        for name, _ in self.servers():
            ws.close(name)
        return figures

    def ws_idle_memory(self) -> dict[str, Any]:
        assert self.ws is not None
        ws = self.ws
        exchanges = {"samvad": SAMVAD_IDLE, "bare": BARE_WS, "base": SAMVAD_IDLE}
        held: dict[str, int] = {}
        for name, server in self.servers():  # first connections: lazy imports, caches
            held[name] = ws.connect(f"idle-{name}", server.ws_url, 50, exchanges[name])["connected"]
        time.sleep(0.5)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in self.servers()}
        for rep in range(self.args.repetitions):
            servers = self.servers()
            for name, server in servers if rep % 2 == 0 else servers[::-1]:
                before = server.rss_kib()
                result = ws.connect(
                    f"idle-{name}", server.ws_url, IDLE_CONNECTIONS, exchanges[name]
                )
                time.sleep(0.5)
                after = server.rss_kib()
                # ``connected`` counts every connection the group holds: divide
                # the growth by the ones this repetition added.
                added = result["connected"] - held[name]
                held[name] = result["connected"]
                runs[name].append(
                    {
                        "connected": added,
                        "held": result["connected"],
                        "failures": result["failures"],
                        "rss_before_kib": before,
                        "rss_after_kib": after,
                        "kib_per_connection": round((after - before) / added, 2) if added else None,
                        "load1": load1(),
                    }
                )
        for name, _ in self.servers():
            ws.close(f"idle-{name}")
        return summarize(runs, key="kib_per_connection", throughput=None)


def _get_state_request(prefix: str, users: int, n: int) -> tuple[str, str, bytes | None]:
    return "GET", f"/api/session/{prefix}{n % users}/state", None


def _post_history_request(prefix: str, users: int, n: int) -> tuple[str, str, bytes | None]:
    return "POST", f"/api/session/{prefix}{n % users}/history", BODY


def _post_state_request(prefix: str, users: int, n: int) -> tuple[str, str, bytes | None]:
    return "POST", f"/api/session/{prefix}{n % users}/state", STATE_BODY


def summarize(
    runs: dict[str, list[dict[str, Any]]],
    *,
    key: str = "cpu_us_per_request",
    throughput: str | None = "requests_per_second",
) -> dict[str, Any]:
    """Per repetition and median: the figure of A and B, and A/B within each repetition."""
    if "base" in runs:
        out_base = summarize(
            {"samvad": runs["base"], "bare": runs["bare"]}, key=key, throughput=throughput
        )
        out_base.pop("runs")
    else:
        out_base = None
    a, b = runs["samvad"], runs["bare"]
    ratios = [round(x[key] / y[key], 2) for x, y in zip(a, b, strict=True) if x[key] and y[key]]
    out: dict[str, Any] = {
        key: {
            "samvad": [r[key] for r in a],
            "bare": [r[key] for r in b],
            "samvad_median": statistics.median(r[key] for r in a),
            "bare_median": statistics.median(r[key] for r in b),
        },
        "ratio_samvad_to_bare": ratios,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "load1": [r["load1"] for pair in zip(a, b, strict=True) for r in pair],
        "runs": runs,
    }
    fit = writes_fit(a)
    if fit is not None:
        out["samvad_writes_fit"] = fit
    if throughput:
        tp = [round(x[throughput] / y[throughput], 2) for x, y in zip(a, b, strict=True)]
        out[throughput] = {
            "samvad": [r[throughput] for r in a],
            "bare": [r[throughput] for r in b],
        }
        out["throughput_ratio"] = tp
        out["throughput_ratio_median"] = statistics.median(tp)
    if out_base is not None:
        # The same figures for the baseline checkout, against the same bare windows.
        out["baseline"] = out_base
    return out


def writes_fit(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """CPU per request against store writes per request, fitted over the windows.

    The write-behind coalesces the writes of one document within its flush
    interval, so the faster the server, the fewer writes per request, and a
    write of a full history is not cheap: CPU per request = request path +
    writes per request x CPU per write. With windows at different write
    ratios, a least-squares line separates the two (an indication: three
    noisy points); None when the ratios are too close to tell.
    """
    points = [
        (r["store_writes_per_request"], r["cpu_us_per_request"])
        for r in runs
        if r.get("store_writes_per_request") is not None and r.get("cpu_us_per_request")
    ]
    if len(points) < 2:
        return None
    xs = [x for x, _ in points]
    if max(xs) - min(xs) < 0.2:
        return None
    mx = statistics.fmean(xs)
    my = statistics.fmean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return {
        "us_per_store_write": round(slope, 1),
        "us_per_request_without_writes": round(my - slope * mx, 1),
        "points": points,
    }


# -- profiles ------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """``function (path/to/module.py:12)`` -> ``function (module.py)``, paths cut to the package."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3", "/samvad/", "/bench/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker in ("/samvad/", "/bench/"):
                path = marker.strip("/") + "/" + path
            break
    return f"{match.group('function')} ({path})"


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Top frames of a py-spy ``--format raw`` file, as percentages of the samples.

    ``own_percent``: where the samples were taken (the innermost frame);
    ``own_by_module``: the same added up by module; ``inclusive_percent``: the
    functions of Samvad and of the frameworks with their callees, leaving out
    the frames that are in nearly every sample (the server's main loop).
    """
    own: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += count
        by_module[frames[-1].rpartition(" (")[2].rstrip(")")] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"samples": 0}

    def share(counter: Counter[str], keep: Callable[[str, int], bool]) -> list[tuple[str, float]]:
        found = [(f, round(100 * n / total, 1)) for f, n in counter.most_common() if keep(f, n)]
        return found[:top]

    ours = ("samvad/", "starlette/", "uvicorn/", "websockets/", "bench/")
    return {
        "samples": total,
        "own_percent": share(own, lambda f, n: True),
        "own_by_module": share(by_module, lambda f, n: True),
        "inclusive_percent": share(
            inclusive, lambda f, n: any(m in f for m in ours) and n < 0.8 * total
        ),
    }


def profile(bench: Bench, directory: Path) -> dict[str, Any]:
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    seconds = max(3, round(bench.args.window))
    out: dict[str, Any] = {}
    samvad = bench.samvad
    assert bench.ws is not None

    def record(kind: str, load: Callable[[], Any]) -> None:
        path = directory / f"{kind}.txt"
        spy_process = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(samvad.pid),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "--duration",
                str(seconds + 1),
                "--output",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        load()
        _, err = spy_process.communicate(timeout=seconds + 30)
        if spy_process.returncode != 0 or not path.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        out[kind] = summarize_profile(path)
        out[kind]["raw"] = path.name

    kinds = bench.args.profile_kind or PROFILE_KINDS
    if "get_state" in kinds:
        for i in range(STATE_USERS):
            post_json(f"{samvad.url}/api/session/s-{i}/state", {"language": "en"})
        get_script = GET_STATE.format(users=STATE_USERS, prefix="s-")
        record(
            "get_state",
            lambda: bench.http(
                samvad, get_script, partial(_get_state_request, "s-", STATE_USERS), seconds
            ),
        )
    if "post_state" in kinds:
        state_script = POST_STATE.format(users=STATE_USERS, prefix="p-")
        record(
            "post_state",
            lambda: bench.http(
                samvad, state_script, partial(_post_state_request, "p-", STATE_USERS), seconds
            ),
        )
    if "post_history_empty" in kinds:
        empty_script = POST_HISTORY.format(users=EMPTY_USERS, prefix="pe-")
        record(
            "post_history_empty",
            lambda: bench.http(
                samvad, empty_script, partial(_post_history_request, "pe-", EMPTY_USERS), seconds
            ),
        )
    if "post_history_full" in kinds:
        bench.fill()
        post_script = POST_HISTORY.format(users=FULL_USERS, prefix="f-")
        record(
            "post_history_full",
            lambda: bench.http(
                samvad, post_script, partial(_post_history_request, "f-", FULL_USERS), seconds
            ),
        )
    if "ws_message" in kinds:
        ws = bench.ws
        ws.connect("samvad", samvad.ws_url, WS_CONNECTIONS, SAMVAD_WS)
        ws.run("samvad", bench.args.warmup)
        record("ws_message", lambda: ws.run("samvad", seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=3.0, help="seconds per measured window")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.2,
        help="seconds after a Samvad window for its write-behind to flush",
    )
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--generator", choices=["wrk", "python"], default=None)
    parser.add_argument("--store", choices=["memory", "firestore"], default="memory")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--only", action="append", choices=WORKLOADS, help="run only these")
    parser.add_argument("--python", help="the interpreter that runs both servers")
    parser.add_argument(
        "--ws-client",
        choices=["polling", "sleeping"],
        default="polling",
        help="ws_message's client polls (default) or sleeps between frames (see docstring)",
    )
    parser.add_argument(
        "--baseline-root",
        metavar="DIR",
        type=Path,
        help="also run Samvad from this checkout (e.g. `git archive main`), as a third "
        "server in every round (samvad, bare, base): an interleaved A/B of two versions; "
        "every workload but post_history_full",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="record py-spy profiles of the Samvad server instead",
    )
    parser.add_argument(
        "--profile-kind",
        action="append",
        choices=PROFILE_KINDS,
        help="with --profile: profile only these request kinds (default: all)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.baseline_root and set(args.only or WORKLOADS) - BASELINE_WORKLOADS:
        parser.error(f"--baseline-root needs --only among {sorted(BASELINE_WORKLOADS)}")
    if args.store == "firestore" and not os.environ.get("FIRESTORE_EMULATOR_HOST"):
        parser.error("--store firestore needs FIRESTORE_EMULATOR_HOST and GOOGLE_CLOUD_PROJECT")
    bench = Bench(args)
    began = time.monotonic()
    figures: dict[str, Any] = {
        "store": args.store,
        "generator": bench.generator,
        "pinning": "servers on CPU 0; this script, the load generators and py-spy on CPU 1"
        if bench.pinned
        else "none",
        "window_s": args.window,
        "ws_client": args.ws_client,
        "settle_s": args.settle,
        "repetitions": args.repetitions,
        "http_connections": HTTP_CONNECTIONS,
        "ws_connections": WS_CONNECTIONS,
        "samvad_env": SAMVAD_ENV,
        "load1_at_start": load1(),
    }
    bench.start()
    try:
        figures["bare_server_settings"] = get_json(bench.bare.url + "/healthz")["server"]
        if args.profile:
            figures["profiles"] = profile(bench, args.profile)
            emit("overhead_profile", figures, args.json)
            return
        idle_before = {n: s.cpu_seconds() for n, s in bench.servers()}
        time.sleep(2.0)
        figures["idle_cpu_percent"] = {
            n: round(100 * (s.cpu_seconds() - idle_before[n]) / 2.0, 1) for n, s in bench.servers()
        }
        for workload in args.only or WORKLOADS:
            figures[workload] = getattr(bench, workload)()
        figures["samvad_health_after"] = bench.samvad.healthz().get("persistence")
    finally:
        bench.stop()
    figures["seconds"] = round(time.monotonic() - began, 1)
    figures["load1_at_end"] = load1()
    emit("overhead", figures, args.json)


PROFILE_KINDS = ["get_state", "post_state", "post_history_empty", "post_history_full", "ws_message"]
BASELINE_WORKLOADS = {"get_state", "post_history_empty", "ws_message", "ws_idle_memory"}
WORKLOADS = ["ws_idle_memory", "get_state", "post_history_empty", "post_history_full", "ws_message"]

if __name__ == "__main__":
    main()
