"""particle-api-js 12 (Particle's own JavaScript client) against a real corral server.

The module starts corral with uvicorn (see ``conftest.py``), seeds a user, an organization
and a product over HTTP, then runs ``driver.mjs`` once: it calls the library the way a user
would and prints one JSON document. Each test below checks one part of that document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.compat

OWNER = "compat-owner@example.com"
PASSWORD = "compat correct horse 42"
ORG_NAME = "Compat Org"
PRODUCT_NAME = "Compat Product"
PLATFORM_ID = 12  # Argon
TOKEN_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class Seed:
    org: dict[str, Any] | None = None
    product: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # how the seed was made (for reports)
    problems: list[str] = field(default_factory=list)  # why something could not be seeded


def _client(base_url: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=15.0, trust_env=False)


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _unwrap(body: Any, *keys: str) -> dict[str, Any] | None:
    """``{"product": {...}}`` / ``{"org": {...}}`` or the bare object."""
    if not isinstance(body, dict):
        return None
    for key in keys:
        if isinstance(body.get(key), dict):
            return body[key]
    return body if "id" in body else None


def _describe(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:300]}"


@pytest.fixture(scope="module")
def seed(corral_server: Any) -> Seed:
    """User (sign-up), organization and product, created over HTTP by a second client."""
    out = Seed()
    with _client(corral_server.base_url) as http:
        r = http.post("/v1/users", json={"username": OWNER, "password": PASSWORD})
        assert r.status_code == 200, f"sign-up failed: {_describe(r)}"
        r = http.post("/oauth/token", data={
            "grant_type": "password", "username": OWNER, "password": PASSWORD,
            "client_id": "particle-cli", "client_secret": "particle-cli"})
        assert r.status_code == 200, f"seed login failed: {_describe(r)}"
        token = r.json()["access_token"]

    product_body = {"product": {"name": PRODUCT_NAME, "platform_id": PLATFORM_ID}}
    with _client(corral_server.base_url, token) as http:
        r = http.post("/v1/orgs", json={"name": ORG_NAME})
        if r.status_code == 404:
            out.notes.append(f"POST /v1/orgs answered 404 ({r.text[:200]}); "
                             "falling back to POST /v1/user/products")
            r = http.post("/v1/user/products", json=product_body)
        elif r.status_code in (200, 201):
            out.org = _unwrap(_json(r), "org", "organization")
            ref = out.org and (out.org.get("slug") or out.org.get("id"))
            if not ref:
                out.problems.append(f"org created but no slug/id in the answer: {_describe(r)}")
                return out
            out.notes.append(f"org {ref!r} created with POST /v1/orgs")
            r = http.post(f"/v1/orgs/{ref}/products", json=product_body)
        else:
            out.problems.append(f"org creation failed: {_describe(r)}")
            return out
        if r.status_code not in (200, 201):
            out.problems.append(f"product creation failed: {_describe(r)}")
            return out
        out.product = _unwrap(_json(r), "product")
        if not out.product or "id" not in out.product or "slug" not in out.product:
            out.problems.append(f"product answer has no id/slug: {_describe(r)}")
            out.product = None
        else:
            out.notes.append(f"product id={out.product['id']} slug={out.product['slug']!r} "
                             f"created with {r.request.method} {r.request.url.path}")
    return out


@pytest.fixture(scope="module")
def results(node_tools: Any, corral_server: Any, seed: Seed) -> dict[str, Any]:
    env = {
        "CORRAL_COMPAT_BASE_URL": corral_server.base_url,
        "CORRAL_COMPAT_USERNAME": OWNER,
        "CORRAL_COMPAT_PASSWORD": PASSWORD,
    }
    if seed.product:
        env["CORRAL_COMPAT_PRODUCT"] = str(seed.product["slug"])
        env["CORRAL_COMPAT_PRODUCT_ID"] = str(seed.product["id"])
    proc = node_tools.run_script("driver.mjs", env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        doc = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"driver.mjs printed no JSON (exit {proc.returncode})\nstdout:\n"
                    f"{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}", pytrace=False)
    doc["_exit_code"] = proc.returncode
    doc["_stderr"] = proc.stderr[-2000:]
    doc["_server_log"] = corral_server.log_tail()
    return doc


def _rec(results: dict[str, Any], name: str) -> dict[str, Any]:
    rec = results["steps"].get(name)
    assert rec is not None, f"driver did not record step {name!r}"
    assert "skipped" not in rec, f"{name} was skipped: {rec['skipped']}"
    return rec


def _ok(results: dict[str, Any], name: str, seed: Seed | None = None) -> Any:
    """The body of a call that must have succeeded."""
    rec = _rec(results, name)
    context = f"\nseed notes: {seed.notes}\nseed problems: {seed.problems}" if seed else ""
    if (rec.get("statusCode") or 0) >= 500:
        context += f"\n--- server log ---\n{results['_server_log']}"
    assert rec["ok"], (
        f"particle-api-js {name}() rejected: HTTP {rec.get('statusCode')} {rec.get('message')}"
        f"\nbody: {rec.get('body')}{context}")
    assert rec["statusCode"] == 200, rec
    return rec["body"]


def _need_product(seed: Seed) -> dict[str, Any]:
    assert seed.product is not None, f"no product was seeded: {seed.problems} {seed.notes}"
    return seed.product


def _json_error(results: dict[str, Any], name: str, status: int) -> dict[str, Any]:
    """A rejection whose body the library parsed as JSON (not a SyntaxError)."""
    rec = _rec(results, name)
    assert not rec["ok"], f"expected HTTP {status}, the call succeeded: {rec.get('body')}"
    log = f"\n--- server log ---\n{results['_server_log']}" if (
        rec.get("statusCode") or 0) >= 500 else ""
    assert rec["statusCode"] == status, f"{rec}{log}"
    assert rec["bodyIsJson"], (
        f"error body was not JSON: {rec.get('bodyErrorName')}: {rec.get('bodyErrorMessage')}")
    assert (rec.get("contentType") or "").startswith("application/json"), rec.get("contentType")
    body = rec["body"]
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("error_description"), str) and body["error_description"], body
    assert rec["shortErrorDescription"] == body["error_description"]
    assert rec["message"].endswith(f" - {body['error_description']}"), rec["message"]
    return body


# ------------------------------------------------------------------ the harness itself


def test_driver_ran_cleanly(results: dict[str, Any], node_tools: Any) -> None:
    assert results["library"]["name"] == "particle-api-js"
    assert results["library"]["version"].startswith("12."), results["library"]
    assert node_tools.packages["particle-api-js"] == results["library"]["version"]
    assert results["unexpected"] == [], results["unexpected"]
    assert results["_exit_code"] == 0, results["_stderr"]


# ------------------------------------------------------------------ login and user


def test_login_returns_particle_token(results: dict[str, Any]) -> None:
    body = _ok(results, "login")
    assert TOKEN_RE.match(body["access_token"]), body
    assert body["token_type"] == "bearer", body
    # The library asks for expires_in=7776000 (its default tokenDuration).
    assert body["expires_in"] == 7_776_000, body


def test_get_user_info(results: dict[str, Any]) -> None:
    body = _ok(results, "getUserInfo")
    assert body["username"] == OWNER, body


def test_login_wrong_password_is_invalid_grant(results: dict[str, Any]) -> None:
    body = _json_error(results, "loginWrongPassword", 400)
    assert body["error"] == "invalid_grant", body


def test_bad_token_is_401_invalid_token(results: dict[str, Any]) -> None:
    body = _json_error(results, "getUserInfoBadToken", 401)
    assert body["error"] == "invalid_token", body


def test_missing_product_is_json_404(results: dict[str, Any]) -> None:
    _json_error(results, "getProductMissing", 404)


# ------------------------------------------------------------------ products and team


def test_list_products_includes_seeded_product(results: dict[str, Any], seed: Seed) -> None:
    product = _need_product(seed)
    body = _ok(results, "listProducts", seed)
    assert isinstance(body.get("products"), list), body
    found = [p for p in body["products"] if p.get("id") == product["id"]]
    assert len(found) == 1, body
    assert found[0]["name"] == PRODUCT_NAME, found[0]
    assert found[0]["slug"] == product["slug"], found[0]
    assert found[0]["platform_id"] == PLATFORM_ID, found[0]


def test_get_product_by_slug_and_id(results: dict[str, Any], seed: Seed) -> None:
    product = _need_product(seed)
    for step in ("getProduct", "getProductById"):
        body = _ok(results, step, seed)
        got = body.get("product")
        assert isinstance(got, dict), body
        assert got["id"] == product["id"], (step, got)
        assert got["slug"] == product["slug"], (step, got)
        assert got["name"] == PRODUCT_NAME, (step, got)


def test_list_team_members_has_owner(results: dict[str, Any], seed: Seed) -> None:
    _need_product(seed)
    body = _ok(results, "listTeamMembers", seed)
    # Particle returns {"ok": true, "team": [...]}; the library's types say a bare array.
    team = body["team"] if isinstance(body, dict) else body
    assert isinstance(team, list), body
    mine = [m for m in team if m.get("username") == OWNER]
    assert len(mine) == 1, team
    role = mine[0].get("role")
    assert isinstance(role, dict), mine[0]
    assert role.get("name") in ("Owner", "Administrator"), mine[0]
