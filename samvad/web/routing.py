"""Starlette's router with a dictionary in front of it.

Starlette matches a request against its routes one by one (a regular
expression each) until one matches; ``GET /api/session/{userId}/state`` came
after ten others. :class:`IndexedRouter` answers the routes it can prove
unambiguous with one dictionary lookup on the path's shape, and leaves every
other request — and every request whose method the route does not take (405),
so the ``Allow`` header and partial matches stay Starlette's — to Starlette's
own loop. What it picks is what Starlette's loop would have picked:

* a route is indexed only if it is a plain :class:`~starlette.routing.Route`
  whose parameters are whole path segments of the ``str`` type, and every
  route before it either can never match the same path (a different number of
  segments, or a different literal in some segment) or is a *guard*;
* a guard (a route that catches percent-encoded trouble in paths, whatever
  their shape) is asked first, with its own ``matches``, whenever the raw path
  has a ``%``: when it matches, Starlette's loop decides.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection, Sequence
from operator import itemgetter
from typing import Any

from starlette.convertors import StringConvertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Receive, Scope, Send

__all__ = ["IndexedRouter"]

# One segment of a route template: a literal, or None for a parameter.
_Shape = tuple[str | None, ...]


def _shape(route: BaseRoute) -> tuple[_Shape, tuple[str, ...]] | None:
    """The segments of a route's path (None for a parameter) and its parameter
    names, or None when the route is not a plain one with whole-segment ``str``
    parameters."""
    if type(route) is not Route:
        return None
    segments: list[str | None] = []
    names: list[str] = []
    for part in route.path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            convertor = route.param_convertors.get(name)
            if not isinstance(convertor, StringConvertor):
                return None
            segments.append(None)
            names.append(name)
        elif "{" in part or "}" in part:
            return None
        else:
            segments.append(part)
    return tuple(segments), tuple(names)


def _disjoint(a: _Shape | None, b: _Shape) -> bool:
    """Whether no path can match both shapes (None: a route of unknown shape)."""
    if a is None:
        return False
    if len(a) != len(b):
        return True
    return any(x is not None and y is not None and x != y for x, y in zip(a, b, strict=True))


class _Entry:
    __slots__ = ("endpoint", "methods", "names", "route")

    def __init__(self, route: Route, names: tuple[str, ...]) -> None:
        self.route = route
        self.names = names
        self.methods: Collection[str] = route.methods or ()
        # A plain ``async def endpoint(request)`` route (no route middleware) is
        # called directly: ``request_response`` would only wrap it in a second
        # copy of the exception handling the app's ExceptionMiddleware applies.
        plain = getattr(route.app, "__qualname__", None) == "request_response.<locals>.app"
        self.endpoint: Callable[[Request], Awaitable[Response]] | None = (
            route.endpoint if plain and inspect.iscoroutinefunction(route.endpoint) else None
        )


class _Layout:
    """Routes with the same number of segments and parameters in the same places."""

    __slots__ = ("literals", "params", "table")

    def __init__(self, shape: _Shape) -> None:
        literal_at = [i for i, seg in enumerate(shape) if seg is not None]
        param_at = [i for i, seg in enumerate(shape) if seg is None]
        # Picks the literal segments / the parameters out of a split path, as tuples.
        self.literals: Callable[[Sequence[str | None]], Any] = _picker(literal_at)
        self.params: Callable[[Sequence[str]], tuple[str, ...]] = _picker(param_at)
        self.table: dict[Any, _Entry] = {}


def _picker(positions: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    if not positions:
        return lambda _segments: ()
    if len(positions) == 1:
        (only,) = positions
        return lambda segments: (segments[only],)
    getter: Callable[[Sequence[Any]], tuple[Any, ...]] = itemgetter(*positions)
    return getter


class IndexedRouter(Router):
    """A :class:`~starlette.routing.Router` that finds its unambiguous routes in a dict.

    ``guards`` are routes (among ``routes``) that catch paths whose raw bytes
    hold what the decoded path hides (an encoded ``/``, escapes that are not
    UTF-8): they are asked, before the index answers, for every path whose raw
    form has a ``%``. (Without one the raw path is the path, and the index
    already refuses the empty segments such a guard also catches.)
    """

    def __init__(
        self,
        routes: Sequence[BaseRoute],
        *,
        guards: Sequence[BaseRoute] = (),
        lifespan: Any = None,
    ) -> None:
        super().__init__(routes, lifespan=lifespan)
        self.guards = tuple(guards)
        # Segment count -> the layouts (where the parameters are) of that length.
        self._layouts: dict[int, list[_Layout]] = {}
        layouts: dict[tuple[int, ...], _Layout] = {}
        earlier: list[_Shape | None] = []
        for route in self.routes:
            found = _shape(route)
            if route in self.guards:
                continue
            if found is not None and isinstance(route, Route):
                shape, names = found
                if all(_disjoint(other, shape) for other in earlier):
                    params = tuple(i for i, seg in enumerate(shape) if seg is None)
                    layout = layouts.get((len(shape), *params))
                    if layout is None:
                        layout = layouts[(len(shape), *params)] = _Layout(shape)
                        self._layouts.setdefault(len(shape), []).append(layout)
                    layout.table.setdefault(layout.literals(shape), _Entry(route, names))
            earlier.append(found[0] if found is not None else None)

    def lookup(self, scope: Scope) -> tuple[Route, dict[str, Any]] | None:
        """The route Starlette would match fully for this HTTP request, when
        the index knows it, with its path parameters; else None."""
        found = self._find(scope)
        return (found[0].route, found[1]) if found is not None else None

    def _find(self, scope: Scope) -> tuple[_Entry, dict[str, Any]] | None:
        if scope.get("root_path"):
            return None  # Starlette strips it first: leave that to its loop
        segments = scope["path"].split("/")
        layouts = self._layouts.get(len(segments))
        if layouts is None:
            return None
        method = scope["method"]
        for layout in layouts:
            entry = layout.table.get(layout.literals(segments))
            if entry is None or method not in entry.methods:
                continue
            values = layout.params(segments)
            if not all(values):
                continue  # "[^/]+": an empty segment matches no parameter
            if self.guards:
                raw = scope.get("raw_path")
                if raw is None or b"%" in raw:
                    for guard in self.guards:
                        if guard.matches(scope)[0] is not Match.NONE:
                            return None
            # Same lengths by construction (both from the layout's shape).
            found = dict(zip(entry.names, values, strict=False))
            given = scope.get("path_params")
            return entry, {**given, **found} if given else found
        return None

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = self._find(scope)
            if found is not None:
                entry, path_params = found
                route = entry.route
                if "router" not in scope:
                    scope["router"] = self
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = path_params
                if entry.endpoint is None:
                    await route.app(scope, receive, send)
                    return
                response = await entry.endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().app(scope, receive, send)
