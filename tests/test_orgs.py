"""Organizations: list/create/get/rename/delete, the org team (roles, last Owner), tenancy."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from corral.accounts.service import issue_token
from corral.audit.models import AuditEntry
from corral.auth.models import Membership, User
from corral.orgs.models import Invitation, Organization
from corral.products.models import Product
from helpers import assert_error, bearer, make_org, new_user


async def add_member(app, org_id: int, username: str, role: str,
                     product_id: int | None = None) -> None:
    """Give an existing user a role directly (the invitation flow is tested elsewhere)."""
    async with app.state.sessionmaker() as db:
        user = (await db.execute(select(User).where(User.username == username))).scalar_one()
        db.add(Membership(user_id=user.id, org_id=org_id, product_id=product_id, role=role))
        await db.commit()


async def member_token(client, app, org: dict[str, Any], username: str, role: str) -> str:
    token = await new_user(client, username)
    await add_member(app, org["id"], username, role)
    return token


async def audit_actions(app, org_id: int) -> list[str]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(AuditEntry.action).where(
            AuditEntry.org_id == org_id).order_by(AuditEntry.id))).scalars())


async def team(client, token: str, org: str | int) -> dict[str, str]:
    r = await client.get(f"/v1/orgs/{org}/team", headers=bearer(token))
    assert r.status_code == 200, r.text
    return {m["username"]: m["role"]["name"] for m in r.json()["team"]}


# --- organizations ------------------------------------------------------------------------

async def test_list_orgs_starts_with_personal(client):
    tok = await new_user(client, "ada@example.com")
    r = await client.get("/v1/orgs", headers=bearer(tok))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    [org] = body["organizations"]
    assert org["personal"] is True and org["role"] == "Owner"
    assert set(org) == {"id", "name", "slug", "personal", "role", "created_at",
                        "subscription"}
    assert org["created_at"].endswith("Z")


async def test_create_get_rename(client, app):
    tok = await new_user(client, "ada@example.com")
    org = await make_org(client, tok, "Acme Inc")
    assert org["slug"] == "acme-inc" and org["personal"] is False and org["role"] == "Owner"

    r = await client.get("/v1/orgs", headers=bearer(tok))
    assert [o["slug"] for o in r.json()["organizations"]][1:] == ["acme-inc"]

    for key in (org["id"], "acme-inc", "ACME-INC"):
        r = await client.get(f"/v1/orgs/{key}", headers=bearer(tok))
        assert r.status_code == 200, r.text
        assert r.json()["organization"]["id"] == org["id"]

    # form-encoded works as well as JSON; the slug never changes
    r = await client.put("/v1/orgs/acme-inc", headers=bearer(tok), data={"name": "  Acme Corp "})
    assert r.status_code == 200, r.text
    renamed = r.json()["organization"]
    assert renamed["name"] == "Acme Corp" and renamed["slug"] == "acme-inc"
    r = await client.get(f"/v1/orgs/{org['id']}", headers=bearer(tok))
    assert r.json()["organization"]["name"] == "Acme Corp"

    # a second org with the same name gets its own slug
    other = await make_org(client, tok, "Acme Inc")
    assert other["slug"] != "acme-inc" and other["slug"].startswith("acme-inc-")
    assert await audit_actions(app, org["id"]) == ["org.created", "org.renamed"]


async def test_org_bad_input(client):
    tok = await new_user(client, "ada@example.com")
    h = bearer(tok)
    for body in ({}, {"name": ""}, {"name": "   "}, {"name": 5}, {"name": "x" * 101}):
        assert_error(await client.post("/v1/orgs", headers=h, json=body), 400)
    r = await client.post("/v1/orgs", headers={**h, "content-type": "application/json"},
                          content=b"{not json")
    assert_error(r, 400, "invalid_json")
    org = await make_org(client, tok)
    assert_error(await client.put(f"/v1/orgs/{org['slug']}", headers=h, json={}), 400)
    assert_error(await client.put(f"/v1/orgs/{org['slug']}", headers=h, json={"name": ["a"]}),
                 400)
    r = await client.get("/v1/orgs", headers=h)
    assert len(r.json()["organizations"]) == 2  # nothing half-created


async def test_needs_a_token_and_refuses_api_users(client, app):
    assert (await client.get("/v1/orgs")).status_code == 401
    assert (await client.post("/v1/orgs", json={"name": "x"})).status_code == 401
    async with app.state.sessionmaker() as db:
        bot = User(username="bot+abc@api.corral.local", kind="api", api_scopes=["devices:list"])
        db.add(bot)
        await db.flush()
        issued = issue_token(db, app.state.settings, user_id=bot.id, client="api-user",
                             expires_at=None, refresh=False)
        await db.commit()
    h = bearer(issued.access_token)
    for r in (await client.get("/v1/orgs", headers=h),
              await client.post("/v1/orgs", headers=h, json={"name": "Bots"}),
              await client.get("/v1/user/invitations", headers=h)):
        assert_error(r, 403, "unauthorized")


async def test_other_tenant_gets_404(client, app):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    org = await make_org(client, ada)
    h = bearer(bob)
    calls = [
        client.get(f"/v1/orgs/{org['slug']}", headers=h),
        client.put(f"/v1/orgs/{org['id']}", headers=h, json={"name": "Mine now"}),
        client.delete(f"/v1/orgs/{org['slug']}", headers=h),
        client.get(f"/v1/orgs/{org['slug']}/team", headers=h),
        client.post(f"/v1/orgs/{org['slug']}/team", headers=h,
                    json={"username": "bob@example.com", "role": "Owner"}),
        client.put(f"/v1/orgs/{org['slug']}/team/ada@example.com", headers=h,
                   json={"role": "View-only"}),
        client.delete(f"/v1/orgs/{org['slug']}/team/ada@example.com", headers=h),
        client.get(f"/v1/orgs/{org['slug']}/invitations", headers=h),
        client.get("/v1/orgs/no-such-org", headers=h),
    ]
    for call in calls:
        body = assert_error(await call, 404)
        assert body["error_description"] == "Organization not found"
    # a product-scope member of a product in the org is not an org member either
    async with app.state.sessionmaker() as db:
        p = Product(org_id=org["id"], name="Widget", name_key="widget", slug="widget")
        db.add(p)
        await db.commit()
        pid = p.id
    await add_member(app, org["id"], "bob@example.com", "Administrator", product_id=pid)
    assert_error(await client.get(f"/v1/orgs/{org['slug']}", headers=h), 404)
    r = await client.get("/v1/orgs", headers=h)
    assert [o["personal"] for o in r.json()["organizations"]] == [True]
    assert (await client.get(f"/v1/orgs/{org['slug']}", headers=bearer(ada))).json()[
        "organization"]["name"] == "Acme Inc"


async def test_roles_that_may_not_act_get_403(client, app):
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada)
    dev = await member_token(client, app, org, "dev@example.com", "Developer")
    admin = await member_token(client, app, org, "admin@example.com", "Administrator")
    slug = org["slug"]

    # a Developer reads but changes nothing
    r = await client.get(f"/v1/orgs/{slug}", headers=bearer(dev))
    assert r.status_code == 200 and r.json()["organization"]["role"] == "Developer"
    assert (await client.get(f"/v1/orgs/{slug}/team", headers=bearer(dev))).status_code == 200
    for call in (
        client.put(f"/v1/orgs/{slug}", headers=bearer(dev), json={"name": "Dev Co"}),
        client.delete(f"/v1/orgs/{slug}", headers=bearer(dev)),
        client.post(f"/v1/orgs/{slug}/team", headers=bearer(dev),
                    json={"username": "x@example.com", "role": "View-only"}),
        client.put(f"/v1/orgs/{slug}/team/dev@example.com", headers=bearer(dev),
                   json={"role": "Administrator"}),
        client.delete(f"/v1/orgs/{slug}/team/admin@example.com", headers=bearer(dev)),
        client.get(f"/v1/orgs/{slug}/invitations", headers=bearer(dev)),
    ):
        body = assert_error(await call, 403, "forbidden")
        assert body["required"]
    # an Administrator renames but may not delete the organization
    r = await client.put(f"/v1/orgs/{slug}", headers=bearer(admin), json={"name": "Admin Co"})
    assert r.status_code == 200, r.text
    assert_error(await client.delete(f"/v1/orgs/{slug}", headers=bearer(admin)), 403)
    assert (await client.get(f"/v1/orgs/{slug}", headers=bearer(ada))).status_code == 200


async def test_delete_org(client, app):
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada, "Doomed")
    await member_token(client, app, org, "bob@example.com", "Developer")
    r = await client.post(f"/v1/orgs/{org['slug']}/team", headers=bearer(ada),
                          json={"username": "carol@example.com", "role": "Support"})
    assert r.status_code == 200, r.text

    # products block the delete, with a clear message
    async with app.state.sessionmaker() as db:
        p = Product(org_id=org["id"], name="Widget", name_key="widget", slug="widget")
        db.add(p)
        await db.commit()
    body = assert_error(await client.delete(f"/v1/orgs/{org['slug']}", headers=bearer(ada)),
                        409, "has_products")
    assert "products" in body["error_description"]
    async with app.state.sessionmaker() as db:
        await db.delete(await db.get(Product, p.id))
        await db.commit()

    r = await client.delete(f"/v1/orgs/{org['slug']}", headers=bearer(ada))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert_error(await client.get(f"/v1/orgs/{org['slug']}", headers=bearer(ada)), 404)
    async with app.state.sessionmaker() as db:
        assert await db.get(Organization, org["id"]) is None
        left = (await db.execute(select(Membership).where(Membership.org_id == org["id"]))).all()
        invites = (await db.execute(select(Invitation).where(Invitation.org_id == org["id"])))
        assert left == [] and invites.all() == []
    assert (await audit_actions(app, org["id"]))[-1] == "org.deleted"

    # the personal organization cannot be deleted this way
    personal = (await client.get("/v1/orgs", headers=bearer(ada))).json()["organizations"][0]
    assert personal["personal"] is True
    assert_error(await client.delete(f"/v1/orgs/{personal['id']}", headers=bearer(ada)), 400,
                 "personal_org")


# --- the team ------------------------------------------------------------------------------

async def test_team_list_shape(client, app):
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada)
    await member_token(client, app, org, "bob@example.com", "View-only")
    r = await client.get(f"/v1/orgs/{org['slug']}/team", headers=bearer(ada))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    by_name = {m["username"]: m for m in body["team"]}
    assert set(by_name) == {"ada@example.com", "bob@example.com"}
    bob = by_name["bob@example.com"]
    assert bob["role"] == {"id": "view-only", "name": "View-only"}
    assert by_name["ada@example.com"]["role"] == {"id": "owner", "name": "Owner"}
    assert bob["no_mfa"] is True and bob["scim_provisioned"] is False
    assert bob["no_password"] is False and isinstance(bob["_id"], str)


async def test_change_roles(client, app):
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada)
    slug = org["slug"]
    admin = await member_token(client, app, org, "admin@example.com", "Administrator")
    await member_token(client, app, org, "dev@example.com", "Developer")

    # an Administrator grants up to Administrator (PUT and POST both work)
    r = await client.put(f"/v1/orgs/{slug}/team/dev@example.com", headers=bearer(admin),
                         json={"role": "Support"})
    assert r.status_code == 200, r.text
    assert r.json()["updated"] == {"username": "dev@example.com", "role": "Support"}
    r = await client.post(f"/v1/orgs/{slug}/team/DEV@example.com", headers=bearer(admin),
                          data={"role": "administrator"})
    assert r.status_code == 200, r.text
    assert (await team(client, ada, slug))["dev@example.com"] == "Administrator"

    # ...but neither grants nor takes away Owner
    body = assert_error(await client.put(f"/v1/orgs/{slug}/team/dev@example.com",
                                         headers=bearer(admin), json={"role": "Owner"}), 403)
    assert "Owner" in body["error_description"]
    assert_error(await client.put(f"/v1/orgs/{slug}/team/ada@example.com", headers=bearer(admin),
                                  json={"role": "View-only"}), 403)
    assert (await team(client, ada, slug))["ada@example.com"] == "Owner"

    # bad input and unknown members
    for role in ("", "Emperor", None, 3):
        assert_error(await client.put(f"/v1/orgs/{slug}/team/dev@example.com",
                                      headers=bearer(ada), json={"role": role}), 400,
                     "invalid_role")
    assert_error(await client.put(f"/v1/orgs/{slug}/team/nobody@example.com",
                                  headers=bearer(ada), json={"role": "Developer"}), 404)
    await new_user(client, "outside@example.com")
    assert_error(await client.put(f"/v1/orgs/{slug}/team/outside@example.com",
                                  headers=bearer(ada), json={"role": "Developer"}), 404)

    # the Owner makes another Owner
    r = await client.put(f"/v1/orgs/{slug}/team/dev@example.com", headers=bearer(ada),
                         json={"role": "Owner"})
    assert r.status_code == 200, r.text
    assert (await team(client, ada, slug))["dev@example.com"] == "Owner"
    actions = await audit_actions(app, org["id"])
    assert actions.count("team.role_changed") == 3


async def test_last_owner_is_kept(client, app):
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada)
    slug = org["slug"]
    body = assert_error(await client.put(f"/v1/orgs/{slug}/team/ada@example.com",
                                         headers=bearer(ada), json={"role": "Administrator"}),
                        409, "last_owner")
    assert "at least one Owner" in body["error_description"]
    assert_error(await client.delete(f"/v1/orgs/{slug}/team/ada@example.com",
                                     headers=bearer(ada)), 409, "last_owner")

    # with a second Owner, the first may step down, then the second is the last one
    bob = await member_token(client, app, org, "bob@example.com", "Owner")
    r = await client.put(f"/v1/orgs/{slug}/team/ada@example.com", headers=bearer(ada),
                         json={"role": "Administrator"})
    assert r.status_code == 200, r.text
    assert_error(await client.delete(f"/v1/orgs/{slug}/team/bob@example.com",
                                     headers=bearer(bob)), 409, "last_owner")
    assert (await team(client, bob, slug)) == {"ada@example.com": "Administrator",
                                               "bob@example.com": "Owner"}


async def test_remove_member(client, app):
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada)
    slug = org["slug"]
    admin = await member_token(client, app, org, "admin@example.com", "Administrator")
    dev = await member_token(client, app, org, "dev@example.com", "Developer")
    assert (await client.get(f"/v1/orgs/{slug}", headers=bearer(dev))).status_code == 200

    r = await client.delete(f"/v1/orgs/{slug}/team/dev@example.com", headers=bearer(admin))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert "dev@example.com" not in await team(client, ada, slug)
    # the removed member no longer sees the organization
    assert_error(await client.get(f"/v1/orgs/{slug}", headers=bearer(dev)), 404)
    assert_error(await client.delete(f"/v1/orgs/{slug}/team/dev@example.com",
                                     headers=bearer(admin)), 404)
    # an Administrator may not remove an Owner
    assert_error(await client.delete(f"/v1/orgs/{slug}/team/ada@example.com",
                                     headers=bearer(admin)), 403, "forbidden")
    # the Owner removes the Administrator
    r = await client.delete(f"/v1/orgs/{slug}/team/admin@example.com", headers=bearer(ada))
    assert r.status_code == 200, r.text
    assert await team(client, ada, slug) == {"ada@example.com": "Owner"}
    assert (await audit_actions(app, org["id"])).count("team.removed") == 2


async def test_org_slugs_take_the_smallest_free_suffix(client):
    """Organizations and products share one slug rule: ``name``, then ``name-2``, ``name-3``."""
    from helpers import bearer, new_user

    token = await new_user(client, "slugs@example.com")
    slugs = []
    for _ in range(3):
        r = await client.post("/v1/orgs", json={"name": "Acme Labs"}, headers=bearer(token))
        assert r.status_code == 201, r.text
        slugs.append(r.json()["organization"]["slug"])
    assert slugs == ["acme-labs", "acme-labs-2", "acme-labs-3"]
