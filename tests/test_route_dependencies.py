"""Every dependency of every route is a coroutine: FastAPI runs a plain function on its
thread pool, a thread hand-off on every request (the query readers did: bench/README B1)."""

from __future__ import annotations

import inspect
from typing import Any

from helpers import api_routes


def _runs_on_the_loop(call: Any) -> bool:
    if inspect.isclass(call):  # its __init__ runs as a plain function
        return False
    fn = call if inspect.isroutine(call) else call.__call__
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _plain(dependant: Any, path: str) -> list[str]:
    found: list[str] = []
    for sub in dependant.dependencies:
        if sub.call is not None and not _runs_on_the_loop(sub.call):
            found.append(f"{path}: {getattr(sub.call, '__qualname__', sub.call)}")
        found += _plain(sub, path)
    return found


async def test_no_route_runs_a_dependency_on_the_thread_pool(app: Any) -> None:
    routes = api_routes(app.routes)
    assert len(routes) > 400
    plain = [p for r in routes for p in _plain(r.dependant, f"{sorted(r.methods)} {r.path}")]
    assert plain == []
    assert [r.path for r in routes if not inspect.iscoroutinefunction(r.endpoint)] == []
