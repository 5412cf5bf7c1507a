"""The dynamic-group editor in a real browser: typing a query previews live (debounced, a
server-rendered fragment) how many devices match and the first of them; a wrong query shows
where it is wrong; saving creates a dynamic group whose count links to its devices; a bad
query on submit is refused next to the field."""

from __future__ import annotations

import re
from typing import Any

import pytest

from consolekit import audit, sign_in, visit

pytestmark = pytest.mark.slow

PRODUCT = "/console/products/demo-product"


def test_dynamic_group_editor_with_live_preview(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/groups")
    new = page.get_by_role("region", name="New group")
    preview = page.locator("#f-query-preview")
    query = new.get_by_label("Query")

    # each keystroke is typed, the preview follows the last one (debounced)
    previews: list[str] = []
    page.on("request", lambda r: previews.append(r.url) if "/groups/preview" in r.url else None)
    query.press_sequentially("group = beta", delay=20)
    page.wait_for_selector("#f-query-preview [data-preview-count]")
    assert len(previews) <= 3, previews  # not one request per character
    text = preview.inner_text()
    n = int(re.search(r"([\d,]+) devices? match", text).group(1).replace(",", ""))
    assert n > 0
    links = preview.locator("a")
    assert links.count() == min(n, 10)
    assert "demo-sensor-" in links.first.inner_text()

    # a wrong query says where
    query.fill("group = beta and")
    query.dispatch_event("input")
    page.wait_for_selector("#f-query-preview [data-preview-problem]")
    assert "ends too early" in preview.inner_text() and "column 17" in preview.inner_text()
    audit(page)

    # a wrong query submitted is refused next to the field, nothing saved
    new.get_by_label("Name").fill("beta-online")
    new.get_by_role("button", name="Create group").click()
    assert "ends too early" in page.locator("#f-query-err").inner_text()
    audit(page)

    new = page.get_by_role("region", name="New group")
    new.get_by_label("Query").fill("group = beta and not online or group = beta")
    new.get_by_role("button", name="Create group").click()
    page.wait_for_url(re.compile(".*/groups$"))
    row = page.locator("tr[data-group=beta-online]")
    assert "dynamic" in row.inner_text()
    assert "group = beta and not online or group = beta" in row.inner_text()
    row.get_by_role("link", name=f"{n} devices in beta-online").click()
    page.wait_for_url(re.compile(r".*/devices\?group=beta-online"))
    assert page.locator("tbody tr").count() == min(n, 50) or n > 50
    # each member lists the dynamic group among its groups, in the list and on its page,
    # where it is not a checkbox of the static groups' form
    first = page.locator("tbody tr").first
    assert "beta-online" in first.inner_text()
    first.locator("a.device-name").click()
    page.wait_for_selector("#dynamic-groups")
    assert "beta-online" in page.locator("#dynamic-groups").inner_text()
    assert page.locator("input[name=group][value=beta-online]").count() == 0
    assert page.locator("input[name=group][value=beta]").is_checked()
    audit(page)

    # editing the query previews it too, and saves it
    visit(page, base, f"{PRODUCT}/groups")
    row = page.locator("tr[data-group=beta-online]")
    row.get_by_text("Edit").click()
    box = row.get_by_label("Query")
    box.fill("group = field")
    box.dispatch_event("input")
    row.locator("[data-preview-count]").wait_for()
    row.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(".*/groups$"))
    assert "group = field" in page.locator("tr[data-group=beta-online]").inner_text()
