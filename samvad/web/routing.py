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
* a guard (a route that catches malformed paths, whatever their shape) is
  asked first, with its own ``matches``: when it matches, Starlette's loop
  decides.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from starlette.convertors import StringConvertor
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
    __slots__ = ("methods", "names", "route")

    def __init__(self, route: Route, names: tuple[str, ...]) -> None:
        self.route = route
        self.names = names
        self.methods: Collection[str] = route.methods or ()


class IndexedRouter(Router):
    """A :class:`~starlette.routing.Router` that finds its unambiguous routes in a dict.

    ``guards`` are routes (among ``routes``) that catch malformed paths of any
    shape; they are asked before the index is used.
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
        # Per parameter layout (positions of the parameters, segment count): the
        # literal segments -> the route.
        self._index: dict[tuple[int, tuple[int, ...]], dict[tuple[str, ...], _Entry]] = {}
        earlier: list[_Shape | None] = []
        for route in self.routes:
            found = _shape(route)
            if route in self.guards:
                continue
            if found is not None and isinstance(route, Route):
                shape, names = found
                if all(_disjoint(other, shape) for other in earlier):
                    params = tuple(i for i, seg in enumerate(shape) if seg is None)
                    literals = tuple(seg for seg in shape if seg is not None)
                    table = self._index.setdefault((len(shape), params), {})
                    table.setdefault(literals, _Entry(route, names))
            earlier.append(found[0] if found is not None else None)
        self._layouts = tuple(self._index.items())

    def lookup(self, scope: Scope) -> tuple[Route, dict[str, Any]] | None:
        """The route Starlette would match fully for this HTTP request, when
        the index knows it, with its path parameters; else None."""
        if scope.get("root_path"):
            return None  # Starlette strips it first: leave that to its loop
        segments = scope["path"].split("/")
        count = len(segments)
        for (length, params), table in self._layouts:
            if length != count:
                continue
            literals = tuple(seg for i, seg in enumerate(segments) if i not in params)
            entry = table.get(literals)
            if entry is None or scope["method"] not in entry.methods:
                continue
            values = [segments[i] for i in params]
            if not all(values):
                continue  # "[^/]+": an empty segment matches no parameter
            for guard in self.guards:
                if guard.matches(scope)[0] is not Match.NONE:
                    return None
            path_params = dict(scope.get("path_params", ()))
            path_params.update(zip(entry.names, values, strict=True))
            return entry.route, path_params
        return None

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = self.lookup(scope)
            if found is not None:
                route, path_params = found
                if "router" not in scope:
                    scope["router"] = self
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = path_params
                await route.app(scope, receive, send)
                return
        await super().app(scope, receive, send)
