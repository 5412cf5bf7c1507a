"""particle-api-js 12 against corral's integration routes (issue 19): createIntegration,
listIntegrations, editIntegration and deleteIntegration in the sandbox, a product and an
organization; the legacy createWebhook, listWebhooks and deleteWebhook in the sandbox and a
product (``driver_integrations.mjs``). The target is never called (no events)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.compat

OWNER = "integrations-owner@example.com"
PASSWORD = "compat correct horse 44"
TARGET = "https://hooks.example.com/particle"


def _expect(r: httpx.Response, *statuses: int) -> Any:
    assert r.status_code in statuses, f"seed: {r.request.url.path} -> {r.status_code} {r.text}"
    return r.json() if r.content else None


@pytest.fixture(scope="module")
def results(run_driver: Callable[[str, dict[str, str]], dict[str, Any]],
            corral_server: Any) -> dict[str, Any]:
    with httpx.Client(base_url=corral_server.base_url, timeout=15.0, trust_env=False) as http:
        _expect(http.post("/v1/users", json={"username": OWNER, "password": PASSWORD}), 200)
        token = _expect(http.post("/oauth/token", data={
            "grant_type": "password", "username": OWNER, "password": PASSWORD,
            "client_id": "particle-cli", "client_secret": "particle-cli"}), 200)["access_token"]
        http.headers["Authorization"] = f"Bearer {token}"
        org = _expect(http.post("/v1/orgs", json={"name": "Compat Hooks Org"}),
                      200, 201)["organization"]
        body = _expect(http.post(f"/v1/orgs/{org['slug']}/products", json={
            "product": {"name": "Compat Hooks", "platform_id": 12}}), 200, 201)
    return run_driver("driver_integrations.mjs", {
        "CORRAL_COMPAT_USERNAME": OWNER, "CORRAL_COMPAT_PASSWORD": PASSWORD,
        "CORRAL_COMPAT_PRODUCT": body.get("product", body)["slug"],
        "CORRAL_COMPAT_ORG": org["slug"], "CORRAL_COMPAT_TARGET": TARGET,
        "CORRAL_COMPAT_DEADLINE_MS": "60000"})


def _rec(results: dict[str, Any], name: str) -> dict[str, Any]:
    rec = results["steps"].get(name)
    assert rec is not None, (name, results.get("order"), results["unexpected"])
    return rec


def test_driver_ran_clean(results: dict[str, Any]) -> None:
    assert results["unexpected"] == []


@pytest.mark.parametrize("scope", ["sandbox", "product", "org"])
def test_create_list_edit_delete(results: dict[str, Any], scope: str) -> None:
    created = _rec(results, f"{scope}Create")
    assert created["ok"] and created["statusCode"] == 201, created
    body = created["body"]
    assert body["ok"] is True and body["event"] == f"{scope}-temp" and body["url"] == TARGET
    assert body["hookUrl"].endswith(f"/integrations/{body['id']}")
    listed = _rec(results, f"{scope}List")
    assert listed["ok"], listed
    [row] = listed["body"]
    assert (row["id"], row["event"], row["integration_type"], row["requestType"]) == (
        body["id"], f"{scope}-temp", "Webhook", "POST")
    edited = _rec(results, f"{scope}Edit")
    assert edited["ok"] and edited["statusCode"] == 200, edited
    shown = edited["body"]["integration"]
    assert (shown["event"], shown["requestType"], shown["disabled"]) == (
        f"{scope}-edited", "PUT", True)
    assert shown["headers"] == {"Authorization": "Bear…"}  # secrets masked
    [row] = _rec(results, f"{scope}ListAfterEdit")["body"]
    assert row["event"] == f"{scope}-edited"
    deleted = _rec(results, f"{scope}Delete")
    assert deleted["ok"] and deleted["statusCode"] == 204, deleted
    assert _rec(results, f"{scope}ListAfterDelete")["body"] == []


def test_invalid_integration_is_a_json_error(results: dict[str, Any]) -> None:
    rec = _rec(results, "createInvalid")
    assert rec["ok"] is False and rec["statusCode"] == 400 and rec["bodyIsJson"], rec
    assert rec["body"]["ok"] is False and "url" in rec["body"]["error_description"]


@pytest.mark.parametrize("scope", ["sandbox", "product"])
def test_legacy_webhooks(results: dict[str, Any], scope: str) -> None:
    created = _rec(results, f"{scope}CreateWebhook")
    assert created["ok"] and created["statusCode"] == 201, created
    body = created["body"]
    assert (body["event"], body["url"]) == (f"{scope}-legacy", TARGET)
    assert body["name"] and body["created_at"] and body["hookUrl"]
    [row] = _rec(results, f"{scope}ListWebhooks")["body"]
    assert (row["id"], row["integration_type"], row["requestType"]) == (
        body["id"], "Webhook", "PUT")
    deleted = _rec(results, f"{scope}DeleteWebhook")
    assert deleted["ok"], deleted
    assert _rec(results, f"{scope}ListWebhooksAfterDelete")["body"] == []
