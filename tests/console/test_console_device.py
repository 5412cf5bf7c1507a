"""The device page and the logs in a real browser, against the live demo fleet: a function
call on a simulated device, variables read and refreshed, events arriving live (device page
and product log, with pause), history scroll-back, edits with errors next to the field,
groups, claiming, the MQTT secret shown once, and a customer who sees only their device."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import pytest

from consolekit import DEMO_PASSWORD, DEMO_USER, PASSWORD, Api, audit, sign_in, visit
from corral.demo import DEMO_FLEET_IDS

pytestmark = pytest.mark.slow

LIVE = DEMO_FLEET_IDS[0]  # demo-sensor-01: one of the simulated devices `serve --demo` runs
QUIET = DEMO_FLEET_IDS[20]  # demo-sensor-21: imported, never connected
PRODUCT = "/console/products/demo-product"


def wait_described(page: Any, base: str, device_id: str, timeout_s: float = 60) -> None:
    """Reload the device page until the device is online and described (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        visit(page, base, f"{PRODUCT}/devices/{device_id}")
        if page.locator("form[data-call]").count() and "Online" in page.locator(
                ".presence").inner_text():
            return
        assert time.monotonic() < deadline, "the demo device never came online described"
        page.wait_for_timeout(1000)


def test_function_call_on_a_live_device(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    wait_described(page, base, LIVE)
    led = page.locator("form[data-call]").filter(has=page.locator("input[value=led]"))
    led.get_by_label("Argument for led").fill("on")
    led.get_by_role("button", name="Call led").click()
    result = led.locator("[data-call-result]")
    result.filter(has_text="Returned").wait_for()
    assert result.inner_text() == "Returned 1"
    led.get_by_label("Argument for led").fill("off")
    led.get_by_role("button", name="Call led").click()
    result.filter(has_text="Returned 0").wait_for()
    audit(page)


def test_function_call_without_scripts(browser: Any, console_server: Any) -> None:
    """The page works without JavaScript: the form posts and the page shows the result."""
    base = console_server.url
    context = browser.new_context(java_script_enabled=False)
    try:
        pg = context.new_page()
        sign_in(pg, base)
        wait_described(pg, base, LIVE)
        form = pg.locator("form[data-call]").filter(has=pg.locator("input[value=interval]"))
        form.get_by_label("Argument for interval").fill("5")
        form.get_by_role("button", name="Call interval").click()
        pg.wait_for_load_state()
        assert "Returned 5" in pg.locator("[data-call-result]").all_inner_texts()
    finally:
        context.close()


def test_variables_read_and_refresh(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    wait_described(page, base, LIVE)
    cell = page.locator('[data-var-value="uptime"]')
    page.get_by_role("link", name="Read uptime").click()
    page.wait_for_function("() => /^\\d+$/.test(document.querySelector("
                           "'[data-var-value=\"uptime\"]').textContent.trim())")
    first = int(cell.inner_text())
    page.wait_for_timeout(1100)
    page.get_by_role("link", name="Read uptime").click()  # now "Refresh"
    page.wait_for_function(f"() => Number(document.querySelector("
                           f"'[data-var-value=\"uptime\"]').textContent) > {first}")
    assert page.get_by_role("link", name="Read uptime").inner_text() == "Refresh"


def _event_ids(page: Any) -> set[str]:
    return set(page.locator("[data-log-rows] tr[data-event-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.eventId)"))


def test_live_events_on_the_device_page(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    wait_described(page, base, LIVE)
    page.locator("[data-log-state].live").wait_for()
    before = _event_ids(page)
    # the simulated device publishes sim/temperature every few seconds
    page.wait_for_function(
        "known => Array.from(document.querySelectorAll('[data-log-rows] tr[data-event-id]'))"
        ".some(r => !known.includes(r.dataset.eventId))", arg=sorted(before), timeout=30_000)
    fresh = page.locator("[data-log-rows] tr.fresh").first
    assert fresh.locator(".log-name").inner_text().startswith("sim/")


def test_product_log_live_pause_and_filters(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    token = api.login(DEMO_USER, DEMO_PASSWORD)
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/logs")
    page.locator("[data-log-state].live").wait_for()
    before = _event_ids(page)
    page.wait_for_function(
        "known => Array.from(document.querySelectorAll('[data-log-rows] tr[data-event-id]'))"
        ".some(r => !known.includes(r.dataset.eventId))", arg=sorted(before), timeout=30_000)
    # a live device event names its device, linked to its page
    link = page.locator("[data-log-rows] tr.fresh td.log-device a").first
    assert re.match(r"demo-sensor-\d\d", link.inner_text())
    # pause: new events wait (counted), resume shows them
    page.get_by_role("button", name="Pause").click()
    api.call(token, "POST", "/v1/products/demo-product/events",
             json={"name": "console/paused", "data": "while paused"})
    page.locator("[data-log-state]", has_text="new event").wait_for()
    assert page.locator("td.log-name", has_text="console/paused").count() == 0
    page.get_by_role("button", name="Resume").click()
    page.locator("td.log-name", has_text="console/paused").wait_for()
    # a filtered log streams only matching events
    visit(page, base, f"{PRODUCT}/logs?name=console/")
    page.locator("[data-log-state].live").wait_for()
    api.call(token, "POST", "/v1/products/demo-product/events",
             json={"name": "console/filtered", "data": "42"})
    page.locator("td.log-name", has_text="console/filtered").wait_for()
    names = page.locator("[data-log-rows] td.log-name").all_inner_texts()
    assert names and all(n.startswith("console/") for n in names)


def _wait_fresh(page: Any) -> None:
    """Wait (bounded) until an event the page did not have when loaded arrives live."""
    page.locator("[data-log-state].live").wait_for()
    before = _event_ids(page)
    page.wait_for_function(
        "known => Array.from(document.querySelectorAll('[data-log-rows] tr[data-event-id]'))"
        ".some(r => !known.includes(r.dataset.eventId))", arg=sorted(before), timeout=30_000)


def test_log_filtered_by_device_streams_only_that_device(page: Any,
                                                          console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    wait_described(page, base, LIVE)  # publishing
    visit(page, base, f"{PRODUCT}/logs?device={LIVE.upper()}")
    assert page.get_by_label("Device ID").input_value() == LIVE
    _wait_fresh(page)
    hrefs = page.locator("[data-log-rows] td.log-device a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))")
    assert hrefs and all(h.endswith(f"/devices/{LIVE}") for h in hrefs)
    # a bad device filter says so next to the form, and the page still works
    visit(page, base, f"{PRODUCT}/logs?device=not-a-device")
    assert "24 hexadecimal characters" in page.locator(".alert-error").inner_text()


def test_organization_log_receives_the_fleets_events(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/orgs/demo-org/logs")
    assert "Events of every product of Demo Org" in page.locator(".page-head").inner_text()
    _wait_fresh(page)
    fresh = page.locator("[data-log-rows] tr.fresh").first
    assert re.match(r"demo-sensor-\d\d", fresh.locator("td.log-device").inner_text())


def test_log_history_scrolls_back(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    token = api.login(DEMO_USER, DEMO_PASSWORD)
    tag = secrets.token_hex(3)
    for n in range(60):
        api.call(token, "POST", "/v1/products/demo-product/events",
                 json={"name": f"history-{tag}/{n:02d}", "data": str(n)})
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/logs?name=history-{tag}/")
    rows = page.locator("[data-log-rows] tr[data-event-id]")
    assert rows.count() == 50
    assert rows.first.locator(".log-name").inner_text() == f"history-{tag}/59"
    page.get_by_role("link", name="Load older events").click()
    page.wait_for_function("() => document.querySelectorAll("
                           "'[data-log-rows] tr[data-event-id]').length === 60")
    assert rows.last.locator(".log-name").inner_text() == f"history-{tag}/00"
    assert page.get_by_role("link", name="Load older events").count() == 0
    # the same without scripts: a page of older events
    visit(page, base, f"{PRODUCT}/logs?name=history-{tag}/&before_id=999999999999")
    assert page.get_by_role("link", name="Back to the live log").is_visible()


def test_edit_groups_and_claim(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/devices/{QUIET}")
    page.get_by_text("Edit name and notes").click()
    page.locator("#f-device-name").fill("bad name!")
    page.locator("#f-device-notes").fill("on the roof")
    page.get_by_role("button", name="Save", exact=True).click()
    assert "name must be" in page.locator("#f-device-name-err").inner_text()
    audit(page)
    page.locator("#f-device-name").fill("roof-sensor")
    page.get_by_role("button", name="Save", exact=True).click()
    page.wait_for_url(re.compile(f".*/devices/{QUIET}$"))
    assert page.get_by_role("heading", name="roof-sensor").is_visible()
    assert "on the roof" in page.locator(".notes").inner_text()
    # groups: a new one, and out of the old
    groups = page.get_by_role("region", name="Groups")
    groups.get_by_label("field").uncheck()
    groups.get_by_label("Add to a new group").fill("rooftop")
    groups.get_by_role("button", name="Save groups").click()
    assert page.get_by_role("region", name="Groups").get_by_label("rooftop").is_checked()
    assert not page.get_by_role("region", name="Groups").get_by_label("field").is_checked()
    # claim to me, then unclaim
    page.get_by_role("button", name="Claim to me").click()
    assert DEMO_USER in page.get_by_role("region", name="Device").inner_text()
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Unclaim").click()
    assert "nobody" in page.get_by_role("region", name="Device").inner_text()


def test_mqtt_secret_is_shown_once(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/devices/{DEMO_FLEET_IDS[21]}")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name=re.compile("MQTT secret")).click()
    secret = page.get_by_label("New MQTT secret").input_value()
    assert len(secret) >= 32
    audit(page)
    visit(page, base, f"{PRODUCT}/devices/{DEMO_FLEET_IDS[21]}")  # the page again
    assert page.get_by_label("New MQTT secret").count() == 0
    assert secret not in page.content()


def test_a_customer_sees_only_their_own_devices(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    owner = api.login(DEMO_USER, DEMO_PASSWORD)
    email = f"customer-{secrets.token_hex(3)}@example.com"
    api.call(owner, "POST", "/v1/products/demo-product/customers",
             json={"email": email, "password": PASSWORD})
    sign_in(page, base, email, PASSWORD, product="demo-product")
    assert page.url.endswith("/console/devices")
    assert page.get_by_role("heading", name="My devices").is_visible()
    assert page.locator("table").count() == 0  # nothing claimed yet
    page.get_by_label("Device ID").fill(DEMO_FLEET_IDS[22])
    page.get_by_role("button", name="Claim").click()
    page.wait_for_url(re.compile(f".*/console/devices/{DEMO_FLEET_IDS[22]}$"))
    audit(page)
    visit(page, base, "/console/devices")
    assert page.locator(".device-id").all_inner_texts() == [DEMO_FLEET_IDS[22]]
    # nothing else of the product: another device does not exist, product pages are refused
    visit(page, base, f"/console/devices/{DEMO_FLEET_IDS[23]}", status=404)
    visit(page, base, f"{PRODUCT}/devices", status=403)
    visit(page, base, "/console/orgs/demo-org", status=403)
    # and the customer gives the device up
    visit(page, base, f"/console/devices/{DEMO_FLEET_IDS[22]}")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Unclaim").click()
    page.wait_for_load_state()
    visit(page, base, f"/console/devices/{DEMO_FLEET_IDS[22]}", status=404)


def test_vitals_refreshed_from_the_page(page: Any, console_server: Any) -> None:
    """The Refresh vitals button asks the live simulated device; its report shows on the page
    (last vitals with their time, and the history table over the chosen range)."""
    base = console_server.url
    sign_in(page, base)
    wait_described(page, base, LIVE)
    panel = page.get_by_role("region", name="Vitals")
    asked = time.time()
    panel.get_by_role("button", name="Refresh vitals").click()
    page.locator(".flash, [role=status]").filter(has_text="asked for fresh vitals").first.wait_for()
    deadline = time.monotonic() + 60
    while True:  # the device answers with a report: wait for the page to show it
        at = page.locator("[data-vitals-at]")
        if at.count() and _epoch(at.get_attribute("datetime") or "") >= int(asked) - 1:
            break
        assert time.monotonic() < deadline, "the device's vitals never reached the page"
        page.wait_for_timeout(1000)
        visit(page, base, f"{PRODUCT}/devices/{LIVE}")
        panel = page.get_by_role("region", name="Vitals")
    last = panel.locator("[data-vitals-last]").inner_text()
    for label in ("Signal (RSSI)", "Memory used", "Uptime"):
        assert label in last, last
    panel.get_by_label("History").select_option("week")
    panel.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"vitals=week"))
    rows = page.locator("[data-vitals-history] tbody tr")
    assert rows.count() >= 1
    assert int(rows.first.locator("td").nth(1).inner_text()) >= 1  # reports in the newest bucket
    audit(page)


def _epoch(text: str) -> int:
    """The page's ISO time (``…Z``) as epoch seconds."""
    import datetime as dt

    return int(dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp())


def test_vitals_read_only_without_the_permission(page: Any, console_server: Any) -> None:
    """A View-only member sees the vitals but no Refresh button, and the server refuses the
    refresh for them."""
    base = console_server.url
    api = Api(base)
    owner = api.login(DEMO_USER, DEMO_PASSWORD)
    viewer = f"vitals-viewer-{secrets.token_hex(3)}@example.com"
    api.signup(viewer)
    api.invite_and_accept(owner, "demo-org", viewer, "View-only")
    sign_in(page, base, viewer, PASSWORD)
    visit(page, base, f"{PRODUCT}/devices/{LIVE}")
    panel = page.get_by_role("region", name="Vitals")
    panel.wait_for()
    assert panel.get_by_role("button", name="Refresh vitals").count() == 0
