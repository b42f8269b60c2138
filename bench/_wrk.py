"""Running ``wrk`` (Debian package ``wrk``) against Samvad's REST API and reading its report."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}

GET_STATE = """
local users = {users}
local prefix = "{prefix}"
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/session/" .. prefix .. (n % users) .. "/state", wrk.headers)
end
"""

POST_HISTORY = """
local users = {users}
local prefix = "{prefix}"
local n = 0
wrk.headers["Content-Type"] = "application/json"
local body = '{{"role":"user","content":"What documents do I need for a home loan?"}}'
request = function()
  n = n + 1
  return wrk.format("POST", "/api/session/" .. prefix .. (n % users) .. "/history", wrk.headers,
    body)
end
"""

POST_STATE = """
local users = {users}
local prefix = "{prefix}"
local n = 0
wrk.headers["Content-Type"] = "application/json"
local body = '{{"language":"en","conversationContext":{{"topic":"home loans","step":1}}}}'
request = function()
  n = n + 1
  return wrk.format("POST", "/api/session/" .. prefix .. (n % users) .. "/state", wrk.headers,
    body)
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> dict[str, Any]:
    """The figures of a ``wrk --latency`` report."""
    figures: dict[str, Any] = {}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps:
        figures["requests_per_second"] = round(float(rps.group(1)), 1)
    total = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    if total:
        figures["requests"] = int(total.group(1))
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        if match:
            figures[f"p{pct}_ms"] = round(_to_ms(match.group(1)), 3)
    latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", output)
    if latency:
        figures["mean_ms"] = round(_to_ms(latency.group(1)), 3)
        figures["max_ms"] = round(_to_ms(latency.group(3)), 3)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    figures["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    figures["socket_errors"] = sum(int(x) for x in errors.groups()) if errors else 0
    return figures


def run_wrk(
    base_url: str,
    script: str,
    *,
    connections: int,
    duration: float,
    threads: int = 1,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[dict[str, Any], str]:
    """Run wrk with the Lua ``script``; returns the parsed figures and the raw report."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
        path = Path(handle.name)
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        f"--timeout={timeout:g}s",
        "--latency",
        "-s",
        str(path),
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    command.append(base_url)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    finally:
        path.unlink(missing_ok=True)
    return parse(result.stdout), result.stdout
