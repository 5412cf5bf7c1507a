"""Device tags in a real browser: set them on the device page (a bad tag is refused next to
the field), then find the device with the list's tag filter (all of the tags typed)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from consolekit import audit, sign_in, visit
from corral.demo import DEMO_FLEET_IDS

pytestmark = pytest.mark.slow

PRODUCT = "/console/products/demo-product"
TAGGED = DEMO_FLEET_IDS[22]  # imported, never connected
OTHER = DEMO_FLEET_IDS[23]


def save_tags(page: Any, value: str) -> None:
    tags = page.get_by_role("region", name="Tags")
    tags.get_by_label("Tags (separated by commas)").fill(value)
    tags.get_by_role("button", name="Save tags").click()


def test_tags_on_the_device_page_and_the_list_filter(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/devices/{TAGGED}")
    assert "No tags." in page.get_by_role("region", name="Tags").inner_text()
    save_tags(page, "rooftop, " + "x" * 101)
    assert "at most 100 characters" in page.locator("#f-tags-err").inner_text()
    assert page.get_by_label("Tags (separated by commas)").input_value().startswith("rooftop")
    audit(page)
    save_tags(page, "rooftop, eu")
    page.wait_for_url(re.compile(f".*/devices/{TAGGED}$"))
    assert page.locator("[data-tags]").inner_text().split() == ["rooftop", "eu"]
    visit(page, base, f"{PRODUCT}/devices/{OTHER}")
    save_tags(page, "eu")
    page.wait_for_url(re.compile(f".*/devices/{OTHER}$"))

    visit(page, base, f"{PRODUCT}/devices")
    more = page.locator("details.filter-more")
    if more.get_attribute("open") is None:  # wide windows open it already
        page.get_by_text("Filters and order").click()
    page.get_by_label("Tags (all of)").fill("eu")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r".*tag=eu"))
    ids = page.locator("table.devices code.device-id").all_inner_texts()
    assert sorted(ids) == sorted([TAGGED, OTHER])
    page.get_by_label("Tags (all of)").fill("eu, rooftop")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r".*tag=eu%2C"))
    assert page.locator("table.devices code.device-id").all_inner_texts() == [TAGGED]
    assert page.locator("table.devices [data-tag]").all_inner_texts() == ["rooftop", "eu"]
    audit(page)
