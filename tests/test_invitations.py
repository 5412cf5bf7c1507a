"""Invitations: invite -> e-mail -> accept/decline/revoke/expire, and the shared team service."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.auth.models import Membership, User
from corral.auth.policy import Role
from corral.auth.subject import Subject
from corral.kit.errors import BadRequest, Conflict, Forbidden, NotFound
from corral.mail.models import OutboxMail
from corral.orgs import service
from corral.orgs.models import Invitation, Organization
from corral.products.models import Product
from helpers import assert_error, bearer, make_org, new_user

CODE = re.compile(r"invitation code: ([0-9a-f]{40})")


async def invite(client, token: str, org: str, username: str, role: str | None = "Developer",
                 **extra: Any) -> dict[str, Any]:
    body = {"username": username, **extra}
    if role is not None:
        body["role"] = role
    r = await client.post(f"/v1/orgs/{org}/team", headers=bearer(token), json=body)
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True
    return r.json()["invited"]


async def delivered(app, mailbox, to: str) -> list[tuple[str, str, str]]:
    await app.state.runtime.mailer.deliver_due()
    return [m for m in mailbox.sent if m[0] == to]


async def code_for(app, mailbox, to: str) -> str:
    sent = await delivered(app, mailbox, to)
    assert sent, f"no mail to {to}"
    m = CODE.search(sent[-1][2])
    assert m, sent[-1][2]
    return m.group(1)


async def my_invitations(client, token: str) -> list[dict[str, Any]]:
    r = await client.get("/v1/user/invitations", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["invitations"]


async def team(client, token: str, org: str) -> dict[str, str]:
    r = await client.get(f"/v1/orgs/{org}/team", headers=bearer(token))
    assert r.status_code == 200, r.text
    return {m["username"]: m["role"]["name"] for m in r.json()["team"]}


async def actions(app) -> list[str]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(AuditEntry.action).order_by(AuditEntry.id)))
                    .scalars())


async def outbox_count(app) -> int:
    async with app.state.sessionmaker() as db:
        return (await db.execute(select(func.count()).select_from(OutboxMail))).scalar_one()


# --- invite and e-mail ----------------------------------------------------------------------

async def test_invite_writes_mail_and_accept_by_id(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    org = await make_org(client, ada, "Acme Inc")
    invited = await invite(client, ada, org["slug"], "Bob@Example.com", "Developer")
    assert invited["username"] == "bob@example.com" and invited["role"] == "Developer"
    assert isinstance(invited["id"], int)
    # an invitation, not a membership
    assert "bob@example.com" not in await team(client, ada, org["slug"])

    [(_to, subject, body)] = await delivered(app, mailbox, "bob@example.com")
    assert "Acme Inc" in subject
    public = app.state.settings.resolved_public_url()
    assert f"{public}/v1/invitations/accept" in body
    assert f"/v1/user/invitations/{invited['id']}/accept" in body
    code = CODE.search(body).group(1)
    async with app.state.sessionmaker() as db:
        inv = await db.get(Invitation, invited["id"])
        assert inv.code_hash != code and len(inv.code_hash) == 64  # stored hashed
        kinds = (await db.execute(select(OutboxMail.kind))).scalars().all()
        assert list(kinds) == ["org.invite"]

    # the org sees it pending; the invitee sees it with names spelled out
    r = await client.get(f"/v1/orgs/{org['slug']}/invitations", headers=bearer(ada))
    assert r.status_code == 200, r.text
    [pending] = r.json()["invitations"]
    assert pending["id"] == invited["id"] and pending["status"] == "pending"
    [mine] = await my_invitations(client, bob)
    assert mine["organization"] == {"id": org["id"], "name": "Acme Inc", "slug": "acme-inc"}
    assert mine["product"] is None and mine["invited_by"] == "ada@example.com"
    assert mine["role"] == "Developer" and mine["expired"] is False
    assert await my_invitations(client, ada) == []  # not addressed to ada

    r = await client.post(f"/v1/user/invitations/{invited['id']}/accept", headers=bearer(bob))
    assert r.status_code == 200, r.text
    assert r.json()["membership"] == {"org_id": org["id"], "product_id": None,
                                      "role": "Developer"}
    assert (await team(client, ada, org["slug"]))["bob@example.com"] == "Developer"
    r = await client.get(f"/v1/orgs/{org['slug']}", headers=bearer(bob))
    assert r.status_code == 200 and r.json()["organization"]["role"] == "Developer"
    assert await my_invitations(client, bob) == []
    r = await client.get(f"/v1/orgs/{org['slug']}/invitations", headers=bearer(ada))
    assert r.json()["invitations"] == []
    # once only
    assert_error(await client.post(f"/v1/user/invitations/{invited['id']}/accept",
                                   headers=bearer(bob)), 404, "invitation_not_pending")
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob),
                                   json={"code": code}), 404)
    acts = await actions(app)
    assert "team.invited" in acts and acts[-1] == "invite.accepted"


async def test_accept_by_code(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    eve = await new_user(client, "eve@example.com")
    org = await make_org(client, ada)
    await invite(client, ada, org["slug"], "bob@example.com", "Support")
    code = await code_for(app, mailbox, "bob@example.com")

    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob), json={}),
                 400)
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob),
                                   json={"code": 12}), 400)
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob),
                                   json={"code": "0" * 40}), 404)
    assert (await client.post("/v1/invitations/accept", json={"code": code})).status_code == 401
    # someone else holding the code cannot use it
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(eve),
                                   json={"code": code}), 403, "wrong_user")
    assert_error(await client.get(f"/v1/orgs/{org['slug']}", headers=bearer(eve)), 404)

    r = await client.post("/v1/invitations/accept", headers=bearer(bob), data={"code": code})
    assert r.status_code == 200, r.text
    assert r.json()["membership"]["role"] == "Support"
    assert (await team(client, ada, org["slug"]))["bob@example.com"] == "Support"


async def test_decline(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    eve = await new_user(client, "eve@example.com")
    org = await make_org(client, ada)
    inv = await invite(client, ada, org["slug"], "bob@example.com")
    code = await code_for(app, mailbox, "bob@example.com")
    # not addressed to eve: as if it did not exist
    assert_error(await client.post(f"/v1/user/invitations/{inv['id']}/decline",
                                   headers=bearer(eve)), 404, "not_found")
    assert_error(await client.post("/v1/user/invitations/99999/decline", headers=bearer(bob)),
                 404)
    assert_error(await client.post("/v1/user/invitations/abc/decline", headers=bearer(bob)),
                 400)
    r = await client.post(f"/v1/user/invitations/{inv['id']}/decline", headers=bearer(bob))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert await my_invitations(client, bob) == []
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob),
                                   json={"code": code}), 404, "invitation_not_pending")
    assert "bob@example.com" not in await team(client, ada, org["slug"])
    async with app.state.sessionmaker() as db:
        assert (await db.get(Invitation, inv["id"])).status == "declined"
    assert (await actions(app))[-1] == "invite.declined"


async def test_expired_invitation(client, app, mailbox, manual_clock):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    org = await make_org(client, ada)
    inv = await invite(client, ada, org["slug"], "bob@example.com")
    code = await code_for(app, mailbox, "bob@example.com")
    lifetime = app.state.settings.invite_lifetime_s

    manual_clock.advance(lifetime - 60)
    assert [i["id"] for i in await my_invitations(client, bob)] == [inv["id"]]
    manual_clock.advance(120)
    assert await my_invitations(client, bob) == []
    body = assert_error(await client.post(f"/v1/user/invitations/{inv['id']}/accept",
                                          headers=bearer(bob)), 400, "invitation_expired")
    assert "expired" in body["error_description"]
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob),
                                   json={"code": code}), 400, "invitation_expired")
    assert_error(await client.post(f"/v1/user/invitations/{inv['id']}/decline",
                                   headers=bearer(bob)), 400, "invitation_expired")
    # the org still sees it, flagged, and can send it again
    r = await client.get(f"/v1/orgs/{org['slug']}/invitations", headers=bearer(ada))
    assert [i["expired"] for i in r.json()["invitations"]] == [True]
    again = await invite(client, ada, org["slug"], "bob@example.com")
    assert again["id"] == inv["id"]
    new_code = await code_for(app, mailbox, "bob@example.com")
    r = await client.post("/v1/invitations/accept", headers=bearer(bob), json={"code": new_code})
    assert r.status_code == 200, r.text


async def test_reinvite_replaces_pending(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    org = await make_org(client, ada)
    first = await invite(client, ada, org["slug"], "bob@example.com", "Developer")
    old_code = await code_for(app, mailbox, "bob@example.com")
    second = await invite(client, ada, org["slug"], "BOB@example.com", "Administrator")
    assert second["id"] == first["id"] and second["role"] == "Administrator"
    new_code = await code_for(app, mailbox, "bob@example.com")
    assert new_code != old_code
    assert len(await delivered(app, mailbox, "bob@example.com")) == 2  # re-sent

    [mine] = await my_invitations(client, bob)
    assert mine["role"] == "Administrator"
    r = await client.get(f"/v1/orgs/{org['slug']}/invitations", headers=bearer(ada))
    assert len(r.json()["invitations"]) == 1
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob),
                                   json={"code": old_code}), 404)
    r = await client.post("/v1/invitations/accept", headers=bearer(bob), json={"code": new_code})
    assert r.status_code == 200 and r.json()["membership"]["role"] == "Administrator"
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(AuditEntry.details).where(
            AuditEntry.action == "team.invited").order_by(AuditEntry.id))).scalars().all()
    assert [d["resent"] for d in rows] == [False, True]


async def test_invite_rules_and_bad_input(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada)
    slug = org["slug"]
    h = bearer(ada)
    before = await outbox_count(app)
    for body, code in [
        ({}, "invalid_request"),
        ({"username": "not-an-email", "role": "Developer"}, "invalid_request"),
        ({"username": ["a@example.com"], "role": "Developer"}, None),
        ({"username": "x@example.com", "role": "Emperor"}, "invalid_role"),
        ({"username": "x@example.com", "role": 4}, "invalid_role"),
        ({"friendly_name": "CI", "scopes": ["devices:list"]}, "invalid_request"),
    ]:
        assert_error(await client.post(f"/v1/orgs/{slug}/team", headers=h, json=body), 400, code)
    # an existing member cannot be invited again
    body = assert_error(await client.post(f"/v1/orgs/{slug}/team", headers=h,
                                          json={"username": "ada@example.com",
                                                "role": "Developer"}), 409, "already_member")
    assert "already a member" in body["error_description"]
    # the personal organization has no team
    personal = (await client.get("/v1/orgs", headers=h)).json()["organizations"][0]
    assert_error(await client.post(f"/v1/orgs/{personal['slug']}/team", headers=h,
                                   json={"username": "x@example.com", "role": "Developer"}),
                 400, "personal_org")
    # nothing was written by the refused requests
    assert await outbox_count(app) == before
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(Invitation))).scalar_one() == 0

    # role defaults to View-only (particle-api-js sends only username)
    inv = await invite(client, ada, slug, "quiet@example.com", role=None)
    assert inv["role"] == "View-only"


async def test_only_owner_invites_owner(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    admin = await new_user(client, "admin@example.com")
    org = await make_org(client, ada)
    slug = org["slug"]
    await invite(client, ada, slug, "admin@example.com", "Administrator")
    r = await client.post("/v1/invitations/accept", headers=bearer(admin),
                          json={"code": await code_for(app, mailbox, "admin@example.com")})
    assert r.status_code == 200, r.text

    body = assert_error(await client.post(f"/v1/orgs/{slug}/team", headers=bearer(admin),
                                          json={"username": "x@example.com", "role": "Owner"}),
                        403, "forbidden")
    assert "Owner" in body["error_description"]
    # ...but up to Administrator, yes
    assert (await invite(client, admin, slug, "y@example.com", "Administrator"))["role"] == (
        "Administrator")
    # the Owner can; the Administrator may not revoke that Owner invitation
    owner_inv = await invite(client, ada, slug, "z@example.com", "Owner")
    assert_error(await client.delete(f"/v1/orgs/{slug}/invitations/{owner_inv['id']}",
                                     headers=bearer(admin)), 403, "forbidden")
    # a Developer may not invite at all (the guard)
    dev = await new_user(client, "dev@example.com")
    await invite(client, ada, slug, "dev@example.com", "Developer")
    r = await client.post("/v1/invitations/accept", headers=bearer(dev),
                          json={"code": await code_for(app, mailbox, "dev@example.com")})
    assert r.status_code == 200, r.text
    assert_error(await client.post(f"/v1/orgs/{slug}/team", headers=bearer(dev),
                                   json={"username": "w@example.com", "role": "View-only"}),
                 403, "forbidden")


async def test_revoke(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    zed = await new_user(client, "zed@example.com")
    org = await make_org(client, ada)
    other = await make_org(client, zed, "Other Co")
    inv = await invite(client, ada, org["slug"], "bob@example.com")
    code = await code_for(app, mailbox, "bob@example.com")
    zed_inv = await invite(client, zed, other["slug"], "bob@example.com")

    # another org's invitation (or none) is not found through this org
    assert_error(await client.delete(f"/v1/orgs/{org['slug']}/invitations/{zed_inv['id']}",
                                     headers=bearer(ada)), 404)
    assert_error(await client.delete(f"/v1/orgs/{org['slug']}/invitations/424242",
                                     headers=bearer(ada)), 404)
    assert_error(await client.delete(f"/v1/orgs/{other['slug']}/invitations/{inv['id']}",
                                     headers=bearer(ada)), 404, "not_found")
    r = await client.delete(f"/v1/orgs/{org['slug']}/invitations/{inv['id']}",
                            headers=bearer(ada))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert [i["id"] for i in await my_invitations(client, bob)] == [zed_inv["id"]]
    assert_error(await client.post("/v1/invitations/accept", headers=bearer(bob),
                                   json={"code": code}), 404, "invitation_not_pending")
    assert_error(await client.delete(f"/v1/orgs/{org['slug']}/invitations/{inv['id']}",
                                     headers=bearer(ada)), 404)
    assert "bob@example.com" not in await team(client, ada, org["slug"])
    assert "invite.revoked" in await actions(app)


async def test_new_account_needs_the_code(client, app, mailbox, manual_clock):
    """Sign-up does not prove the address: an account made after the invitation was sent
    accepts with the code from the mailbox, not just the id."""
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada)
    inv = await invite(client, ada, org["slug"], "carol@example.com", "Developer")
    code = await code_for(app, mailbox, "carol@example.com")
    manual_clock.advance(5)
    carol = await new_user(client, "carol@example.com")
    assert [i["id"] for i in await my_invitations(client, carol)] == [inv["id"]]
    assert_error(await client.post(f"/v1/user/invitations/{inv['id']}/accept",
                                   headers=bearer(carol)), 403, "code_required")
    r = await client.post("/v1/invitations/accept", headers=bearer(carol), json={"code": code})
    assert r.status_code == 200, r.text
    assert (await team(client, ada, org["slug"]))["carol@example.com"] == "Developer"


async def test_accept_upgrades_but_never_downgrades(client, app, mailbox):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    cat = await new_user(client, "cat@example.com")
    org = await make_org(client, ada)
    up = await invite(client, ada, org["slug"], "bob@example.com", "Administrator")
    down = await invite(client, ada, org["slug"], "cat@example.com", "View-only")
    # meanwhile both got a role another way
    async with app.state.sessionmaker() as db:
        for name, role in (("bob@example.com", "Developer"), ("cat@example.com", "Owner")):
            user = (await db.execute(select(User).where(User.username == name))).scalar_one()
            db.add(Membership(user_id=user.id, org_id=org["id"], role=role))
        await db.commit()
    r = await client.post(f"/v1/user/invitations/{up['id']}/accept", headers=bearer(bob))
    assert r.status_code == 200 and r.json()["membership"]["role"] == "Administrator"
    r = await client.post(f"/v1/user/invitations/{down['id']}/accept", headers=bearer(cat))
    assert r.status_code == 200 and r.json()["membership"]["role"] == "Owner"
    members = await team(client, ada, org["slug"])
    assert members["bob@example.com"] == "Administrator" and members["cat@example.com"] == "Owner"
    async with app.state.sessionmaker() as db:
        n = (await db.execute(select(func.count()).select_from(Membership).where(
            Membership.org_id == org["id"]))).scalar_one()
    assert n == 3


# --- the service functions the product team routes reuse -------------------------------

def person(user: User) -> Subject:
    return Subject(kind="user", token_id=0, client="test", user_id=user.id,
                   username=user.username)


async def test_product_scope_service(client, app, mailbox):
    ada_tok = await new_user(client, "ada@example.com")
    bob_tok = await new_user(client, "bob@example.com")
    await new_user(client, "cat@example.com")
    org_json = await make_org(client, ada_tok)
    settings = app.state.settings
    async with app.state.sessionmaker() as db:
        org = await db.get(Organization, org_json["id"])
        ada = (await db.execute(select(User).where(User.username == "ada@example.com"))
               ).scalar_one()
        product = Product(org_id=org.id, name="Widget", name_key="widget", slug="widget")
        db.add(product)
        await db.flush()
        with pytest.raises(BadRequest):  # Owner is an organization role
            await service.invite(db, settings, inviter=person(ada), org=org,
                                 product_id=product.id, product_name="Widget",
                                 email="bob@example.com", role=Role.OWNER, ip="t")
        inv = await service.invite(db, settings, inviter=person(ada), org=org,
                                   product_id=product.id, product_name="Widget",
                                   email="bob@example.com", role=Role.DEVELOPER, ip="t")
        assert inv.product_id == product.id and inv.org_id == org.id
        await db.commit()
        product_id = product.id

    [(_, subject, body)] = await delivered(app, mailbox, "bob@example.com")
    assert "Widget" in subject and "Acme Inc" in subject
    [mine] = await my_invitations(client, bob_tok)
    assert mine["product"] == {"id": product_id, "name": "Widget", "slug": "widget"}
    r = await client.post("/v1/invitations/accept", headers=bearer(bob_tok),
                          json={"code": CODE.search(body).group(1)})
    assert r.status_code == 200, r.text
    assert r.json()["membership"] == {"org_id": org_json["id"], "product_id": product_id,
                                      "role": "Developer"}
    # a product-scope member is not on the org team
    assert "bob@example.com" not in await team(client, ada_tok, org_json["slug"])

    async with app.state.sessionmaker() as db:
        org = await db.get(Organization, org_json["id"])
        ada = (await db.execute(select(User).where(User.username == "ada@example.com"))
               ).scalar_one()
        rows = await service.list_team(db, org_id=org.id, product_id=product_id)
        assert [(u.username, m.role) for u, m in rows] == [("bob@example.com", "Developer")]
        assert service.team_member_json(*rows[0])["role"] == {"id": "developer",
                                                              "name": "Developer"}
        assert [u.username for u, _ in await service.list_team(db, org_id=org.id,
                                                               product_id=None)] == [
            "ada@example.com"]
        with pytest.raises(Conflict):  # already on this product's team
            await service.invite(db, settings, inviter=person(ada), org=org,
                                 product_id=product_id, product_name="Widget",
                                 email="bob@example.com", role=Role.SUPPORT, ip="t")
        with pytest.raises(NotFound):  # org scope: bob is no org member
            await service.change_role(db, actor=person(ada), actor_role=Role.OWNER, org=org,
                                      product_id=None, username="bob@example.com",
                                      role=Role.SUPPORT, ip="t")
        with pytest.raises(Forbidden):  # a Developer grants nothing
            await service.change_role(db, actor=person(ada), actor_role=Role.DEVELOPER,
                                      org=org, product_id=product_id,
                                      username="bob@example.com", role=Role.SUPPORT, ip="t")
        m = await service.change_role(db, actor=person(ada), actor_role=Role.ADMINISTRATOR,
                                      org=org, product_id=product_id,
                                      username="bob@example.com", role=Role.ADMINISTRATOR,
                                      ip="t")
        assert m.role == "Administrator" and m.product_id == product_id
        # a product-scope invitation of another org's product is refused
        other = Organization(name="Other", slug="other")
        db.add(other)
        await db.flush()
        with pytest.raises(NotFound):
            await service.invite(db, settings, inviter=person(ada), org=other,
                                 product_id=product_id, product_name="Widget",
                                 email="cat@example.com", role=Role.SUPPORT, ip="t")
        await service.remove_member(db, actor=person(ada), actor_role=Role.OWNER, org=org,
                                    product_id=product_id, username="bob@example.com", ip="t")
        assert await service.list_team(db, org_id=org.id, product_id=product_id) == []
        with pytest.raises(NotFound):
            await service.remove_member(db, actor=person(ada), actor_role=Role.OWNER, org=org,
                                        product_id=product_id, username="bob@example.com",
                                        ip="t")
        await db.commit()
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(AuditEntry.action, AuditEntry.product_id).where(
            AuditEntry.product_id == product_id).order_by(AuditEntry.id))).all()
    assert [a for a, _ in rows] == ["team.invited", "invite.accepted", "team.role_changed",
                                    "team.removed"]
