"""particle-api-js 12 against corral's ledger routes (issue 21): createLedger, listLedgers,
getLedger, updateLedger, archiveLedger, setLedgerInstance (Replace, Merge),
getLedgerInstance, listLedgerInstances, listLedgerInstanceVersions,
getLedgerInstanceVersion and deleteLedgerInstance in the sandbox and an organization, an
unknown ledger and a schema violation (``driver_ledgers.mjs``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from compatkit import owner_org_product, step, step_ok

pytestmark = pytest.mark.compat

OWNER = "ledgers-owner@example.com"
PASSWORD = "compat correct horse 45"


@pytest.fixture(scope="module")
def results(run_driver: Callable[[str, dict[str, str]], dict[str, Any]],
            corral_server: Any) -> dict[str, Any]:
    org, product = owner_org_product(corral_server.base_url, OWNER, PASSWORD, "Compat Ledgers")
    results = run_driver("driver_ledgers.mjs", {
        "CORRAL_COMPAT_USERNAME": OWNER, "CORRAL_COMPAT_PASSWORD": PASSWORD,
        "CORRAL_COMPAT_ORG": org["slug"], "CORRAL_COMPAT_PRODUCT": product["slug"],
        "CORRAL_COMPAT_DEADLINE_MS": "60000"})
    results["_product_id"] = product["id"]
    return results


def test_driver_ran_clean(results: dict[str, Any]) -> None:
    assert results["unexpected"] == []


@pytest.mark.parametrize("scope", ["sandbox", "org"])
def test_definitions(results: dict[str, Any], scope: str) -> None:
    name = f"{scope}-config"
    created = step_ok(results, f"{scope}Create", 201)["ledger"]
    assert (created["name"], created["scope"], created["direction"]) == (
        name, "Product", "CloudToDevice")  # the client's Downstream
    listed = step_ok(results, f"{scope}List")
    assert [d["name"] for d in listed["ledger_definitions"]] == [name]
    assert step_ok(results, f"{scope}Get")["ledger"]["description"] == "settings"
    assert step_ok(results, f"{scope}Update")["ledger"]["description"] == "new words"
    assert step_ok(results, f"{scope}Archive") == {"ok": True}


@pytest.mark.parametrize("scope", ["sandbox", "org"])
def test_instances_and_versions(results: dict[str, Any], scope: str) -> None:
    first = step_ok(results, f"{scope}Set")["instance"]
    assert first["data"] == {"interval": 60, "net": {"ssid": "a", "tries": 3}}
    assert first["version"] == 1
    if scope == "org":
        assert first["scope"]["type"] == "Product"
        assert first["scope"]["value"] == str(results["_product_id"])
    else:
        assert first["scope"]["type"] == "Owner"
    merged = step_ok(results, f"{scope}Merge")["instance"]
    assert merged["data"] == {"interval": 60, "net": {"ssid": "b", "tries": 3}}
    got = step_ok(results, f"{scope}GetInstance")["instance"]
    assert got["data"] == merged["data"] and got["version"] == 2
    assert got["size_bytes"] == len(b'{"interval":60,"net":{"ssid":"b","tries":3}}')
    listed = step_ok(results, f"{scope}ListInstances")
    assert [i["version"] for i in listed["instances"]] == [2]
    assert listed["meta"]["total"] == 1
    versions = step_ok(results, f"{scope}Versions")
    assert [v["version"] for v in versions["versions"]] == [2, 1]
    assert versions["meta"] == {"has_more": False}
    assert step_ok(results, f"{scope}Version1")["instance"]["data"] == first["data"]
    assert step_ok(results, f"{scope}DeleteInstance")["ok"] is True
    gone = step(results, f"{scope}GetDeleted")
    assert not gone["ok"] and gone["statusCode"] == 404, gone
    assert gone["body"]["error"] == "ledger_instance_not_found"


def test_errors(results: dict[str, Any]) -> None:
    unknown = step(results, "unknownLedger")
    assert not unknown["ok"] and unknown["statusCode"] == 404
    assert unknown["body"]["error"] == "ledger_not_found"
    assert step_ok(results, "createStrict", 201)["ledger"]["schema"]["type"] == "object"
    bad = step(results, "schemaViolation")
    assert not bad["ok"] and bad["statusCode"] == 422, bad
    assert bad["body"]["message"] == "Invalid Schema"
    assert [(v["path"], v["keyword"]) for v in bad["body"]["violations"]] == [("/n", "type")]
