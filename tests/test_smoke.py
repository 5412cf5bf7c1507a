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
