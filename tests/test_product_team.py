"""The product team: people with organization or product roles, invites, role changes."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from corral.orgs.models import Invitation
from helpers import add_member, assert_error, bearer, make_org, new_user


async def make_product(client, token: str, org: str, name: str = "Widget") -> dict[str, Any]:
    r = await client.post(f"/v1/orgs/{org}/products", headers=bearer(token),
                          json={"product": {"name": name}})
    assert r.status_code == 200, r.text
    return r.json()["product"]


async def accept(client, app, token: str, email: str) -> dict[str, Any]:
    """Accept the newest invitation mailed to ``email`` with the code from the message."""
    await app.state.runtime.mailer.deliver_due()
    bodies = [body for to, _, body in app.state.runtime.mail_backend.sent if to == email]
    assert bodies, f"no invitation mailed to {email}"
    code = re.search(r"invitation code: (\S+)", bodies[-1])
    assert code, bodies[-1]
    r = await client.post("/v1/invitations/accept", headers=bearer(token),
                          json={"code": code.group(1)})
    assert r.status_code == 200, r.text
    return r.json()["membership"]


@pytest.fixture
async def team(client, app) -> dict[str, Any]:
    """ada owns Acme with product Widget; bob is an org Developer; cy has no role yet."""
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    cy = await new_user(client, "cy@example.com")
    org = await make_org(client, ada, "Acme")
    product = await make_product(client, ada, org["slug"])
    await add_member(app, "bob@example.com", org_id=org["id"], product_id=None, role="Developer")
    return {"ada": ada, "bob": bob, "cy": cy, "org": org, "product": product,
            "path": f"/v1/products/{product['id']}/team"}


async def test_invite_accept_and_team_listing(client, app, team):
    ada, cy, path = team["ada"], team["cy"], team["path"]
    r = await client.post(path, headers=bearer(ada), json={"username": "CY@example.com",
                                                          "role": "Administrator"})
    assert r.status_code == 200, r.text
    invited = r.json()
    assert invited["ok"] is True
    assert invited["invited"]["username"] == "cy@example.com"
    assert invited["invited"]["role"] == "Administrator"
    # not a member before accepting
    assert_error(await client.get(f"/v1/products/{team['product']['id']}", headers=bearer(cy)), 404)
    membership = await accept(client, app, cy, "cy@example.com")
    assert membership["product_id"] == team["product"]["id"]
    assert (await client.get(f"/v1/products/{team['product']['id']}",
                             headers=bearer(cy))).status_code == 200
    # bob also gets a stronger product role: he must be listed once, with the stronger role
    await add_member(app, "bob@example.com", org_id=team["org"]["id"],
                     product_id=team["product"]["id"], role="Administrator")
    r = await client.post(path, headers=bearer(ada),
                          json={"friendly_name": "Bot", "scopes": ["devices:list"]})
    bot = r.json()["created"]["username"]
    r = await client.get(path, headers=bearer(cy))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    rows = body["team"]
    people = [m for m in rows if not m.get("is_programmatic")]
    by_name = {m["username"]: m for m in people}
    assert len(people) == len(by_name) == 3
    assert by_name["ada@example.com"]["role"]["name"] == "Owner"
    assert by_name["ada@example.com"]["scope"] == "organization"
    assert by_name["bob@example.com"]["role"]["name"] == "Administrator"
    assert by_name["bob@example.com"]["scope"] == "product"
    assert by_name["cy@example.com"]["role"]["name"] == "Administrator"
    assert by_name["cy@example.com"]["scope"] == "product"
    # people first, then API users
    assert rows[-1] == {"username": bot, "friendly_name": "Bot", "scopes": ["devices:list"],
                        "is_programmatic": True, "product_id": team["product"]["id"]}
    assert all(not m.get("is_programmatic") for m in rows[:-1])


async def test_invite_defaults_and_form_body(client, app, team):
    ada, path = team["ada"], team["path"]
    r = await client.post(path, headers=bearer(ada), json={"username": "cy@example.com"})
    assert r.status_code == 200, r.text
    assert r.json()["invited"]["role"] == "View-only"
    r = await client.post(path, headers=bearer(ada),
                          data={"username": "dee@example.com", "role": "Support"})
    assert r.status_code == 200, r.text
    assert r.json()["invited"] == {"username": "dee@example.com", "role": "Support",
                                   "id": r.json()["invited"]["id"]}
    await accept(client, app, team["cy"], "cy@example.com")
    r = await client.get(path, headers=bearer(team["cy"]))
    cy = [m for m in r.json()["team"] if m["username"] == "cy@example.com"]
    assert cy[0]["role"]["name"] == "View-only" and cy[0]["scope"] == "product"


@pytest.mark.parametrize("body", [
    {},
    {"username": ""},
    {"username": "not-an-email"},
    {"username": "cy@example.com", "role": "Owner"},
    {"username": "cy@example.com", "role": "Emperor"},
    {"username": "cy@example.com", "role": 3},
    {"username": ["a@example.com", "b@example.com"]},
])
async def test_bad_invites(client, app, team, body):
    assert_error(await client.post(team["path"], headers=bearer(team["ada"]), json=body), 400)
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(Invitation))).first() is None


async def test_change_role(client, app, team):
    ada, path = team["ada"], team["path"]
    await client.post(path, headers=bearer(ada), json={"username": "cy@example.com",
                                                      "role": "View-only"})
    await accept(client, app, team["cy"], "cy@example.com")
    r = await client.put(f"{path}/cy@example.com", headers=bearer(ada), json={"role": "Developer"})
    assert r.status_code == 200, r.text
    upd = r.json()["updated"]
    assert upd["username"] == "cy@example.com" and upd["role"]["name"] == "Developer"
    assert upd["scope"] == "product"
    r = await client.post(f"{path}/cy@example.com", headers=bearer(ada), data={"role": "Support"})
    assert r.status_code == 200 and r.json()["updated"]["role"]["name"] == "Support"
    assert_error(await client.put(f"{path}/cy@example.com", headers=bearer(ada),
                                  json={"role": "Owner"}), 400)
    assert_error(await client.put(f"{path}/cy@example.com", headers=bearer(ada), json={}), 400)
    # bob has only an organization role: there is no product membership to change here
    body = assert_error(await client.put(f"{path}/bob@example.com", headers=bearer(ada),
                                         json={"role": "Administrator"}), 404)
    assert "organization" in body["error_description"]
    assert_error(await client.put(f"{path}/nobody@example.com", headers=bearer(ada),
                                  json={"role": "Developer"}), 404)
    # the Support role may read the team but not change it
    cy = team["cy"]
    assert (await client.get(path, headers=bearer(cy))).status_code == 200
    assert_error(await client.put(f"{path}/cy@example.com", headers=bearer(cy),
                                  json={"role": "Administrator"}), 403)
    assert_error(await client.post(path, headers=bearer(cy),
                                   json={"username": "x@example.com"}), 403)


async def test_remove_member(client, app, team):
    ada, path = team["ada"], team["path"]
    await client.post(path, headers=bearer(ada), json={"username": "cy@example.com"})
    await accept(client, app, team["cy"], "cy@example.com")
    # a Developer (bob, org scope) may not remove
    assert_error(await client.delete(f"{path}/cy@example.com", headers=bearer(team["bob"])), 403)
    r = await client.delete(f"{path}/cy@example.com", headers=bearer(ada))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert_error(await client.get(f"/v1/products/{team['product']['id']}",
                                  headers=bearer(team["cy"])), 404)
    assert_error(await client.delete(f"{path}/cy@example.com", headers=bearer(ada)), 404)
    body = assert_error(await client.delete(f"{path}/bob@example.com", headers=bearer(ada)), 404)
    assert "organization" in body["error_description"]
    assert_error(await client.delete(f"{path}/nobody@example.com", headers=bearer(ada)), 404)
    # bob keeps his organization role
    r = await client.get(f"/v1/products/{team['product']['id']}", headers=bearer(team["bob"]))
    assert r.status_code == 200


async def test_other_tenants_and_api_users(client, team):
    outsider = await new_user(client, "eve@example.com")
    path = team["path"]
    for method, sub in [("GET", ""), ("POST", ""), ("PUT", "/ada@example.com"),
                        ("DELETE", "/ada@example.com"), ("PUT", "/ada@example.com/token")]:
        r = await client.request(method, path + sub, headers=bearer(outsider),
                                 json={"username": "eve@example.com", "role": "Developer"})
        assert_error(r, 404)
    r = await client.post(path, headers=bearer(team["ada"]),
                          json={"friendly_name": "reader", "scopes": ["teams.users:list"]})
    api = r.json()["created"]["tokens"][0]["token"]
    assert (await client.get(path, headers=bearer(api))).status_code == 200
    assert_error(await client.post(path, headers=bearer(api),
                                   json={"username": "x@example.com"}), 403)
    assert_error(await client.delete(f"{path}/ada@example.com", headers=bearer(api)), 403)


async def test_team_in_personal_org_product(client, app):
    """A personal organization has no org team, but its products can have one."""
    ada = await new_user(client, "ada@example.com")
    cy = await new_user(client, "cy@example.com")
    r = await client.post("/v1/user/products", headers=bearer(ada), json={"name": "Solo"})
    p = r.json()["product"]
    path = f"/v1/products/{p['id']}/team"
    r = await client.post(path, headers=bearer(ada), json={"username": "cy@example.com",
                                                          "role": "Developer"})
    assert r.status_code == 200, r.text
    await accept(client, app, cy, "cy@example.com")
    r = await client.get(path, headers=bearer(cy))
    roles = {m["username"]: (m["role"]["name"], m["scope"]) for m in r.json()["team"]}
    assert roles == {"ada@example.com": ("Owner", "organization"),
                     "cy@example.com": ("Developer", "product")}
    r = await client.get("/v1/products", headers=bearer(cy))
    assert [x["id"] for x in r.json()["products"]] == [p["id"]]
