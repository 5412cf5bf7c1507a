"""The routers' path gates (corral.web.routing) skip work, never change an answer: for every
route of the app, its path with sample values (and with a trailing slash, and an unknown
tail) in every method, each gated router answers exactly what FastAPI's own matching
answers; and the requests behind the gates still reach their routes over HTTP."""

from __future__ import annotations

import re

from fastapi.routing import _IncludedRouter
from starlette.routing import BaseRoute

from corral.web.routing import GatedInclusion, path_gate
from helpers import bearer, new_user

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PARAM = re.compile(r"{([^}:]+)(?::([a-z]+))?}")


def sample(path_format: str) -> str:
    def value(m: re.Match[str]) -> str:
        return {"int": "7", "path": "a/b.txt", "float": "1.5"}.get(m.group(2) or "", "x1f")
    return PARAM.sub(value, path_format)


def leaves(routes: list[BaseRoute]) -> list[str]:
    paths: list[str] = []
    for route in routes:
        if isinstance(route, _IncludedRouter):
            paths += [route.include_context.prefix + p
                      for p in leaves(route.original_router.routes)]
        elif isinstance(getattr(route, "path_format", None), str):
            paths.append(route.path_format)  # type: ignore[attr-defined]
    return paths


def scope(path: str, method: str) -> dict:
    return {"type": "http", "path": path, "method": method, "root_path": "", "headers": [],
            "query_string": b""}


def test_every_included_router_is_gated_and_answers_as_without_its_gate(app):
    gated = [r for r in app.router.routes if isinstance(r, GatedInclusion)]
    included = [r for r in app.router.routes if isinstance(r, _IncludedRouter)]
    assert gated and len(gated) == len(included)  # the API's routers and the console's
    assert all(r._gate() is not None for r in gated)
    paths = {sample(p) for p in leaves(app.router.routes)}
    paths |= {p + "/" for p in paths} | {p + "/nothing/here" for p in paths} | {"/", "/nope"}
    skipped = 0
    for path in sorted(paths):
        for method in METHODS:
            s = scope(path, method)
            for route in gated:
                got = route.matches(dict(s))
                want = _IncludedRouter.matches(route, dict(s))
                assert got[0] == want[0], (path, method, route.original_router.routes[0])
                skipped += route._gate().match(path) is None
    assert skipped > len(paths) * len(METHODS) * (len(gated) - 3)  # most routers skipped


def test_a_route_added_after_the_gate_was_built_is_reached():
    from fastapi import APIRouter, FastAPI

    from corral.web.routing import gate

    app, router = FastAPI(), APIRouter()
    router.add_api_route("/a", lambda: 1)
    app.include_router(router)
    assert gate(app) == 1
    [inclusion] = [r for r in app.router.routes if isinstance(r, GatedInclusion)]
    assert inclusion.matches(scope("/b", "GET"))[0].name == "NONE"
    router.add_api_route("/b", lambda: 2)
    assert inclusion.matches(scope("/b", "GET"))[0].name == "FULL"


def test_a_gate_refuses_what_it_cannot_summarize():
    class Odd(BaseRoute):
        pass

    assert path_gate([]) is None
    assert path_gate([Odd()]) is None


async def test_routes_behind_the_gates_still_answer(client):
    """An early route, a late one (a device function, mounted after every other device
    route), health, and a path no route has, over HTTP."""
    auth_headers = bearer(await new_user(client, "gate@example.com"))
    r = await client.get("/v1/user", headers=auth_headers)
    assert r.status_code == 200
    r = await client.post("/v1/devices/0123456789abcdef01234567/led", headers=auth_headers,
                          json={"arg": "on"})
    assert r.status_code == 404  # reached the device guard: no such device
    assert r.json()["error_description"] == "Device not found"
    r = await client.get("/healthz")
    assert r.status_code == 200
    r = await client.get("/v1/definitely/not/a/route", headers=auth_headers)
    assert r.status_code == 404
    assert r.json()["error_description"] == "Unknown API endpoint"
