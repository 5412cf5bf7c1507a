"""What the particle-api-js driver tests share: seeding an owner, an organization and a
product over corral's API, and reading a driver's recorded steps."""

from __future__ import annotations

from typing import Any

import httpx


def expect(r: httpx.Response, *statuses: int) -> Any:
    assert r.status_code in statuses, f"seed: {r.request.url.path} -> {r.status_code} {r.text}"
    return r.json() if r.content else None


def owner_org_product(base_url: str, owner: str, password: str, name: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sign ``owner`` up; their organization "<name> Org" and its product ``name``."""
    with httpx.Client(base_url=base_url, timeout=15.0, trust_env=False) as http:
        expect(http.post("/v1/users", json={"username": owner, "password": password}), 200)
        token = expect(http.post("/oauth/token", data={
            "grant_type": "password", "username": owner, "password": password,
            "client_id": "particle-cli", "client_secret": "particle-cli"}), 200)["access_token"]
        http.headers["Authorization"] = f"Bearer {token}"
        org = expect(http.post("/v1/orgs", json={"name": f"{name} Org"}),
                     200, 201)["organization"]
        body = expect(http.post(f"/v1/orgs/{org['slug']}/products", json={
            "product": {"name": name, "platform_id": 12}}), 200, 201)
    return org, body.get("product", body)


def step(results: dict[str, Any], name: str) -> dict[str, Any]:
    rec = results["steps"].get(name)
    assert rec is not None, (name, results.get("order"), results["unexpected"])
    return rec


def step_ok(results: dict[str, Any], name: str, status: int = 200) -> Any:
    rec = step(results, name)
    assert rec["ok"] and rec["statusCode"] == status, rec
    return rec["body"]
