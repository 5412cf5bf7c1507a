"""particle-api-js 12 against corral's integration routes (issue 19): createIntegration,
listIntegrations, editIntegration and deleteIntegration in the sandbox, a product and an
organization; the legacy createWebhook, listWebhooks and deleteWebhook in the sandbox and a
product (``driver_integrations.mjs``). The target is never called (no events)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from compatkit import owner_org_product, step

pytestmark = pytest.mark.compat

OWNER = "integrations-owner@example.com"
PASSWORD = "compat correct horse 44"
TARGET = "https://hooks.example.com/particle"


@pytest.fixture(scope="module")
def results(run_driver: Callable[[str, dict[str, str]], dict[str, Any]],
            corral_server: Any) -> dict[str, Any]:
    org, product = owner_org_product(corral_server.base_url, OWNER, PASSWORD, "Compat Hooks")
    return run_driver("driver_integrations.mjs", {
        "CORRAL_COMPAT_USERNAME": OWNER, "CORRAL_COMPAT_PASSWORD": PASSWORD,
        "CORRAL_COMPAT_PRODUCT": product["slug"],
        "CORRAL_COMPAT_ORG": org["slug"], "CORRAL_COMPAT_TARGET": TARGET,
        "CORRAL_COMPAT_DEADLINE_MS": "60000"})


def test_driver_ran_clean(results: dict[str, Any]) -> None:
    assert results["unexpected"] == []


@pytest.mark.parametrize("scope", ["sandbox", "product", "org"])
def test_create_list_edit_delete(results: dict[str, Any], scope: str) -> None:
    created = step(results, f"{scope}Create")
    assert created["ok"] and created["statusCode"] == 201, created
    body = created["body"]
    assert body["ok"] is True and body["event"] == f"{scope}-temp" and body["url"] == TARGET
    assert body["hookUrl"].endswith(f"/integrations/{body['id']}")
    listed = step(results, f"{scope}List")
    assert listed["ok"], listed
    [row] = listed["body"]
    assert (row["id"], row["event"], row["integration_type"], row["requestType"]) == (
        body["id"], f"{scope}-temp", "Webhook", "POST")
    edited = step(results, f"{scope}Edit")
    assert edited["ok"] and edited["statusCode"] == 200, edited
    shown = edited["body"]["integration"]
    assert (shown["event"], shown["requestType"], shown["disabled"]) == (
        f"{scope}-edited", "PUT", True)
    assert shown["headers"] == {"Authorization": "Bear…"}  # secrets masked
    [row] = step(results, f"{scope}ListAfterEdit")["body"]
    assert row["event"] == f"{scope}-edited"
    deleted = step(results, f"{scope}Delete")
    assert deleted["ok"] and deleted["statusCode"] == 204, deleted
    assert step(results, f"{scope}ListAfterDelete")["body"] == []


def test_invalid_integration_is_a_json_error(results: dict[str, Any]) -> None:
    rec = step(results, "createInvalid")
    assert rec["ok"] is False and rec["statusCode"] == 400 and rec["bodyIsJson"], rec
    assert rec["body"]["ok"] is False and "url" in rec["body"]["error_description"]


@pytest.mark.parametrize("scope", ["sandbox", "product"])
def test_legacy_webhooks(results: dict[str, Any], scope: str) -> None:
    created = step(results, f"{scope}CreateWebhook")
    assert created["ok"] and created["statusCode"] == 201, created
    body = created["body"]
    assert (body["event"], body["url"]) == (f"{scope}-legacy", TARGET)
    assert body["name"] and body["created_at"] and body["hookUrl"]
    [row] = step(results, f"{scope}ListWebhooks")["body"]
    assert (row["id"], row["integration_type"], row["requestType"]) == (
        body["id"], "Webhook", "PUT")
    deleted = step(results, f"{scope}DeleteWebhook")
    assert deleted["ok"], deleted
    assert step(results, f"{scope}ListWebhooksAfterDelete")["body"] == []
