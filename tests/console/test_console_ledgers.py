"""Ledgers in a real browser: create a ledger with a JSON Schema (a bad name is refused next
to the field), open a product-default instance, see invalid JSON and schema violations
refused with their paths, save, merge, read an earlier version, roll back, archive; a
View-only member reads but is offered no editor."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from consolekit import DEMO_PASSWORD, DEMO_USER, PASSWORD, Api, audit, sign_in, tab_walk, visit

pytestmark = pytest.mark.slow

ORG = "/console/orgs/demo-org"
SCHEMA = '{"type": "object", "properties": {"interval": {"type": "integer", "minimum": 1}}}'


def test_ledger_create_edit_history_rollback(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, ORG)
    page.get_by_role("link", name="Ledgers").first.click()
    page.wait_for_url(re.compile(".*/ledgers$"))
    assert page.get_by_text("No ledgers yet").is_visible()
    new = page.get_by_role("region", name="New ledger")
    new.get_by_label("Name").fill("Bad Name")
    new.get_by_role("button", name="Create ledger").click()
    assert "lowercase letters" in page.locator("#f-ledger-name-err").inner_text()
    audit(page)
    new = page.get_by_role("region", name="New ledger")
    new.get_by_label("Name").fill("config")
    new.get_by_label("Scope").select_option("Device")
    new.get_by_label("Direction").select_option("CloudToDevice")
    new.get_by_label("JSON Schema (optional)").fill(SCHEMA)
    new.get_by_role("button", name="Create ledger").click()
    page.wait_for_url(re.compile(".*/ledgers/config$"))
    audit(page)
    tab_walk(page)

    page.get_by_label("Scope value").fill("product:demo-product")
    page.get_by_role("button", name="Open").click()
    page.wait_for_url(re.compile(r".*/ledgers/config/instance\?scope=product"))
    assert page.get_by_text("nothing written yet").is_visible()
    audit(page)
    editor = page.get_by_label("JSON document")
    editor.fill("{not json")
    page.get_by_role("button", name="Save as a new version").click()
    assert "not valid JSON" in page.locator("#f-ledger-data-err").inner_text()
    page.get_by_label("JSON document").fill('{"interval": 0, "net": {"ssid": "a", "tries": 3}}')
    page.get_by_role("button", name="Save as a new version").click()
    violations = page.locator("[data-violations]")
    assert "/interval" in violations.inner_text() and "minimum" in violations.inner_text()
    audit(page)
    page.get_by_label("JSON document").fill('{"interval": 60, "net": {"ssid": "a", "tries": 3}}')
    page.get_by_role("button", name="Save as a new version").click()
    page.wait_for_url(re.compile(r".*/instance\?scope=product"))
    assert page.get_by_text("Saved as version 1.").is_visible()
    page.get_by_label("JSON document").fill('{"net": {"ssid": "b"}}')
    page.get_by_label("How to save").select_option("Merge")
    page.get_by_role("button", name="Save as a new version").click()
    page.get_by_text("Saved as version 2.").wait_for()  # the answer is a new page
    assert page.get_by_text("Saved as version 2.").is_visible()
    shown = page.get_by_label("JSON document").input_value()
    assert '"ssid": "b"' in shown and '"tries": 3' in shown and '"interval": 60' in shown
    assert page.locator("tr[data-version]").count() == 2

    page.get_by_role("link", name="Show version 1").click()
    assert '"ssid": "a"' in page.locator("[data-version-document]").inner_text()
    audit(page)
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Roll back to version 1").click()
    page.get_by_text("Version 1 restored as version 3.").wait_for()  # the answer is a new page
    assert page.get_by_text("Version 1 restored as version 3.").is_visible()
    assert '"ssid": "a"' in page.get_by_label("JSON document").input_value()
    assert page.locator("tr[data-version='3']").inner_text().startswith("3")

    visit(page, base, f"{ORG}/ledgers/config")
    assert page.locator("tr[data-instance]").count() == 1
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Archive ledger").click()
    page.get_by_text("Ledger config archived.").wait_for()  # the answer is a new page
    assert page.get_by_text("Ledger config archived.").is_visible()


def _seed(base: str, name: str, scope: str, owner_data: dict[str, Any]) -> tuple[Api, str]:
    """A demo-org ledger with an owner-level document, through the API."""
    api = Api(base)
    owner = api.login("demo@corral.example", "corral-demo")
    api.call(owner, "POST", "/v1/orgs/demo-org/ledgers",
             json={"ledger": {"name": name, "scope": scope}})
    api.call(owner, "PUT", f"/v1/orgs/demo-org/ledgers/{name}/instances/owner",
             json={"instance": {"data": owner_data}})
    return api, owner


def test_view_only_member_reads_without_editor(page: Any, console_server: Any) -> None:
    base = console_server.url
    api, owner = _seed(base, "notes", "Owner", {"motd": "hello"})
    api.signup("ledger-viewer@example.com")
    api.invite_and_accept(owner, "demo-org", "ledger-viewer@example.com", "View-only")
    sign_in(page, base, "ledger-viewer@example.com", PASSWORD)
    visit(page, base, f"{ORG}/ledgers")
    assert page.get_by_role("region", name="New ledger").count() == 0
    visit(page, base, f"{ORG}/ledgers/notes/instance?scope=owner")
    assert "hello" in page.locator(".code-block").first.inner_text()
    assert page.get_by_label("JSON document").count() == 0
    assert page.get_by_role("button", name=re.compile("Roll back")).count() == 0


def test_product_page_reaches_only_the_products_documents(page: Any,
                                                           console_server: Any) -> None:
    base = console_server.url
    _seed(base, "prodcfg", "Device", {"secret": "org-wide"})
    sign_in(page, base)
    visit(page, base, "/console/products/demo-product")
    page.get_by_role("link", name="Ledgers").first.click()
    page.wait_for_url(re.compile(".*/products/demo-product/ledgers$"))
    assert page.get_by_role("region", name="New ledger").count() == 0
    page.get_by_role("link", name="prodcfg").click()
    page.wait_for_url(re.compile(".*/products/demo-product/ledgers/prodcfg$"))
    audit(page)
    assert page.locator("tr[data-instance]").count() == 0  # the owner-level one is not listed
    assert page.get_by_role("button", name="Archive ledger").count() == 0
    page.get_by_label("Scope value").fill("product:demo-product")
    page.get_by_role("button", name="Open").click()
    page.get_by_label("JSON document").fill('{"interval": 30}')
    page.get_by_role("button", name="Save as a new version").click()
    page.get_by_text("Saved as version 1.").wait_for()  # the answer is a new page
    assert page.get_by_text("Saved as version 1.").is_visible()
    visit(page, base, "/console/products/demo-product/ledgers/prodcfg/instance?scope=owner",
          status=404)


def test_ledger_devices_show_who_applied_the_latest(page: Any, console_server: Any) -> None:
    """The demo's simulated devices take ledgers: after a product-level write they
    acknowledge it and show "in sync"; the demo devices that are offline show "behind"
    (and are all that "Behind only" lists)."""
    base = console_server.url
    api = Api(base)
    token = api.login(DEMO_USER, DEMO_PASSWORD)
    api.call(token, "POST", "/v1/orgs/demo-org/ledgers", json={"ledger": {
        "name": "fleet-config", "scope": "Product", "direction": "CloudToDevice"}})
    api.call(token, "PUT", "/v1/orgs/demo-org/ledgers/fleet-config/instances/demo-product",
             json={"instance": {"data": {"interval": 30}}})
    in_sync: list[str] = []
    for _ in range(150):  # the simulated devices apply it within seconds
        listed = api.call(token, "GET", "/v1/orgs/demo-org/ledgers/fleet-config/devices",
                          params={"per_page": 100})["devices"]
        in_sync = [d["device_id"] for d in listed if d["in_sync"]]
        if len(in_sync) >= 5:
            break
        time.sleep(0.2)
    assert len(in_sync) >= 5, listed
    sign_in(page, base)
    visit(page, base, f"{ORG}/ledgers/fleet-config")
    devices = page.get_by_role("region", name="Devices")
    assert devices.locator("[data-state='in-sync']").count() >= 5
    behind = devices.locator("[data-state='behind']").count()
    assert behind >= 1  # the demo product's devices that are not simulated never connect
    audit(page)
    devices.get_by_role("link", name="Behind only").click()
    page.wait_for_url(re.compile(r".*/ledgers/fleet-config\?behind=1$"))
    devices = page.get_by_role("region", name="Devices")
    assert devices.locator("[data-state='in-sync']").count() == 0
    assert devices.locator("[data-state='behind']").count() == min(behind, 50)
    for did in in_sync:
        assert devices.locator(f"tr[data-device='{did}']").count() == 0
