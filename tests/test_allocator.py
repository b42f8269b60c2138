"""``samvad serve``'s memory allocator (samvad.allocator): which environment it
asks for, and a real ``samvad serve`` that runs in it under its own process id."""

from __future__ import annotations

import platform
from pathlib import Path

import httpx
import pytest

from samvad import allocator
from samvad.allocator import TUNED, describe, reexec, tuned_environ
from samvad.config import Settings
from samvad.errors import ConfigError
from tests.support.firestore import emulator_missing
from tests.support.serve import run_serve, start_serve


def on_linux(environ: dict[str, str]) -> dict[str, str] | None:
    """:func:`tuned_environ` on Linux with glibc 2.36 (the CI's Debian)."""
    return tuned_environ(environ, system="Linux", libc=("glibc", "2.36"))


def test_glibc_2_35_or_later_on_linux_gets_malloc_with_huge_pages() -> None:
    environ = on_linux({"LANG": "C.UTF-8"})
    assert environ == {
        "LANG": "C.UTF-8",
        "PYTHONMALLOC": "malloc",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    assert describe(environ) == "glibc malloc with transparent huge pages"


def test_other_tunables_are_kept_and_an_operators_hugetlb_wins() -> None:
    kept = on_linux({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept is not None
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    chosen = on_linux({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert chosen is not None
    assert chosen["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert describe(chosen) == "PYTHONMALLOC=malloc"


@pytest.mark.parametrize(
    ("environ", "system", "libc"),
    [
        ({"PYTHONMALLOC": "pymalloc"}, "Linux", ("glibc", "2.36")),  # the operator's choice
        ({"PYTHONMALLOC": "malloc"}, "Linux", ("glibc", "2.36")),  # already executed again
        ({}, "Linux", ("glibc", "2.34")),  # no hugetlb tunable yet
        ({}, "Linux", ("", "")),  # musl (Alpine): libc_ver() knows nothing
        ({}, "Darwin", ("", "")),
    ],
    ids=["pymalloc-chosen", "already-tuned", "old-glibc", "musl", "macos"],
)
def test_nothing_changes_where_it_does_not_apply(
    environ: dict[str, str], system: str, libc: tuple[str, str]
) -> None:
    assert tuned_environ(environ, system=system, libc=libc) is None


def test_reexec_says_why_it_did_not_and_the_server_runs_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert reexec("python") is None
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    reason = reexec("hugepages")
    assert reason is not None
    assert "PYTHONMALLOC" in reason
    monkeypatch.delenv("PYTHONMALLOC")
    monkeypatch.setattr(allocator, "tuned_environ", lambda environ: {"PYTHONMALLOC": "malloc"})

    def refuse(path: str, argv: object, environ: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("samvad.allocator.os.execve", refuse)
    reason = reexec("hugepages")
    assert reason is not None
    assert "Permission denied" in reason


def test_reexec_in_the_tuned_environment_already_is_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONMALLOC", "malloc")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert describe() == TUNED
    assert reexec("hugepages") is None


def test_the_setting_has_two_values_and_refuses_others() -> None:
    assert Settings.from_env({}).allocator == "python"
    assert Settings.from_env({"SAMVAD_ALLOCATOR": "HugePages"}).allocator == "hugepages"
    with pytest.raises(ConfigError, match="SAMVAD_ALLOCATOR"):
        Settings.from_env({"SAMVAD_ALLOCATOR": "jemalloc"})


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def test_serve_with_hugepages_runs_itself_again_under_the_same_pid(
    tmp_path: Path,
) -> None:
    if tuned_environ({}) is None:
        # CI runs on Debian (glibc 2.36): there, this fails rather than skips.
        emulator_missing(f"no glibc 2.35+ on Linux ({platform.system()}, {platform.libc_ver()})")
    served = start_serve(tmp_path, SAMVAD_STORE="memory", SAMVAD_ALLOCATOR="hugepages")
    try:
        # The process the test started is the one serving: exec kept its id,
        # so signals and kill -9 reach the server.
        environ = _environ_of(served.process.pid)
        assert environ["PYTHONMALLOC"] == "malloc"
        assert "glibc.malloc.hugetlb=1" in environ["GLIBC_TUNABLES"].split(":")
        assert httpx.post(
            served.url + "/api/session/u1/history", json={"role": "user", "content": "hi"}
        ).is_success
    finally:
        assert served.stop() == 0
    output = served.output()
    assert output.count("Memory allocator: glibc malloc with transparent huge pages") == 1
    assert output.count("Application startup complete") == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "PYTHONMALLOC=pymalloc"),
        ({"SAMVAD_ALLOCATOR": "python"}, "PYTHONMALLOC=pymalloc"),
        ({"SAMVAD_ALLOCATOR": "hugepages", "PYTHONMALLOC": "pymalloc"}, "PYTHONMALLOC=pymalloc"),
    ],
    ids=["default", "setting", "operator-environment-wins"],
)
def test_serve_keeps_pymalloc_when_asked(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    served = start_serve(tmp_path, **env)
    try:
        assert _environ_of(served.process.pid).get("PYTHONMALLOC") in (None, "pymalloc")
    finally:
        assert served.stop() == 0
    output = served.output()
    assert output.count(f"Memory allocator: {expected}") == 1
    asked = env.get("SAMVAD_ALLOCATOR") == "hugepages"
    assert ("SAMVAD_ALLOCATOR=hugepages not applied" in output) is asked


def test_a_bad_allocator_stops_serve_before_it_executes_anything(tmp_path: Path) -> None:
    result = run_serve(tmp_path, SAMVAD_ALLOCATOR="jemalloc")
    assert result.returncode == 2
    assert "SAMVAD_ALLOCATOR" in result.stderr
    assert "Traceback" not in result.stderr
