"""The layering of docs/architecture.md, checked on the source: dependencies
point one way, down — web → conversation → service → persistence →
write-behind → stores → core types. A lower layer never imports a higher one;
it returns values or emits events instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "samvad"

#: Each layer and the modules in it, lowest first. A module may import from
#: its own layer and the layers below it, never from a layer above.
LAYERS: dict[str, tuple[str, ...]] = {
    "core types": (
        "samvad.__init__",
        "samvad.cache",
        "samvad.clock",
        "samvad.config",
        "samvad.documents",
        "samvad.emulator",
        "samvad.errors",
        "samvad.firestore_client",
        "samvad.history",
        "samvad.interruptions",
        "samvad.logs",
        "samvad.models",
        "samvad.principal",
        "samvad.ratelimit",
        "samvad.responder",
        "samvad.validation",
        "samvad.writes",
    ),
    "stores": ("samvad.stores",),
    "write-behind": ("samvad.barriers", "samvad.journal", "samvad.writebehind"),
    "persistence": (
        "samvad.coherence",
        "samvad.idempotency",
        "samvad.lifecycle",
        "samvad.overlay",
        "samvad.persistence",
    ),
    "service": ("samvad.service",),
    "conversation": ("samvad.conversation", "samvad.fanout"),
    "agents": ("samvad.adk", "samvad.responders"),
    "web": ("samvad.web",),
    "entry points": (
        "samvad.__main__",
        "samvad.adk.app",
        "samvad.allocator",
        "samvad.cli",
        "samvad.client",
        "samvad.server",
    ),
}


def _layer_of(module: str) -> int | None:
    if module == "samvad":
        module = "samvad.__init__"
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                candidate = (len(prefix), index)
                if best is None or candidate > best:
                    best = candidate
    return best[1] if best is not None else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The samvad modules ``path`` imports (at run time or for type checking)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("samvad"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "samvad":
                found.update(f"samvad.{alias.name}" for alias in node.names)
            elif node.module.startswith("samvad."):
                found.add(node.module)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = [_module_name(p) for p in SOURCES if _layer_of(_module_name(p)) is None]
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_imports_point_down(path: Path) -> None:
    module = _module_name(path)
    layer = _layer_of(module)
    assert layer is not None
    names = list(LAYERS)
    upward = sorted(
        f"{imported} ({names[target]})"
        for imported in _imports(path)
        if (target := _layer_of(imported)) is not None and target > layer
    )
    assert not upward, f"{module} ({names[layer]}) imports from a higher layer: {upward}"


def test_an_unplaced_module_is_seen() -> None:
    assert _layer_of("samvad.newthing") is None
    assert _layer_of("samvad") == 0


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The rule itself can fail: persistence importing the use cases is caught.
    source = tmp_path / "bad.py"
    source.write_text("from samvad.service import SessionService\nimport samvad.web.app\n")
    layers = list(LAYERS)
    imported = {_layer_of(name) for name in _imports(source)}
    assert imported == {layers.index("service"), layers.index("web")}
    assert max(i for i in imported if i is not None) > layers.index("persistence")
