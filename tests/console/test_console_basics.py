"""The console's frame in a real browser: sign up / in / out, the organization switcher with
the personal sandbox, products, the device list, the Import dialog, bulk actions, roles,
another tenant, keyboard and phone width."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest

from consolekit import PASSWORD, PHONE, Api, audit, sign_in, tab_walk, visit
from corral.demo import DEMO_FLEET_IDS

pytestmark = pytest.mark.slow


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}@example.com"


def test_root_leads_to_sign_in(page: Any, console_server: Any) -> None:
    base = console_server.url
    page.goto(base + "/")
    assert page.url.endswith("/console/login?next=/console/")
    audit(page)
    assert page.get_by_role("heading", name="Sign in").is_visible()


def test_sign_up_opens_the_personal_sandbox_and_sign_out_ends_the_session(
        page: Any, console_server: Any) -> None:
    base = console_server.url
    visit(page, base, "/console/signup")
    email = unique("newcomer")
    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password", exact=True).fill("short")
    page.get_by_label("Password again").fill("short")
    page.get_by_role("button", name="Create account").click()
    # the server's rule (8 characters), next to the field, and nothing was created
    error = page.locator("#f-password-err")
    assert "at least 8 characters" in error.inner_text()
    assert page.get_by_label("Password", exact=True).get_attribute("aria-invalid") == "true"
    audit(page)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(re.compile(r".*/console/orgs/.+"))
    assert page.get_by_role("heading", name="Personal sandbox").is_visible()
    assert "This is your personal sandbox" in page.locator(".alert-ok").inner_text()
    audit(page)
    cookie = next(c for c in page.context.cookies() if c["name"] == "corral_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    # sign out: back to the sign-in page, and the old session no longer opens pages
    page.locator("details.user-menu > summary").click()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r".*/console/login"))
    page.context.add_cookies([{**cookie}])
    page.goto(base + "/console/")
    assert "/console/login" in page.url


def test_sign_in_refuses_a_wrong_password(page: Any, console_server: Any) -> None:
    base = console_server.url
    visit(page, base, "/console/login")
    page.get_by_label("E-mail address").fill("demo@corral.example")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    assert "not right" in page.locator(".alert-error").inner_text()
    audit(page)
    sign_in(page, base)
    assert "/console/orgs/" in page.url


def test_org_switcher_lists_the_sandbox_and_organizations(page: Any,
                                                          console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    switcher = page.locator("details.switcher")
    # keyboard: focus the switcher, open it, follow the organization's link
    switcher.locator("summary").focus()
    page.keyboard.press("Enter")
    menu = switcher.locator(".menu-panel")
    assert menu.is_visible()
    names = [n.strip() for n in menu.locator("li a span:first-child").all_inner_texts()]
    assert names[0] == "Personal sandbox" and "Demo Org" in names
    menu.get_by_role("link", name=re.compile("Demo Org")).focus()
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/console/orgs/demo-org$"))
    assert page.get_by_role("link", name=re.compile("Demo Product")).is_visible()
    audit(page)
    # Escape closes the menu and gives focus back to it
    switcher.locator("summary").click()
    page.keyboard.press("Escape")
    assert not menu.is_visible()
    # /console/ returns to the organization opened last
    page.goto(base + "/console/")
    assert page.url.endswith("/console/orgs/demo-org")


def test_create_a_product(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    email = unique("maker")
    token = api.signup(email)
    org = api.call(token, "POST", "/v1/orgs", json={"name": f"Makers {email[6:12]}"})
    slug = org["organization"]["slug"]
    sign_in(page, base, email, PASSWORD)
    visit(page, base, f"/console/orgs/{slug}")
    page.get_by_role("link", name="New product").first.click()
    page.get_by_label("Name").fill("   ")  # blank: the server's rule says so
    page.get_by_role("button", name="Create product").click()
    page.locator("#f-name-err").wait_for()  # the answer is a new page: wait for it, then look
    assert page.locator("#f-name-err").is_visible()
    audit(page)
    page.get_by_label("Name").fill("Weather station")
    page.get_by_label("Description").fill("Rooftop sensors")
    page.get_by_label("Device platform").select_option("13")
    page.get_by_label("Tags").fill("outdoor, sensors")
    page.get_by_role("button", name="Create product").click()
    page.wait_for_url(re.compile(r".*/console/products/weather-station.*"))
    assert page.get_by_role("heading", name="Weather station").is_visible()
    assert "Boron" in page.locator(".page-head").inner_text()
    assert page.get_by_role("heading", name="Get started").is_visible()
    audit(page)
    # the same name again is refused by the same rule as /v1, next to the name
    visit(page, base, f"/console/orgs/{slug}/products/new")
    page.get_by_label("Name").fill("Weather Station")
    page.get_by_role("button", name="Create product").click()
    assert "already exists" in page.locator("#f-name-err").inner_text()


def test_device_list_search_filters_sort_and_pages(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/products/demo-product/devices")
    rows = page.locator("table.devices tbody tr")
    assert rows.count() == 25
    page.get_by_label("Search").fill("demo-sensor-1")
    page.get_by_role("button", name="Search").click()
    names = rows.locator(".device-name").all_inner_texts()
    assert sorted(names) == [f"demo-sensor-{n}" for n in range(10, 20)]
    # an ID prefix finds that device
    page.get_by_label("Search").fill(DEMO_FLEET_IDS[2][:8])
    page.get_by_role("button", name="Search").click()
    assert rows.locator(".device-name").all_inner_texts() == ["demo-sensor-03"]
    visit(page, base, "/console/products/demo-product/devices?group=beta&sort=deviceName:asc")
    assert rows.locator(".device-name").all_inner_texts() == [
        f"demo-sensor-0{n}" for n in range(1, 7)]
    visit(page, base, "/console/products/demo-product/devices?flag=development")
    assert sorted(rows.locator(".device-name").all_inner_texts()) == [
        "demo-sensor-01", "demo-sensor-02"]
    # the live demo devices are online
    visit(page, base, "/console/products/demo-product/devices?status=online")
    assert rows.count() >= 1
    # sorting by a column header; IDs ascending are in order
    visit(page, base, "/console/products/demo-product/devices?sort=deviceId:asc")
    ids = rows.locator(".device-id").all_inner_texts()
    assert ids == sorted(ids)
    page.locator("thead").get_by_role("link", name="Device", exact=True).click()
    page.wait_for_url(re.compile(r".*sort=deviceName%3Aasc.*"))
    assert page.locator("th[aria-sort=ascending]").text_content().startswith("Device")
    # pages: 10 per page is not offered, 25 is; page 2 of a 25-device filter is empty
    visit(page, base, "/console/products/demo-product/devices?q=demo-sensor&per_page=25&page=1")
    assert page.get_by_role("link", name="Next →").count() == 0
    # a bad filter value is explained, and the list still shows
    visit(page, base, "/console/products/demo-product/devices?sort=nonsense:up")
    assert "sortAttr" in page.locator(".alert-error").inner_text()


def test_import_dialog_with_a_real_file(page: Any, console_server: Any,
                                        tmp_path: Path) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/products/demo-product/devices")
    new_ids = [secrets.token_hex(12) for _ in range(3)]
    ids_file = tmp_path / "devices.txt"
    ids_file.write_text("\n".join([*new_ids, "not-a-device-id", DEMO_FLEET_IDS[0], ""]) + "\n")
    page.get_by_role("link", name="Import").first.click()
    dialog = page.get_by_role("dialog", name="Import devices")
    dialog.wait_for()  # a script opens it after the click
    assert dialog.is_visible()
    audit(page)
    dialog.get_by_label("File of device IDs (.txt)").set_input_files(str(ids_file))
    force = dialog.get_by_label("Force imported devices to switch to this product")
    force.check()
    assert force.is_checked()
    dialog.get_by_role("button", name="Import").click()
    page.wait_for_url(re.compile(r".*/devices/import$"))
    result = page.locator(".import-result")
    assert "3 device(s) added" in result.inner_text()
    assert "Invalid (1)" in result.locator(".result-invalid summary").inner_text()
    assert "not-a-device-id" in result.locator(".result-invalid").inner_text()
    result.locator(".result-existing summary").click()
    assert DEMO_FLEET_IDS[0] in result.locator(".result-existing").inner_text()
    audit(page)
    # the new devices are in the list
    visit(page, base, f"/console/products/demo-product/devices?q={new_ids[0]}")
    assert page.locator("table.devices tbody tr").count() == 1
    # a file that is not text is refused next to the file field, nothing imported
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x00\x01\x02")
    visit(page, base, "/console/products/demo-product/devices/import")
    page.get_by_label("File of device IDs (.txt)").set_input_files(str(binary))
    page.get_by_role("button", name="Import").click()
    assert "not a text file" in page.locator("#f-file-err").inner_text()


def test_bulk_actions_on_selected_devices(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/products/demo-product/devices?q=demo-sensor-2&sort=deviceName:asc")
    rows = page.locator("table.devices tbody tr")
    assert rows.count() == 5  # 20..24
    # nothing selected: the server says so, nothing changes
    page.get_by_role("button", name="Add to group").click()
    assert "Select at least one device" in page.locator(".alert-error").first.inner_text()
    visit(page, base, "/console/products/demo-product/devices?q=demo-sensor-2&sort=deviceName:asc")
    page.get_by_label("Select demo-sensor-20").check()
    page.get_by_label("Select demo-sensor-21").check()
    assert page.locator("[data-selected-count]").inner_text() == "2 selected"
    page.get_by_label("Group name").fill("night-shift")
    page.get_by_role("button", name="Add to group").click()
    assert "2 device(s) added to night-shift" in page.locator(".alert-ok").inner_text()
    visit(page, base, "/console/products/demo-product/devices?group=night-shift")
    assert sorted(page.locator(".device-name").all_inner_texts()) == [
        "demo-sensor-20", "demo-sensor-21"]
    # select all on the page, then take them out again
    page.get_by_label("Select all devices on this page").check()
    page.get_by_label("Group name").fill("night-shift")
    page.get_by_role("button", name="Remove from group").click()
    assert "taken out of night-shift" in page.locator(".alert-ok").inner_text()


def test_quarantine_approve(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/products/demo-product/quarantine")
    rows = page.locator("table.devices tbody tr")
    if rows.count() == 0:
        pytest.skip("the demo quarantine was emptied by another test")
    device_id = rows.first.locator(".device-id").inner_text()
    rows.first.locator("input[name=device]").check()
    page.get_by_role("button", name="Approve").click()
    assert "approved" in page.locator(".alert-ok").inner_text()
    assert device_id not in page.content()


def test_roles_see_only_what_they_may_do(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    owner = api.login("demo@corral.example", "corral-demo")
    viewer = unique("viewer")
    api.signup(viewer)
    api.invite_and_accept(owner, "demo-org", viewer, "View-only")
    sign_in(page, base, viewer, PASSWORD)
    visit(page, base, "/console/products/demo-product/devices")
    assert page.get_by_role("link", name="Import").count() == 0
    assert page.locator("[data-bulkbar]").count() == 0
    visit(page, base, "/console/products/demo-product/settings")
    assert page.locator("fieldset[disabled]").count() == 1
    assert page.get_by_role("button", name="Delete product").count() == 0
    # and the server refuses, with a page saying why
    visit(page, base, "/console/products/demo-product/devices/import", status=403)
    assert "devices:import" in page.content()


def test_device_page_shows_presence_and_firmware(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/products/demo-product/devices?status=online&sort=deviceId:asc")
    page.locator(".device-name").first.click()
    page.wait_for_url(re.compile(r".*/console/products/demo-product/devices/[0-9a-f]{24}$"))
    audit(page)
    status = page.get_by_role("region", name="Status")
    assert "Online" in status.inner_text() and "over MQTT" in status.inner_text()
    firmware = page.get_by_role("region", name="Firmware")
    assert "Targeted" in firmware.inner_text()


def test_another_tenants_product_is_a_404_page(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    stranger = unique("stranger")
    api.signup(stranger)
    sign_in(page, base, stranger, PASSWORD)
    visit(page, base, "/console/products/demo-product", status=404)
    assert "Product not found" in page.content()
    visit(page, base, "/console/orgs/demo-org", status=404)
    visit(page, base, f"/console/products/demo-product/devices/{DEMO_FLEET_IDS[0]}", status=404)


@pytest.mark.parametrize("path", [
    "/console/orgs/demo-org", "/console/products/demo-product",
    "/console/products/demo-product/devices", "/console/products/demo-product/settings",
    "/console/products/demo-product/devices/import", "/console/devices",
    "/console/invitations", "/console/orgs/demo-org/billing"])
def test_phone_width(browser: Any, console_server: Any, path: str) -> None:
    base = console_server.url
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        pg = context.new_page()
        sign_in(pg, base)
        visit(pg, base, path)
        # the navigation stays reachable
        assert pg.locator("nav.sidebar a").first.is_visible()
    finally:
        context.close()


def test_sign_in_with_the_keyboard_only(page: Any, console_server: Any) -> None:
    base = console_server.url
    page.goto(base + "/console/login")
    # the e-mail field has the focus (autofocus): type, Tab to the password, Enter
    assert page.evaluate("() => document.activeElement.id") == \
        page.get_by_label("E-mail address").get_attribute("id")
    page.keyboard.type("demo@corral.example")
    page.keyboard.press("Tab")
    page.keyboard.type("corral-demo")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/console/orgs/.+"))


@pytest.mark.parametrize("path", [
    "/console/login", "/console/orgs/demo-org", "/console/products/demo-product",
    "/console/products/demo-product/devices", f"/console/products/demo-product/devices/"
    f"{DEMO_FLEET_IDS[0]}", "/console/products/demo-product/firmware",
    "/console/products/demo-product/logs", "/console/products/demo-product/integrations",
    "/console/orgs/demo-org/team", "/console/orgs/demo-org/billing"])
def test_every_control_is_reachable_with_tab(page: Any, console_server: Any,
                                             path: str) -> None:
    base = console_server.url
    if path != "/console/login":
        sign_in(page, base)
    visit(page, base, path)
    tab_walk(page)


def test_the_tab_walk_finds_an_unreachable_control(page: Any, console_server: Any) -> None:
    """The check above fails when a control is taken out of the tab order."""
    visit(page, console_server.url, "/console/login")
    page.evaluate("() => document.querySelector('button[type=submit]')"
                  ".setAttribute('tabindex', '-1')")
    with pytest.raises(AssertionError, match="not reached with Tab"):
        tab_walk(page)
