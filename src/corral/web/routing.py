"""Routing that skips a whole included router with one regex test.

FastAPI matches a request by walking the app's routes in order; an included router is
walked route by route, each test costing a few µs of route-context bookkeeping. corral
includes ~40 routers (the API's domains, then the console), and some hot routes come late on
purpose: a device's functions and variables (``/v1/devices/{id}/{function}``) are mounted
after every other ``/v1/devices/{id}/...`` route so that none of them can be shadowed, and
``/healthz`` after the console. Each such request walked ~270 routes (~1 ms of CPU).

:func:`gate` gives each included router a path gate: one compiled alternation of the path
patterns of every route it holds. A path no route of the router can match (in any method)
skips the router in one ``re.match``; any other path goes through FastAPI's own matching,
so which route answers, 405s (a path that matches with another method) and redirects are
unchanged (tests/test_routing_gate.py checks every route of the app).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.routing import _IncludedRouter
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

_NAMED_GROUP = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


def path_gate(routes: list[BaseRoute], prefix: str = "") -> re.Pattern[str] | None:
    """One pattern matching every path one of ``routes`` (under ``prefix``) can match, or
    None when a route cannot be summarized that way (a nested include, a route without a
    path pattern): then there is no gate."""
    patterns = []
    for route in routes:
        regex = getattr(route, "path_regex", None)
        if isinstance(route, _IncludedRouter) or not isinstance(regex, re.Pattern):
            return None
        body = regex.pattern
        if not (body.startswith("^") and body.endswith("$")):
            return None
        # group names repeat across routes; the gate only needs the shape
        patterns.append(f"(?:{re.escape(prefix)}{_NAMED_GROUP.sub('(?:', body[1:-1])})")
    if not patterns:
        return None
    return re.compile(f"^(?:{'|'.join(patterns)})$")


class GatedInclusion(_IncludedRouter):
    """An included router that answers ``Match.NONE`` at once for a path its gate rules
    out, and otherwise matches exactly as FastAPI does."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] in ("http", "websocket"):
            gate = self._gate()
            if gate is not None and gate.match(get_route_path(scope)) is None:
                return Match.NONE, {}
        return super().matches(scope)

    def _gate(self) -> re.Pattern[str] | None:
        # the router's own change counter: a gate exists only for a router without nested
        # includes, and including one into it counts as a change too
        version = self.original_router._routes_version
        cached: tuple[int, re.Pattern[str] | None] | None = self.__dict__.get("_corral_gate")
        if cached is None or cached[0] != version:  # routes added since: summarize again
            cached = (version, path_gate(self.original_router.routes,
                                         self.include_context.prefix))
            self.__dict__["_corral_gate"] = cached
        return cached[1]


def gate(app: FastAPI) -> int:
    """Give every router included in ``app`` so far a path gate; returns how many."""
    routes: list[Any] = app.router.routes
    gated = 0
    for i, route in enumerate(routes):
        if type(route) is _IncludedRouter:
            routes[i] = GatedInclusion(original_router=route.original_router,
                                       include_context=route.include_context)
            gated += 1
    if gated:
        app.router._mark_routes_changed()
    return gated
