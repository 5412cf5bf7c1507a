"""The request transaction commits what was written (ORM or core DML) and skips the COMMIT
round trip for read-only requests."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import select, update

from corral.auth.deps import Db, auth_ctx, optional_ctx, public_ctx
from corral.auth.guards import Guard
from corral.auth.models import User
from corral.db.session import TransactionRoute, get_db
from corral.kit.errors import BadRequest
from corral.web import errors
from helpers import api_routes, console_session, new_user


async def test_write_flags(app, client):
    await new_user(client, "flag@example.com")
    async with app.state.sessionmaker() as db:
        await db.execute(select(User))
        assert not db.info.get("wrote")
        await db.execute(update(User).values(first_name="Core"))  # core DML through the session
        assert db.info.get("wrote")
        await db.rollback()
    async with app.state.sessionmaker() as db:
        user = (await db.execute(select(User))).scalars().first()
        user.last_name = "Orm"
        await db.flush()
        assert db.info.get("wrote")


async def test_core_update_in_a_request_is_committed(client):
    """The token endpoint's lockout bookkeeping and every route write survive the request."""
    token = await new_user(client, "persist@example.com")
    h = {"Authorization": f"Bearer {token}"}
    r = await client.put("/v1/user", headers=h, json={"account_info": {"first_name": "Kept"}})
    assert r.status_code == 200
    assert (await client.get("/v1/user", headers=h)).json()["account_info"]["first_name"] == "Kept"


# dependencies that take the request's session by calling get_db themselves (not a node of
# the route's dependency tree: corral.auth.deps.optional_ctx says why), and the guards, which
# call auth_ctx
_CALLS_GET_DB = (get_db, optional_ctx, auth_ctx, public_ctx)


def _takes_session(dependant: Any) -> bool:
    return any(d.call in _CALLS_GET_DB or isinstance(d.call, Guard) or _takes_session(d)
               for d in dependant.dependencies)


async def test_every_route_taking_the_session_ends_it(app):
    """A route that takes the request's session without a TransactionRoute would leave its
    connection checked out: every such route of the app (API and console) has the class."""
    routes = [r for r in api_routes(app.routes) if _takes_session(r.dependant)]
    assert len(routes) > 300
    assert [r.path for r in routes if not isinstance(r, TransactionRoute)] == []


def _probe_app(sessionmaker: Any, route_class: type[APIRoute]) -> FastAPI:
    probe = FastAPI()
    probe.state.sessionmaker = sessionmaker
    router = APIRouter(route_class=route_class)

    @router.post("/write")
    async def write(db: Db, fail: bool = False) -> dict[str, Any]:
        await db.execute(update(User).values(first_name="Probe"))
        if fail:
            raise BadRequest("refused after writing")
        return {"ok": True}

    probe.include_router(router)
    errors.install(probe)
    return probe


async def test_transaction_route_commits_rolls_back_and_returns_the_connection(app, client):
    await new_user(client, "probe@example.com")
    pool = app.state.runtime.engine.sync_engine.pool
    probe = _probe_app(app.state.sessionmaker, TransactionRoute)
    transport = httpx.ASGITransport(app=probe)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as c:
        r = await c.post("/write", params={"fail": "true"})
        assert r.status_code == 400
        assert pool.checkedout() == 0
        async with app.state.sessionmaker() as db:  # the write before the error is gone
            assert (await db.execute(select(User.first_name))).scalar() != "Probe"
        assert (await c.post("/write")).status_code == 200
        assert pool.checkedout() == 0
        async with app.state.sessionmaker() as db:
            assert (await db.execute(select(User.first_name))).scalar() == "Probe"


async def test_a_plain_route_taking_the_session_is_refused(app):
    probe = _probe_app(app.state.sessionmaker, APIRoute)
    transport = httpx.ASGITransport(app=probe, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as c:
        with pytest.raises(RuntimeError, match="TransactionRoute"):
            await c.post("/write")
    assert app.state.runtime.engine.sync_engine.pool.checkedout() == 0


async def test_a_console_error_page_returns_its_connections(app, client):
    """A console page that fails (a product that does not exist) is rendered in a fresh
    session after the request's was rolled back and closed; the layout of who is signed in
    must read through that fresh session, not reopen the closed one. Reopened, its
    connection stayed checked out in an open transaction, and on PostgreSQL the next test's
    TRUNCATE waited for it for ever (the CI's PostgreSQL pass hung)."""
    await new_user(client, "pages@example.com")
    token = await console_session(app, "pages@example.com")
    pool = app.state.runtime.engine.sync_engine.pool
    r = await client.get("/console/products/no-such-product",
                         headers={"Cookie": f"corral_session={token}"})
    assert r.status_code == 404 and "pages@example.com" in r.text  # the signed-in layout
    assert pool.checkedout() == 0
