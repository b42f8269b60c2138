"""JSON logs as Cloud Logging reads them: ``severity`` and the request's trace."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx

from samvad.config import Settings
from samvad.logs import (
    SAMPLED_KEY,
    SPAN_KEY,
    TRACE_KEY,
    ContextFilter,
    JsonFormatter,
    LogContext,
    TraceContext,
    bind_log_context,
    configure_logging,
    log_context_var,
    parse_trace,
    trace_var,
    user_id_var,
)
from tests.support.serve import start_serve

TRACE = "105445aa7843bc8bf206b12000100000"


def test_the_cloud_run_trace_header_is_read_with_its_span_in_hex() -> None:
    header = (b"x-cloud-trace-context", f"{TRACE}/1;o=1".encode())
    assert parse_trace([header]) == TraceContext(TRACE, "0000000000000001", True)
    unsampled = (b"x-cloud-trace-context", f"{TRACE.upper()}/18446744073709551615".encode())
    assert parse_trace([unsampled]) == TraceContext(TRACE, "ffffffffffffffff", False)
    assert parse_trace([(b"x-cloud-trace-context", TRACE.encode())]) == TraceContext(TRACE)


def test_the_w3c_traceparent_header_is_read() -> None:
    header = (b"traceparent", f"00-{TRACE}-00f067aa0ba902b7-01".encode())
    assert parse_trace([header]) == TraceContext(TRACE, "00f067aa0ba902b7", True)
    unsampled = (b"traceparent", f"00-{TRACE}-00f067aa0ba902b7-00".encode())
    assert parse_trace([unsampled]) == TraceContext(TRACE, "00f067aa0ba902b7", False)


def test_malformed_or_missing_trace_headers_are_no_trace() -> None:
    assert parse_trace([]) is None
    for name, value in (
        (b"x-cloud-trace-context", b"not-a-trace/1;o=1"),
        (b"x-cloud-trace-context", b'"}\n{"forged": 1'),
        (b"traceparent", b"00-short-00f067aa0ba902b7-01"),
        (b"traceparent", b"garbage"),
    ):
        assert parse_trace([(name, value)]) is None, value


def test_json_lines_carry_severity_and_the_trace_as_cloud_logging_reads_them() -> None:
    record = logging.LogRecord("samvad.test", logging.WARNING, __file__, 1, "careful", (), None)
    token = trace_var.set(TraceContext(TRACE, "00f067aa0ba902b7", True))
    try:
        ContextFilter().filter(record)
    finally:
        trace_var.reset(token)
    entry = json.loads(JsonFormatter(project="my-project").format(record))
    assert entry["severity"] == "WARNING"
    assert entry[TRACE_KEY] == f"projects/my-project/traces/{TRACE}"
    assert entry[SPAN_KEY] == "00f067aa0ba902b7"
    assert entry[SAMPLED_KEY] is True
    plain = logging.LogRecord("samvad.test", logging.ERROR, __file__, 1, "no trace", (), None)
    ContextFilter().filter(plain)
    entry = json.loads(JsonFormatter(project="my-project").format(plain))
    assert entry["severity"] == "ERROR"
    assert TRACE_KEY not in entry and "_trace" not in entry


def test_a_served_request_logs_under_its_trace(tmp_path: Path) -> None:
    served = start_serve(
        tmp_path,
        SAMVAD_STORE="memory",
        SAMVAD_LOG_FORMAT="json",
        SAMVAD_ACCESS_LOG="true",
        GOOGLE_CLOUD_PROJECT="trace-project",
    )
    try:
        response = httpx.get(
            served.url + "/api/session/u-trace/state",
            headers={"X-Cloud-Trace-Context": f"{TRACE}/7;o=1", "X-Request-ID": "req-trace"},
        )
        assert response.status_code == 404
    finally:
        assert served.stop() == 0
    entries = [json.loads(line) for line in served.output().splitlines() if line.strip()]
    assert all("severity" in e for e in entries)
    access = [e for e in entries if e.get("request_id") == "req-trace"]
    assert access, served.output()
    assert access[0][TRACE_KEY] == f"projects/trace-project/traces/{TRACE}"
    assert access[0][SPAN_KEY] == "0000000000000007"


def test_uvicorn_access_lines_reach_no_handler_so_uvicorn_skips_them() -> None:
    # uvicorn formats an access line per response whenever the logger has a
    # handler anywhere up its chain (hasHandlers, once per connection).
    root = logging.getLogger()
    access = logging.getLogger("uvicorn.access")
    saved = (root.handlers[:], root.level, access.level, access.propagate, access.handlers[:])
    try:
        configure_logging(Settings(log_level="DEBUG"))
        assert root.hasHandlers()
        assert not access.hasHandlers()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        access.level, access.propagate, access.handlers[:] = saved[2], saved[3], saved[4]


def test_a_request_keeps_its_ids_in_one_context_object() -> None:
    outside = user_id_var.get()
    token = log_context_var.set(LogContext("req-9", TraceContext(TRACE)))
    try:
        bind_log_context(user_id="u9", session_id="s9")
        record = logging.LogRecord("samvad", logging.INFO, __file__, 1, "hello", (), None)
        assert ContextFilter().filter(record)
        assert user_id_var.get() == outside, "the request's ids stay in its own object"
    finally:
        log_context_var.reset(token)
    assert (record.request_id, record.user_id, record.session_id) == ("req-9", "u9", "s9")
    assert record._trace == TraceContext(TRACE)
