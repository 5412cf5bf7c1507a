"""The Fleet health page in a real browser against ``corral serve --demo``: the live demo
fleet shows up online and its events reach the chart through the rollups; the range form
works from the keyboard-reachable controls."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from consolekit import DEMO_PASSWORD, DEMO_USER, PASSWORD, Api, sign_in, tab_walk, visit

pytestmark = pytest.mark.slow

BASE = "/console/products/demo-product/fleet"


def _stat(page: Any, label: str) -> int:
    text = page.locator(".stat", has=page.locator("dt", has_text=label)).locator("dd")
    return int(re.sub(r"[^\d]", "", text.first.inner_text().split("/")[0]) or 0)


def test_fleet_health_of_the_live_demo_fleet(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, BASE)
    page.get_by_role("heading", name="Fleet health", level=1).wait_for()
    assert _stat(page, "Devices") == 25  # the demo product's devices
    deadline = time.monotonic() + 60
    while _stat(page, "Online now") == 0 or _stat(page, "Events received") == 0 \
            or _stat(page, "Data operations") == 0:
        assert time.monotonic() < deadline, "the demo fleet never showed up"
        time.sleep(1.0)
        page.reload()
    assert page.locator("svg.chart rect").count() > 0
    assert page.get_by_role("img", name=re.compile("Events received")).count() == 1
    assert page.get_by_role("img", name=re.compile("Data operations")).count() == 1
    assert page.get_by_role("columnheader", name="Timed out").count() == 1
    page.get_by_label("Range").select_option("hour")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"range=hour"))
    page.get_by_role("heading", name="Fleet health", level=1).wait_for()
    # the sidebar leads here
    assert page.get_by_role("link", name="Fleet health").count() >= 1
    page.get_by_role("link", name="Map of locations").click()
    page.get_by_role("heading", name="Fleet locations", level=1).wait_for()
    visit(page, base, BASE + "/map")


def test_fleet_health_filtered_by_group(page: Any, console_server: Any) -> None:
    """The group filter, chosen from the product's groups: the demo's 6 beta devices; the
    Device OS filter with a version no device runs: none; back to all devices: 25."""
    base = console_server.url
    sign_in(page, base)
    visit(page, base, BASE)
    page.get_by_role("heading", name="Fleet health", level=1).wait_for()
    page.get_by_label("Device group").select_option("beta")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"group=beta"))
    assert _stat(page, "Devices") == 6
    assert page.locator("[data-filtered]").count() == 1
    assert page.get_by_label("Device group").input_value() == "beta"
    page.get_by_label("Device group").select_option("")
    page.get_by_label("Device OS version").fill("0.0.1")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"os=0\.0\.1"))
    assert _stat(page, "Devices") == 0
    page.get_by_label("Device OS version").fill("")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"os=&|os=$"))
    assert _stat(page, "Devices") == 25
    assert page.locator("[data-filtered]").count() == 0


ORG = "/console/orgs/demo-org/fleet"


def _cell(page: Any, product: str, column: int) -> int:
    row = page.locator(f"tr[data-product='{product}']")
    return int(re.sub(r"[^\d]", "", row.locator("td").nth(column).inner_text()) or 0)


def test_organization_fleet_health(page: Any, console_server: Any) -> None:
    """The organization's Fleet health page, reached from its navigation: a row per product
    and the total; the group filter narrows each product's row and carries to the product's
    own page; every control is labelled and reachable with Tab."""
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/orgs/demo-org")
    page.get_by_role("navigation", name="Organization").get_by_role(
        "link", name="Fleet health").click()
    page.wait_for_url(re.compile(r".*/console/orgs/demo-org/fleet$"))
    page.get_by_role("heading", name="Fleet health", level=1).wait_for()
    visit(page, base, ORG)
    tab_walk(page)
    assert _cell(page, "demo-product", 0) == 25  # devices
    rows = page.locator("[data-org-products] tbody tr")
    total = sum(_cell(page, r.get_attribute("data-product"), 0) for r in rows.all())
    assert _stat(page, "Devices") == total >= 25
    page.get_by_label("Range").select_option("week")
    page.get_by_label("Device group").select_option("beta")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"group=beta"))
    assert _cell(page, "demo-product", 0) == 6
    assert page.locator("[data-filtered]").count() == 1
    assert page.get_by_label("Range").input_value() == "week"
    page.locator("tr[data-product='demo-product']").get_by_role("link").click()
    page.wait_for_url(re.compile(r"/console/products/demo-product/fleet\?.*group=beta"))
    assert _stat(page, "Devices") == 6
    assert page.get_by_label("Range").input_value() == "week"
    visit(page, base, ORG + "?group=Not%20a%20name")
    assert page.locator("[data-filter-error]").count() == 1


ALERTS = BASE + "/alerts"


def test_alert_rules_added_edited_and_deleted(page: Any, console_server: Any) -> None:
    """The rules page: a refused threshold is explained next to its field (the API's checks),
    a rule is added, shows its state once the minute's check ran, is edited and deleted."""
    base = console_server.url
    sign_in(page, base)
    visit(page, base, BASE)
    page.get_by_role("link", name="Manage alert rules").click()
    page.get_by_role("heading", name="Alert rules", level=1).wait_for()
    form = page.locator("form[data-new-rule]")
    form.get_by_label("Kind").select_option("error_rate_above")
    form.get_by_label("Threshold").fill("150")
    form.get_by_role("button", name="Add rule").click()
    form = page.locator("form[data-new-rule]")
    err = form.locator("#f-new-threshold-err")
    err.wait_for()
    assert "percentage from 0 to 100" in err.inner_text()
    assert form.get_by_label("Threshold").get_attribute("aria-invalid") == "true"
    form.get_by_label("Threshold").fill("abc")
    form.get_by_role("button", name="Add rule").click()
    page.wait_for_load_state()  # the answer is a new page (the old one had the error too)
    assert page.locator("form[data-new-rule] #f-new-threshold-err").count() == 1
    form = page.locator("form[data-new-rule]")
    name = f"Fleet down {int(time.time())}"
    form.get_by_label("Kind").select_option("online_below")
    form.get_by_label("Threshold").fill("1000")  # the demo never has this many online
    form.get_by_label("Name").fill(name)
    form.get_by_role("button", name="Add rule").click()
    page.get_by_role("status").filter(has_text="added").wait_for()
    row = page.locator("[data-alert-rules] tbody tr", has_text=name)
    assert row.count() == 1
    deadline = time.monotonic() + 90  # the once-a-minute check raises it
    while "raised" not in row.locator("[data-rule-state]").inner_text():
        assert time.monotonic() < deadline, "the rule was never checked"
        page.wait_for_timeout(2000)
        visit(page, base, ALERTS)
        row = page.locator("[data-alert-rules] tbody tr", has_text=name)
    rule_id = row.get_attribute("data-rule")
    page.get_by_text(f"Edit “{name}”").click()
    edit = page.locator(f"form[action$='/fleet/alerts/{rule_id}']")
    edit.get_by_label("Threshold").fill("0")
    edit.get_by_role("button", name="Save rule").click()
    edit = page.locator(f"form[action$='/fleet/alerts/{rule_id}']")
    assert "devices above 0" in edit.locator(".error").inner_text()
    edit.get_by_label("Threshold").fill("1")
    edit.get_by_label("Enabled").uncheck()
    edit.get_by_role("button", name="Save rule").click()
    page.get_by_role("status").filter(has_text="saved").wait_for()
    row = page.locator("[data-alert-rules] tbody tr", has_text=name)
    assert "off" in row.locator("[data-rule-state]").inner_text()
    page.get_by_text(f"Edit “{name}”").click()
    page.once("dialog", lambda d: d.accept())
    page.locator(f"form[action$='/fleet/alerts/{rule_id}/delete']").get_by_role(
        "button", name="Delete rule").click()
    page.get_by_role("status").filter(has_text="deleted").wait_for()
    assert page.locator("[data-alert-rules] tbody tr", has_text=name).count() == 0


def test_alert_rules_read_only_for_a_viewer(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    owner = api.login(DEMO_USER, DEMO_PASSWORD)
    api.call(owner, "POST", "/v1/products/demo-product/fleet/alerts",
             json={"kind": "silent_longer", "threshold": 86_400, "name": "Quiet one"})
    viewer = f"alerts-viewer-{int(time.time() * 1000)}@example.com"
    api.signup(viewer)
    api.invite_and_accept(owner, "demo-org", viewer, "View-only")
    sign_in(page, base, viewer, PASSWORD)
    visit(page, base, ALERTS)
    assert page.locator("[data-alert-rules] tbody tr", has_text="Quiet one").count() >= 1
    assert page.locator("form[data-new-rule]").count() == 0
    assert page.get_by_role("button", name="Save rule").count() == 0
    assert "needs Developer" in page.content()
