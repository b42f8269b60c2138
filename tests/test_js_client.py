"""The JavaScript client (``clients/js``): its unit tests under Node's built-in test
runner, and its tables of frame types, error codes and close codes checked against
the server's own (``samvad.web.protocol``), so a code added on one side fails here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from samvad.web import protocol, schemas
from samvad.web.protocol import ERROR_CODES, CloseCode
from tests.support.firestore import emulator_missing

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "clients" / "js"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        emulator_missing("Node.js (>= 20) is not installed: the JavaScript client is untested")
    return node


@pytest.fixture(scope="module")
def exported() -> dict[str, Any]:
    """The client module's exported tables, as Node sees them."""
    script = (
        "const m = await import(process.argv[1]);"
        "console.log(JSON.stringify({errors: m.ERROR_ACTIONS, closes: m.CLOSE_ACTIONS,"
        " client: m.CLIENT_FRAME_TYPES, server: m.SERVER_FRAME_TYPES}));"
    )
    done = subprocess.run(
        [_node(), "--input-type=module", "-e", script, (CLIENT / "samvad.js").as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    tables: dict[str, Any] = json.loads(done.stdout)
    return tables


def test_the_node_unit_tests_pass() -> None:
    done = subprocess.run(
        [_node(), "--test", "test/"],
        cwd=CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    # The runner found the tests (an empty directory also "passes").
    count = re.search(r"^# pass (\d+)$", done.stdout, re.MULTILINE)
    assert count is not None and int(count.group(1)) >= 20, done.stdout[-2000:]


def test_every_error_code_of_the_server_has_an_action(exported: dict[str, Any]) -> None:
    assert set(exported["errors"]) == ERROR_CODES
    typed = (CLIENT / "samvad.d.ts").read_text()
    union = re.search(r"export type ErrorCode =(.*?);", typed, re.DOTALL)
    assert union is not None
    assert set(re.findall(r'"([a-z_]+)"', union.group(1))) == ERROR_CODES


def test_every_close_code_of_the_server_has_an_action(exported: dict[str, Any]) -> None:
    closes = {int(code): entry for code, entry in exported["closes"].items()}
    assert {int(code) for code in CloseCode} <= set(closes)
    # A close that ends the session or refuses the user must not loop on reconnects.
    for code in (CloseCode.NORMAL, CloseCode.FORBIDDEN, CloseCode.SESSION_ERASED):
        assert closes[code]["reconnect"] is False
    for code in (CloseCode.GOING_AWAY, CloseCode.INTERNAL_ERROR, CloseCode.TRY_AGAIN_LATER):
        assert closes[code]["reconnect"] is True


def test_the_client_knows_every_frame_type(exported: dict[str, Any]) -> None:
    parsers: dict[str, Any] = protocol._PARSERS
    assert set(exported["client"]) == set(parsers)
    # The server's frames are the tagged shapes of samvad/web/schemas.py.
    server_types = {frame.__struct_config__.tag for frame in schemas.SERVER_FRAMES}
    assert len(server_types) == len(schemas.SERVER_FRAMES) >= 12
    assert server_types <= set(exported["server"])
    # The documented server frames, too (``durable`` comes with the zero-loss protocol).
    documented = (REPO / "docs" / "protocol.md").read_text()
    table = documented.split("## Server → client frames", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `([a-z.]+)` \|", table, re.MULTILINE)) <= set(exported["server"])
