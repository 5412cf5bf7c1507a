"""Billing & usage in a real browser, against `corral serve --demo` (the demo organization
is on Basic with one block, on the in-memory payment provider): the usage meters and the
per-day chart filling as the demo fleet publishes, the CSV download, changing blocks with an
error next to the field, an invoice, roles, and a new organization subscribing with a
declined card, then a good one, cancelling and re-activating. The Inactive subscription
page is covered in-process (tests/test_console_billing.py: the period's end needs the
injected clock)."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from consolekit import PASSWORD, Api, audit, sign_in, visit

pytestmark = pytest.mark.slow

BILLING = "/console/orgs/demo-org/billing"


def test_usage_chart_csv_blocks_and_invoice(page: Any, console_server: Any,
                                            tmp_path: Path) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/orgs/demo-org")
    page.get_by_role("link", name="Billing & usage").click()
    page.wait_for_url(re.compile(r".*/demo-org/billing$"))
    audit(page)
    assert page.get_by_role("heading", name="Billing & usage").is_visible()
    assert "Basic plan" in page.locator(".page-head").inner_text()
    # the demo fleet publishes: today's bar of data operations grows (the metering tick
    # records the day's reading every few seconds)
    deadline = time.monotonic() + 60
    while True:
        chart = page.get_by_role("img", name=re.compile("^Data operations per day"))
        bars = chart.locator("rect")
        assert bars.count() >= 1  # one bar per day of the month so far
        if any(int(bars.nth(i).get_attribute("height") or 0) > 0 for i in range(bars.count())):
            break
        assert time.monotonic() < deadline, "no data operations were recorded for today"
        page.wait_for_timeout(2000)
        visit(page, base, BILLING)
    stat = page.locator(".stat").filter(has_text="Data operations")
    assert re.search(r"of 720,000", stat.inner_text())

    with page.expect_download() as info:
        page.get_by_role("link", name="Usage per device (CSV)").click()
    saved = tmp_path / "usage.csv"
    info.value.save_as(saved)
    lines = saved.read_text().splitlines()
    assert lines[0].startswith("device_id,product_id,billable,data_operations")
    assert len(lines) > 1  # the demo fleet's devices

    # change blocks: the server's rule next to the field, then a good value
    blocks = page.get_by_label("Blocks", exact=True)
    blocks.fill("100001")
    page.get_by_role("button", name="Change blocks").click()
    assert "less than or equal to 100000" in page.locator("#f-blocks-err").inner_text()
    assert page.get_by_label("Blocks", exact=True).get_attribute("aria-invalid") == "true"
    audit(page)
    page.get_by_label("Blocks", exact=True).fill("2")
    page.get_by_role("button", name="Change blocks").click()
    assert "Subscription updated." in page.locator(".alert-ok").inner_text()
    assert "Basic · 2 blocks" in page.locator(".facts").inner_text()
    assert "of 1,440,000" in page.locator(".stat").filter(has_text="Data operations").inner_text()

    first = page.locator("tr[data-invoice]").first
    number = first.get_attribute("data-invoice")
    first.get_by_role("link", name=number, exact=True).click()
    # the click returns once the navigation commits, before the page is parsed: wait for the
    # page to load (is_visible does not wait)
    page.wait_for_url(re.compile(rf".*/billing/invoices/{number}$"))
    assert page.get_by_role("heading", name=f"Invoice {number}").is_visible()
    assert "Payment attempts" in page.content()
    audit(page)


def test_only_administrators_see_billing(page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    owner = api.login("demo@corral.example", "corral-demo")
    dev = f"dev-{secrets.token_hex(3)}@example.com"
    api.signup(dev)
    api.invite_and_accept(owner, "demo-org", dev, "Developer")
    sign_in(page, base, dev, PASSWORD)
    visit(page, base, "/console/orgs/demo-org")
    assert page.get_by_role("link", name="Billing & usage").count() == 0
    visit(page, base, BILLING, status=403)
    assert "orgs.billing:get" in page.content()


def test_a_new_organization_subscribes_cancels_and_reactivates(page: Any,
                                                               console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    email = f"founder-{secrets.token_hex(3)}@example.com"
    token = api.signup(email)
    slug = api.call(token, "POST", "/v1/orgs", json={"name": f"Founders {email[8:14]}"}
                    )["organization"]["slug"]
    sign_in(page, base, email, PASSWORD)
    visit(page, base, f"/console/orgs/{slug}/billing")
    assert "on the Free plan" in page.locator("main").inner_text()
    form = page.locator("form").filter(has=page.get_by_role("button", name="Subscribe"))
    form.get_by_label("Blocks").fill("1")
    form.get_by_label("Payment method").fill("pm_card_chargeDeclined")
    form.get_by_role("button", name="Subscribe").click()
    assert "declined" in page.locator("#f-payment_method-err").inner_text()
    audit(page)
    page.get_by_label("Payment method").fill("pm_card_visa")
    page.get_by_role("button", name="Subscribe").click()
    assert "Subscribed." in page.locator(".alert-ok").inner_text()
    assert "active" in page.locator("[data-subscription-status]").inner_text()
    # the declined first charge's invoice is void; the second is paid
    assert [r.inner_text().split("\t")[4].strip() for r in page.locator("tr[data-invoice]").all()
            ] == ["paid", "void"]

    page.get_by_role("button", name="Cancel subscription").click()
    assert "access continues until" in page.locator(".alert-ok").inner_text()
    assert "canceled" in page.locator("[data-subscription-status]").inner_text()
    assert page.get_by_role("button", name="Cancel subscription").count() == 0
    page.get_by_role("button", name="Re-activate subscription").click()
    assert "Subscription re-activated." in page.locator(".alert-ok").inner_text()
    assert "active" in page.locator("[data-subscription-status]").inner_text()
    audit(page)
