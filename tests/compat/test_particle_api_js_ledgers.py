"""particle-api-js 12 against corral's ledger routes (issue 21): createLedger, listLedgers,
getLedger, updateLedger, archiveLedger, setLedgerInstance (Replace, Merge),
getLedgerInstance, listLedgerInstances, listLedgerInstanceVersions,
getLedgerInstanceVersion and deleteLedgerInstance in the sandbox and an organization, an
unknown ledger and a schema violation (``driver_ledgers.mjs``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.compat

OWNER = "ledgers-owner@example.com"
PASSWORD = "compat correct horse 45"


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
        org = _expect(http.post("/v1/orgs", json={"name": "Compat Ledgers Org"}),
                      200, 201)["organization"]
        body = _expect(http.post(f"/v1/orgs/{org['slug']}/products", json={
            "product": {"name": "Compat Ledgers", "platform_id": 12}}), 200, 201)
    product = body.get("product", body)
    results = run_driver("driver_ledgers.mjs", {
        "CORRAL_COMPAT_USERNAME": OWNER, "CORRAL_COMPAT_PASSWORD": PASSWORD,
        "CORRAL_COMPAT_ORG": org["slug"], "CORRAL_COMPAT_PRODUCT": product["slug"],
        "CORRAL_COMPAT_DEADLINE_MS": "60000"})
    results["_product_id"] = product["id"]
    return results


def _rec(results: dict[str, Any], name: str) -> dict[str, Any]:
    rec = results["steps"].get(name)
    assert rec is not None, (name, results.get("order"), results["unexpected"])
    return rec


def _ok(results: dict[str, Any], name: str, status: int = 200) -> Any:
    rec = _rec(results, name)
    assert rec["ok"] and rec["statusCode"] == status, rec
    return rec["body"]


def test_driver_ran_clean(results: dict[str, Any]) -> None:
    assert results["unexpected"] == []


@pytest.mark.parametrize("scope", ["sandbox", "org"])
def test_definitions(results: dict[str, Any], scope: str) -> None:
    name = f"{scope}-config"
    created = _ok(results, f"{scope}Create", 201)["ledger"]
    assert (created["name"], created["scope"], created["direction"]) == (
        name, "Product", "CloudToDevice")  # the client's Downstream
    listed = _ok(results, f"{scope}List")
    assert [d["name"] for d in listed["ledger_definitions"]] == [name]
    assert _ok(results, f"{scope}Get")["ledger"]["description"] == "settings"
    assert _ok(results, f"{scope}Update")["ledger"]["description"] == "new words"
    assert _ok(results, f"{scope}Archive") == {"ok": True}


@pytest.mark.parametrize("scope", ["sandbox", "org"])
def test_instances_and_versions(results: dict[str, Any], scope: str) -> None:
    first = _ok(results, f"{scope}Set")["instance"]
    assert first["data"] == {"interval": 60, "net": {"ssid": "a", "tries": 3}}
    assert first["version"] == 1
    if scope == "org":
        assert first["scope"]["type"] == "Product"
        assert first["scope"]["value"] == str(results["_product_id"])
    else:
        assert first["scope"]["type"] == "Owner"
    merged = _ok(results, f"{scope}Merge")["instance"]
    assert merged["data"] == {"interval": 60, "net": {"ssid": "b", "tries": 3}}
    got = _ok(results, f"{scope}GetInstance")["instance"]
    assert got["data"] == merged["data"] and got["version"] == 2
    assert got["size_bytes"] == len(b'{"interval":60,"net":{"ssid":"b","tries":3}}')
    listed = _ok(results, f"{scope}ListInstances")
    assert [i["version"] for i in listed["instances"]] == [2]
    assert listed["meta"]["total"] == 1
    versions = _ok(results, f"{scope}Versions")
    assert [v["version"] for v in versions["versions"]] == [2, 1]
    assert versions["meta"] == {"has_more": False}
    assert _ok(results, f"{scope}Version1")["instance"]["data"] == first["data"]
    assert _ok(results, f"{scope}DeleteInstance")["ok"] is True
    gone = _rec(results, f"{scope}GetDeleted")
    assert not gone["ok"] and gone["statusCode"] == 404, gone
    assert gone["body"]["error"] == "ledger_instance_not_found"


def test_errors(results: dict[str, Any]) -> None:
    unknown = _rec(results, "unknownLedger")
    assert not unknown["ok"] and unknown["statusCode"] == 404
    assert unknown["body"]["error"] == "ledger_not_found"
    assert _ok(results, "createStrict", 201)["ledger"]["schema"]["type"] == "object"
    bad = _rec(results, "schemaViolation")
    assert not bad["ok"] and bad["statusCode"] == 422, bad
    assert bad["body"]["message"] == "Invalid Schema"
    assert [(v["path"], v["keyword"]) for v in bad["body"]["violations"]] == [("/n", "type")]
