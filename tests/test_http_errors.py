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
