"""A request's objects are freed by reference counting as it ends, not left in cycles for the
garbage collector: the request, the caller's context and the session. Left in a cycle (the
context kept in the ASGI scope referred back to the request), every authenticated request
left ~56 objects for the collector, whose passes then paused a node 13-32 ms every ~0.4 s
under load (bench/README B1)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from helpers import ConsoleForms, bearer, console_session, make_product, new_user

# the server's objects of a request: none of them may be freed only by the collector (the
# test client's own, httpx's Request among them, are not the server's)
REQUEST_TYPES = {"starlette.requests.Request", "corral.auth.deps.Ctx",
                 "corral.products.access.ProductCtx", "sqlalchemy.ext.asyncio.session.AsyncSession",
                 "sqlalchemy.orm.session.Session", "sqlalchemy.orm.session.SessionTransaction"}


def _name(o: Any) -> str:
    return f"{type(o).__module__}.{type(o).__qualname__}"


async def _garbage_of(run: Callable[[], Awaitable[None]]) -> Counter[str]:
    """The request objects left in cycles by ``run`` (run three times, after once to warm:
    caches filled, statements compiled)."""
    await run()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            await run()
        gc.collect()
        return Counter(name for name in map(_name, gc.garbage) if name in REQUEST_TYPES)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _api_calls(client: Any, calls: list[tuple[str, str, dict[str, Any] | None]],
               token: str) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        for method, path, body in calls:
            r = await client.request(method, path, headers=bearer(token), json=body)
            assert r.status_code < 500, (path, r.text)

    return run


async def test_requests_leave_nothing_for_the_garbage_collector(client: Any) -> None:
    token = await new_user(client, "ada@example.com")
    product = await make_product(client, token)
    slug = product["slug"]
    left = await _garbage_of(_api_calls(client, [
        ("GET", "/v1/user", None),
        ("GET", f"/v1/products/{slug}", None),
        ("GET", f"/v1/products/{slug}/team", None),
        ("GET", f"/v1/products/{slug}/devices", None),
        ("GET", "/v1/products/no-such-product", None),  # an error answer
        ("PUT", "/v1/user", {"account_info": {"first_name": "Ada"}}),  # a write
        ("GET", "/healthz", None),
    ], token))
    assert not left, left


async def test_console_pages_leave_nothing_for_the_garbage_collector(client: Any,
                                                                     app: Any) -> None:
    """The console keeps its context on ``request.state`` while the route runs; the route's
    end drops it (the state lives in the scope, and the context refers to the request)."""
    token = await new_user(client, "ada@example.com")
    slug = (await make_product(client, token))["slug"]
    forms = ConsoleForms(client, await console_session(app, "ada@example.com"))

    async def run() -> None:
        for path in ("/console/", f"/console/products/{slug}",
                     f"/console/products/{slug}/devices",
                     "/console/products/no-such-product"):  # an error page
            r = await forms.get(path)
            assert r.status_code < 500, (path, r.text)

    left = await _garbage_of(run)
    assert not left, left
