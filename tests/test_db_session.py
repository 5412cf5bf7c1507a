"""The request transaction commits what was written (ORM or core DML) and skips the COMMIT
round trip for read-only requests."""

from __future__ import annotations

from sqlalchemy import select, update

from corral.auth.models import User
from helpers import new_user


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
