"""Every error leaves as JSON in Particle's shape: unknown routes, methods, bodies, sizes."""

from __future__ import annotations

from helpers import bearer, new_user


async def test_unknown_route_is_json(client):
    r = await client.get("/v1/nope")
    assert r.status_code == 404
    assert r.json() == {"ok": False, "error": "not_found", "error_description": "Unknown API endpoint"}


async def test_wrong_method_is_json(client):
    r = await client.patch("/v1/user")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


async def test_malformed_json_and_non_object(client):
    r = await client.post("/v1/users", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"
    r = await client.post("/v1/users", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"


async def test_oversized_body(client, settings):
    big = b"x" * (settings.max_body_bytes + 1)
    r = await client.post("/v1/users", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    async def chunks():  # no content-length: counted while streaming
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b"y" * 65536

    r = await client.post("/v1/users", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_query_validation_is_400_json(client):
    token = await new_user(client, "q@example.com")
    orgs = (await client.get("/v1/user", headers=bearer(token))).json()["orgs"]
    r = await client.get(f"/v1/orgs/{orgs[0]['slug']}/audit", params={"page": "x"},
                         headers=bearer(token))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


async def test_nul_characters_are_refused_everywhere(client):
    """PostgreSQL cannot store NUL: it is refused at the edge in paths, queries and bodies."""
    token = await new_user(client, "nul@example.com")
    h = bearer(token)
    for r in (
        await client.get("/v1/products/a%00b", headers=h),
        await client.get("/v1/user", params={"x": "a\x00b"}, headers=h),
        await client.post("/v1/orgs", json={"name": "a\u0000b"}, headers=h),
        await client.post("/v1/orgs", data={"name": "a\x00b"}, headers=h),
        await client.post("/oauth/token", data={"grant_type": "password", "username": "a\x00",
                                                "password": "x", "client_id": "particle-api",
                                                "client_secret": "particle-api"}),
    ):
        assert r.status_code == 400, r.text
        assert "NUL" in r.json()["error_description"]
