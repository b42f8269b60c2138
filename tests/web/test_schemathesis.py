"""Real responses against the generated OpenAPI document.

Schemathesis reads ``/openapi.json`` from a running ``samvad serve`` on the
Firestore emulator and sends every operation requests generated from the
document — valid ones and, in negative mode, ones that break it. Every
response must be no server error, have a status the document declares for
that operation, and match the declared schema and content type. The run is
bounded (a fixed number of examples per operation and mode, derandomized) so it
stays well under a minute.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from samvad.validation import RESERVED_SESSION_IDS
from tests.support.serve import ServeProcess, start_serve

EXAMPLES = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
]


@pytest.fixture(scope="module")
def served(
    firestore_emulator: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    process = start_serve(
        tmp_path_factory.mktemp("schemathesis"),
        SAMVAD_STORE="firestore",
        FIRESTORE_EMULATOR_HOST=firestore_emulator,
        GOOGLE_CLOUD_PROJECT="fuzz-" + uuid.uuid4().hex[:10],
        SAMVAD_FLUSH_LINGER_SECONDS="0",
    )
    try:
        yield process
    finally:
        process.stop()


def _run(case_strategy: object, base_url: str, failures: list[str], label: str) -> None:
    @given(case=case_strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Case) -> None:
        case.call_and_validate(base_url=base_url, checks=CHECKS)

    try:
        check()
    # One report per operation and mode; schemathesis raises its FailureGroup
    # as a BaseExceptionGroup.
    except (Exception, FailureGroup) as exc:
        failures.append(f"{label}: {type(exc).__name__}: {exc}"[:2000])


@pytest.mark.firestore
@pytest.mark.timeout(110)
def test_real_responses_match_the_openapi_document(served: ServeProcess) -> None:
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in ("/metrics",):
            continue  # Prometheus text; nothing to check beyond the status
        operations += 1
        inputs = (operation.path_parameters, operation.query, operation.headers, operation.body)
        # Negative data needs something to break: not for operations without inputs.
        modes = [GenerationMode.POSITIVE]
        if any(len(part) for part in inputs):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            label = f"{operation.method.upper()} {operation.path} ({mode.value})"
            # A session id that is a route word (GET /api/session/stats) addresses
            # another operation, documented on its own: not this one's response.
            strategy = operation.as_strategy(generation_mode=mode).filter(
                lambda case: (
                    case.path_parameters is None
                    or case.path_parameters.get("sessionId") not in RESERVED_SESSION_IDS
                )
            )
            _run(strategy, served.url, failures, label)
    assert operations >= 17
    assert not failures, "\n\n".join(failures)
    assert served.process.poll() is None


@pytest.mark.firestore
def test_the_run_catches_a_response_the_document_does_not_describe(
    served: ServeProcess,
) -> None:
    # The same harness against a document that wrongly requires one more field.
    document = httpx.get(served.url + "/openapi.json").json()
    saved = document["components"]["schemas"]["StateSaved"]
    saved["properties"]["undocumented"] = {"type": "string"}
    saved["required"].append("undocumented")
    schema = schemathesis.openapi.from_dict(document)
    operation = schema["/api/session/{userId}/state"]["POST"]
    failures: list[str] = []
    _run(operation.as_strategy(), served.url, failures, "POST state")
    assert len(failures) == 1
    assert "undocumented" in failures[0]
