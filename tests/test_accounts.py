"""Sign-up, /oauth/token grants, lockout, token lifecycle and the user profile."""

from __future__ import annotations

import base64

import pytest

from helpers import PASSWORD, bearer, login, new_user, signup

FORM = {"grant_type": "password", "client_id": "particle-cli", "client_secret": "particle-cli"}


async def test_signup_validation(client):
    cases = [
        ({}, "username is required"),
        ({"username": "not-an-email", "password": PASSWORD}, "e-mail"),
        ({"username": "a@example.com", "password": "short"}, "at least 8"),
        ({"username": "a@example.com", "password": 12345678}, "password: Input should be a valid string"),
        ({"username": ["a@example.com"], "password": PASSWORD}, "username"),
    ]
    for body, needle in cases:
        r = await client.post("/v1/users", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["ok"] is False and needle in r.json()["error_description"]


async def test_signup_form_encoded_and_duplicate(client):
    r = await client.post("/v1/users", data={"username": "Bo@Example.com", "password": PASSWORD})
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = await client.post("/v1/users", json={"username": "bo@example.com", "password": PASSWORD})
    assert r.status_code == 400 and r.json()["error"] == "username_taken"
    # the username is stored lowercased and logs in case-insensitively
    assert len(await login(client, "BO@example.com")) == 40


async def test_token_endpoint_wants_form(client):
    await signup(client, "c@example.com")
    r = await client.post("/oauth/token", json={**FORM, "username": "c@example.com",
                                                "password": PASSWORD})
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_request", "error_description":
                        "Method must be POST with application/x-www-form-urlencoded encoding"}
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(("form", "code", "needle"), [
    ({"grant_type": "nope"}, "invalid_request", "grant_type"),
    ({"grant_type": "password", "client_secret": "x"}, "invalid_request", "client_id"),
    ({"grant_type": "password", "client_id": "a b", "client_secret": "x"}, "invalid_request", "client_id"),
    ({"grant_type": "password", "client_id": "particle-cli"}, "invalid_request", "client_secret"),
    ({**FORM, "username": "c@example.com", "password": "wrong-password"}, "invalid_grant",
     "User credentials are invalid"),
    ({**FORM, "username": "nobody@example.com", "password": PASSWORD}, "invalid_grant",
     "User credentials are invalid"),
    ({**FORM, "username": "c@example.com", "password": PASSWORD, "expires_in": "soon"},
     "invalid_request", "expires_in"),
    ({"grant_type": "client_credentials", "client_id": "unknown-client", "client_secret": "x"},
     "invalid_client", "Client credentials"),
])
async def test_token_endpoint_errors(client, form, code, needle):
    await signup(client, "c@example.com")
    r = await client.post("/oauth/token", data=form)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == code and needle in r.json()["error_description"]
    assert "ok" not in r.json()  # OAuth shape


async def test_password_grant_shapes(client):
    await signup(client, "d@example.com")
    r = await client.post("/oauth/token", data={**FORM, "username": "d@example.com",
                                                "password": PASSWORD})
    body = r.json()
    assert r.status_code == 200 and body["token_type"] == "bearer"
    assert body["expires_in"] == 7_776_000
    assert len(body["refresh_token"]) == 40 and body["refresh_token"] != body["access_token"]
    r = await client.post("/oauth/token", data={**FORM, "username": "d@example.com",
                                                "password": PASSWORD, "expires_in": "0"})
    assert r.json()["expires_in"] == 0 and "refresh_token" not in r.json()
    r = await client.get("/v1/access_tokens/current", headers=bearer(r.json()["access_token"]))
    assert r.json()["expires_at"] is None and r.json()["client"] == "particle-cli"


async def test_basic_auth_client_credentials(client):
    await signup(client, "e@example.com")
    basic = base64.b64encode(b"particle-api:particle-api").decode()
    r = await client.post("/oauth/token", headers={"Authorization": f"Basic {basic}"},
                          data={"grant_type": "password", "username": "e@example.com",
                                "password": PASSWORD})
    assert r.status_code == 200, r.text


async def test_expiry_and_refresh(client, manual_clock):
    await signup(client, "f@example.com")
    r = await client.post("/oauth/token", data={**FORM, "username": "f@example.com",
                                                "password": PASSWORD, "expires_in": "60"})
    first = r.json()
    assert (await client.get("/v1/user", headers=bearer(first["access_token"]))).status_code == 200
    manual_clock.advance(61)
    r = await client.get("/v1/user", headers=bearer(first["access_token"]))
    assert r.status_code == 401 and r.json()["error"] == "expired_token"
    # refresh: new token with the same lifetime; the refresh token works once
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
               "client_id": "particle-cli", "client_secret": "particle-cli"}
    r = await client.post("/oauth/token", data=refresh)
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["expires_in"] == 60 and second["access_token"] != first["access_token"]
    assert (await client.get("/v1/user", headers=bearer(second["access_token"]))).status_code == 200
    r = await client.post("/oauth/token", data=refresh)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    # another client may not use it
    r = await client.post("/oauth/token", data={**refresh, "refresh_token": second["refresh_token"],
                                                "client_id": "other-client"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    # refresh tokens expire 14 days after the access token
    manual_clock.advance(60 + 14 * 86400 + 1)
    r = await client.post("/oauth/token", data={**refresh, "refresh_token": second["refresh_token"]})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


async def test_expires_at(client, manual_clock):
    await signup(client, "g@example.com")
    when = (manual_clock.now().replace(microsecond=0)).isoformat().replace("+00:00", "Z")
    r = await client.post("/oauth/token", data={**FORM, "username": "g@example.com",
                                                "password": PASSWORD, "expires_at": when})
    assert r.status_code == 400 and "future" in r.json()["error_description"]
    manual_clock.advance(-3600)
    r = await client.post("/oauth/token", data={**FORM, "username": "g@example.com",
                                                "password": PASSWORD, "expires_at": when})
    assert r.status_code == 200 and r.json()["expires_in"] == 3600


async def test_lockout_after_ten_failures(client, manual_clock):
    await signup(client, "h@example.com")
    bad = {**FORM, "username": "h@example.com", "password": "wrong-password"}
    for _ in range(10):
        r = await client.post("/oauth/token", data=bad)
        assert r.status_code == 400
    good = {**bad, "password": PASSWORD}
    r = await client.post("/oauth/token", data=good)
    assert r.status_code == 429 and r.json()["error"] == "rate_limit_exceeded"
    manual_clock.advance(29 * 60)
    assert (await client.post("/oauth/token", data=good)).status_code == 429
    manual_clock.advance(61)
    assert (await client.post("/oauth/token", data=good)).status_code == 200
    # a success resets the count: nine more failures do not lock
    for _ in range(9):
        await client.post("/oauth/token", data=bad)
    assert (await client.post("/oauth/token", data=good)).status_code == 200


async def test_token_passing_rules(client):
    token = await new_user(client, "i@example.com")
    assert (await client.get("/v1/user", params={"access_token": token})).status_code == 200
    r = await client.get("/v1/user", params={"access_token": token}, headers=bearer(token))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await client.get("/v1/user")
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    r = await client.get("/v1/user", headers=bearer("0" * 40))
    assert r.status_code == 401 and r.json() == {
        "error": "invalid_token", "error_description": "The access token provided is invalid."}
    r = await client.get("/v1/user", headers={"Authorization": "Bearer"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    # form-body token on a non-GET request
    r = await client.put("/v1/user", data={"access_token": token, "account_info[x]": "1"})
    assert r.status_code == 400 and "account_info" in r.json()["error_description"]


async def test_tokens_are_stored_hashed(client, app):
    from sqlalchemy import select

    from corral.auth.models import AccessToken

    token = await new_user(client, "j@example.com")
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(AccessToken))).scalars().all()
    assert rows and all(token not in (r.token_hash, r.refresh_hash) for r in rows)


async def test_list_and_revoke_tokens(client):
    t1 = await new_user(client, "k@example.com")
    t2 = await login(client, "k@example.com")
    t3 = await login(client, "k@example.com")
    r = await client.get("/v1/access_tokens", headers=bearer(t1))
    listed = r.json()
    assert len(listed) == 3 and sum(t["current"] for t in listed) == 1
    assert all(len(t["id"]) == 16 and "token" not in t for t in listed)
    # revoke by value needs no other credential (particle-cli sends none)
    r = await client.delete(f"/v1/access_tokens/{t2}")
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert (await client.get("/v1/user", headers=bearer(t2))).status_code == 401
    assert (await client.delete(f"/v1/access_tokens/{t2}")).status_code == 404
    # revoke by id needs the owner's bearer
    other = next(t for t in (await client.get("/v1/access_tokens", headers=bearer(t1))).json()
                 if not t["current"])
    assert (await client.delete(f"/v1/access_tokens/{other['id']}")).status_code == 401
    intruder = await new_user(client, "intruder@example.com")
    r = await client.delete(f"/v1/access_tokens/{other['id']}", headers=bearer(intruder))
    assert r.status_code == 404
    r = await client.delete(f"/v1/access_tokens/{other['id']}", headers=bearer(t1))
    assert r.status_code == 200
    assert (await client.get("/v1/user", headers=bearer(t3))).status_code == 401
    # log out, then revoke everything
    t4 = await login(client, "k@example.com")
    assert (await client.delete("/v1/access_tokens/current", headers=bearer(t4))).status_code == 200
    assert (await client.get("/v1/user", headers=bearer(t4))).status_code == 401
    assert (await client.delete("/v1/access_tokens", headers=bearer(t1))).status_code == 200
    assert (await client.get("/v1/user", headers=bearer(t1))).status_code == 401


async def test_update_profile_and_password(client):
    token = await new_user(client, "l@example.com")
    r = await client.put("/v1/user", headers=bearer(token),
                         json={"account_info": {"first_name": "Lin", "last_name": "Lee"}})
    assert r.status_code == 200
    r = await client.get("/v1/user", headers=bearer(token))
    assert r.json()["account_info"]["first_name"] == "Lin"
    r = await client.put("/v1/user", headers=bearer(token),
                         json={"password": "new password!", "current_password": "wrong"})
    assert r.status_code == 403 and r.json()["error"] == "invalid_password"
    other = await login(client, "l@example.com")
    r = await client.put("/v1/user", headers=bearer(token),
                         json={"password": "new password!", "current_password": PASSWORD,
                               "invalidate_tokens": True})
    assert r.status_code == 200
    assert (await client.get("/v1/user", headers=bearer(other))).status_code == 401
    assert (await client.get("/v1/user", headers=bearer(token))).status_code == 200
    assert len(await login(client, "l@example.com", "new password!")) == 40
    r = await client.put("/v1/user", headers=bearer(token), json={})
    assert r.status_code == 400


async def test_delete_user(client):
    token = await new_user(client, "m@example.com")
    r = await client.request("DELETE", "/v1/user", headers=bearer(token), json={"password": "no"})
    assert r.status_code == 403
    r = await client.request("DELETE", "/v1/user", headers=bearer(token),
                             json={"password": PASSWORD})
    assert r.status_code == 200 and r.json()["ok"] is True
    assert (await client.get("/v1/user", headers=bearer(token))).status_code == 401
    r = await client.post("/oauth/token", data={**FORM, "username": "m@example.com",
                                                "password": PASSWORD})
    assert r.status_code == 400


@pytest.mark.parametrize("header", ["Bearer null", "Bearer undefined", "Bearer 0123456789"])
async def test_public_routes_ignore_a_meaningless_bearer_token(client, header):
    """particle-cli logs in with ``Authorization: Bearer null`` and its own client id (CLI2):
    a route that needs no authentication ignores whatever token comes with it."""
    auth = {"Authorization": header}
    r = await client.post("/v1/users", headers=auth,
                          json={"username": "cli@example.com", "password": PASSWORD})
    assert r.status_code == 200, r.text
    r = await client.post("/oauth/token", headers=auth, data={
        "grant_type": "password", "client_id": "CLI2", "client_secret": "client_secret_here",
        "username": "cli@example.com", "password": PASSWORD})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    r = await client.get("/v1/user", headers=bearer(token))
    assert r.status_code == 200 and r.json()["username"] == "cli@example.com"
    # revoking by value needs no other credential either
    r = await client.delete(f"/v1/access_tokens/{token}", headers=auth)
    assert r.status_code == 200, r.text
    # a route that does need a token still judges it
    r = await client.get("/v1/user", headers=auth)
    assert r.status_code == 401
