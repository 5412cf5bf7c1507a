"""Cohorts in a real browser: create one (a bad name is refused next to the field), edit its
description, see its device count link to the device list filtered by it, delete it."""

from __future__ import annotations

import re
from typing import Any

import pytest

from consolekit import audit, sign_in, visit

pytestmark = pytest.mark.slow

PRODUCT = "/console/products/demo-product"


def test_cohorts_list_create_edit_delete(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, PRODUCT)
    page.get_by_role("link", name="Cohorts").first.click()
    page.wait_for_url(re.compile(".*/cohorts$"))
    assert page.get_by_text("No cohorts yet").is_visible()
    audit(page)
    new = page.get_by_role("region", name="New cohort")
    new.get_by_label("Name").fill("Bad Name")
    new.get_by_role("button", name="Create cohort").click()
    assert "lowercase letters" in page.locator("#f-cohort-name-err").inner_text()
    audit(page)
    new = page.get_by_role("region", name="New cohort")
    new.get_by_label("Name").fill("early")
    new.get_by_label("Description").fill("staff units")
    new.get_by_role("button", name="Create cohort").click()
    page.wait_for_url(re.compile(".*/cohorts$"))
    row = page.locator("tr[data-cohort=early]")
    assert "staff units" in row.inner_text() and "none" in row.inner_text()

    row.get_by_text("Edit").click()
    row.get_by_label("Description").fill("first wave")
    row.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(".*/cohorts$"))
    row = page.locator("tr[data-cohort=early]")
    assert "first wave" in row.inner_text()
    row.get_by_role("link", name="0 devices in early").click()
    page.wait_for_url(re.compile(r".*/devices\?cohort=early"))
    assert page.get_by_text("No device matches these filters").is_visible()

    visit(page, base, f"{PRODUCT}/cohorts")
    page.once("dialog", lambda d: d.accept())
    page.locator("tr[data-cohort=early]").get_by_role("button", name="Delete").click()
    page.wait_for_url(re.compile(".*/cohorts$"))
    assert page.get_by_text("No cohorts yet").is_visible()
