"""The memory allocator ``samvad serve`` runs with (``SAMVAD_ALLOCATOR``).

``python`` (the default) is CPython's own, pymalloc. It takes memory from the
system in 1 MiB arenas and hands an arena back as soon as it empties, so
memory that a server frees and takes again (the write-behind's backlog fills
for a flush interval and is freed once written) comes back as fresh pages, a
page fault each. On a virtual machine such a fault is dear: on the
development machines (KVM guests) the service turn faulted about 6,000 times
in 25,000 turns, and its p99 was 2 to 3 times its median
(docs/benchmarks.md, section 30).

``hugepages`` runs the server with ``PYTHONMALLOC=malloc`` and
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: every allocation through glibc's
malloc, which asks for transparent huge pages (2 MiB) for its heap and keeps
freed memory for reuse. There the same turns faulted 15 times and the
turn's p99 went from 167-237 to 129-135 us, its median unchanged. It is not
the default because it costs elsewhere, measured the same day: a REST
append to a full history took 5 to 20 % more CPU (glibc's malloc itself
costs about 25 %, and the huge pages win back about half), a cached user
about 15 % more memory and an idle connection up to 4 KiB more, while the
WebSocket message cost the same. A deployment that
cares for the turn's tail more than for REST throughput chooses it.

Both variables are read by the interpreter and the C library as the process
starts, so ``samvad serve`` sets them by executing itself again, once, with
the same process id and arguments (:func:`reexec`). It does nothing where
they do not apply (not Linux, or not glibc 2.35 or later) and leaves alone an
environment that sets ``PYTHONMALLOC`` already: an operator's choice wins.
Where transparent huge pages are off (``never``), glibc's malloc is used
without them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

from samvad.config import Allocator

__all__ = [
    "HUGE_PAGES_TUNABLE",
    "TUNED",
    "describe",
    "reexec",
    "tuned_environ",
]

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"

#: What :func:`describe` says of the ``hugepages`` allocator.
TUNED = "glibc malloc with transparent huge pages"

# glibc.malloc.hugetlb arrived in glibc 2.35; older ones ignore unknown tunables.
_MIN_GLIBC = (2, 35)


def _glibc_version(libc: tuple[str, str]) -> tuple[int, int] | None:
    name, version = libc
    if name != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def tuned_environ(
    environ: Mapping[str, str],
    *,
    system: str | None = None,
    libc: tuple[str, str] | None = None,
) -> dict[str, str] | None:
    """The environment to run the server in for the ``hugepages`` allocator,
    or None when ``environ`` is already it, names ``PYTHONMALLOC`` itself, or
    the platform has no use for it (``system`` and ``libc`` as
    :func:`platform.system` and :func:`platform.libc_ver` give them)."""
    system = platform.system() if system is None else system
    libc = platform.libc_ver() if libc is None else libc
    if system != "Linux":
        return None
    version = _glibc_version(libc)
    if version is None or version < _MIN_GLIBC:
        return None
    if environ.get("PYTHONMALLOC"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    names = {item.partition("=")[0] for item in tunables.split(":") if item}
    if HUGE_PAGES_TUNABLE not in names:
        tunables = f"{tunables}:{HUGE_PAGES_TUNABLE}=1" if tunables else f"{HUGE_PAGES_TUNABLE}=1"
    return {**environ, "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": tunables}


def reexec(allocator: Allocator) -> str | None:
    """Execute this program again in :func:`tuned_environ`'s environment, when
    ``allocator`` is ``hugepages`` and that environment differs. The process
    id, arguments and open descriptors stay.

    Returns (without executing anything) why it did not, when ``hugepages``
    was asked for and this process is not already in it; None otherwise. A
    failed ``execve`` is such a reason: the server then runs as it is.
    """
    if allocator != "hugepages":
        return None
    environ = tuned_environ(os.environ)
    if environ is None:
        if describe() == TUNED:
            return None
        if os.environ.get("PYTHONMALLOC"):
            # The operator's; or ours, with an operator's glibc.malloc.hugetlb kept.
            return f"the environment sets PYTHONMALLOC (running with {describe()})"
        libc = " ".join(platform.libc_ver()).strip() or "no glibc"
        return f"it needs Linux with glibc 2.35+ (this is {platform.system()}, {libc})"
    if not sys.executable or not sys.orig_argv:
        return "this interpreter does not know its own executable"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError as exc:
        return f"executing {sys.executable} again failed ({exc.strerror or exc})"
    return None  # pragma: no cover - execve does not return


def describe(environ: Mapping[str, str] | None = None) -> str:
    """What this process allocates with, for the start-up log."""
    environ = os.environ if environ is None else environ
    malloc = environ.get("PYTHONMALLOC") or "pymalloc"
    tunables = environ.get("GLIBC_TUNABLES", "")
    huge = any(item == f"{HUGE_PAGES_TUNABLE}=1" for item in tunables.split(":"))
    if malloc == "malloc" and huge:
        return TUNED
    return f"PYTHONMALLOC={malloc}"
