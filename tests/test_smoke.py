from helpers import bearer, new_user


async def test_signup_login_whoami(client):
    token = await new_user(client, "ada@example.com")
    assert len(token) == 40 and all(c in "0123456789abcdef" for c in token)
    r = await client.get("/v1/user", headers=bearer(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["username"] == "ada@example.com"
    assert [o["personal"] for o in body["orgs"]] == [True]


async def test_health_and_metrics(client):
    assert (await client.get("/healthz")).json()["ok"] is True
    r = await client.get("/metrics")
    assert r.status_code == 200 and "corral_http_requests_total" in r.text


async def test_user_lists_orgs_with_subscriptions_in_one_statement(client, app):
    """GET /v1/user: the caller's organizations by id, each with its subscription's plan and
    status or null, read in one statement with the user (plus the session's end)."""
    from sqlalchemy import event

    from corral.billing.models import Subscription
    from helpers import add_member, make_org

    token = await new_user(client, "ada@example.com")
    other = await new_user(client, "bob@example.com")
    acme = await make_org(client, token, "Acme Inc")
    bobs = await make_org(client, other, "Bob Co")
    await add_member(app, "ada@example.com", org_id=bobs["id"], product_id=None, role="viewer")
    async with app.state.sessionmaker() as db:
        db.add(Subscription(org_id=acme["id"], plan_code="basic", interval="month",
                            currency="usd", status="active", provider="fake"))
        await db.commit()
    sent: list[str] = []
    engine = app.state.runtime.engine.sync_engine

    def seen(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        r = await client.get("/v1/user", headers=bearer(token))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert r.status_code == 200, r.text
    orgs = r.json()["orgs"]
    assert [o["name"] for o in orgs] == [o["name"] for o in sorted(orgs, key=lambda o: o["id"])]
    by_slug = {o["slug"]: o for o in orgs}
    assert set(by_slug) >= {acme["slug"], bobs["slug"]} and len(orgs) == 3
    assert by_slug[acme["slug"]]["subscription"] == {"plan": "basic", "status": "active"}
    assert by_slug[bobs["slug"]]["subscription"] is None
    assert [o["personal"] for o in orgs].count(True) == 1
    assert len([s for s in sent if s.lstrip().upper().startswith("SELECT")]) == 1, sent
