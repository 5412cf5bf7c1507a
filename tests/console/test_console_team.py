"""Teams in a real browser: the "Invite team member" dialog (an error next to the field, the
invitation pending), the invitee accepting after signing in (a second user), declining,
changing a role, removing; a product's team and its API users (the token shown once)."""

from __future__ import annotations

import re
import secrets
from typing import Any

import pytest

from consolekit import PASSWORD, Api, audit, sign_in, visit

pytestmark = pytest.mark.slow


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}@example.com"


def invite(page: Any, email: str, role: str) -> None:
    page.get_by_role("link", name="Invite team member").click()
    dialog = page.get_by_role("dialog", name="Invite team member")
    dialog.get_by_label("E-mail address").fill(email)
    dialog.get_by_label("Role").select_option(role)
    dialog.get_by_role("button", name="Send invitation").click()


def test_invite_accepted_by_a_second_user(browser: Any, page: Any,
                                          console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    colleague = unique("colleague")
    api.signup(colleague)
    sign_in(page, base)
    visit(page, base, "/console/orgs/demo-org/team")
    invite(page, "someone@nowhere", "Developer")  # the browser lets it through, the server not
    dialog = page.get_by_role("dialog", name="Invite team member")
    assert dialog.is_visible()  # sent back open, the error next to the address
    assert "e-mail address" in dialog.locator("#f-invite-email-err").inner_text()
    audit(page)
    dialog.get_by_label("E-mail address").fill(colleague)
    dialog.get_by_label("Role").select_option("Developer")
    dialog.get_by_role("button", name="Send invitation").click()
    assert f"Invitation sent to {colleague} as Developer" in page.locator(".alert-ok").inner_text()
    pending = page.get_by_role("region", name="Pending invitations")
    assert colleague in pending.inner_text()

    # the colleague signs in (a browser of their own) and accepts
    context = browser.new_context()
    try:
        other = context.new_page()
        sign_in(other, base, colleague, PASSWORD)
        assert other.locator(".count-badge").inner_text() == "1"
        other.get_by_role("link", name=re.compile("Invitations")).click()
        card = other.locator(".card.invite").filter(has_text="Demo Org")
        assert "Developer" in card.inner_text()
        audit(other)
        card.get_by_role("button", name="Accept").click()
        other.wait_for_url(re.compile(r".*/console/orgs/\d+$"))
        assert "welcome to the team" in other.locator(".alert-ok").inner_text()
        assert other.get_by_role("link", name=re.compile("Demo Product")).is_visible()
        visit(other, base, "/console/products/demo-product/devices")
        assert other.get_by_role("link", name="Import").count() == 1  # a Developer imports
    finally:
        context.close()

    # back as the Owner: the member is there; change the role, then remove them
    visit(page, base, "/console/orgs/demo-org/team")
    assert colleague not in page.get_by_role("region", name="Pending invitations").inner_text()
    row = page.locator("tbody tr").filter(has_text=colleague)
    row.get_by_label(f"Role of {colleague}").select_option("View-only")
    row.get_by_role("button", name="Change role").click()
    assert "is now View-only" in page.locator(".alert-ok").inner_text()
    page.once("dialog", lambda d: d.accept())
    page.locator("tbody tr").filter(has_text=colleague).get_by_role(
        "button", name="Remove").click()
    assert "was removed" in page.locator(".alert-ok").inner_text()
    assert page.locator("tbody tr").filter(has_text=colleague).count() == 0


def test_decline_and_revoke(browser: Any, page: Any, console_server: Any) -> None:
    base = console_server.url
    api = Api(base)
    declines, revoked = unique("declines"), unique("revoked")
    api.signup(declines)
    sign_in(page, base)
    visit(page, base, "/console/orgs/demo-org/team")
    invite(page, declines, "Support")
    invite(page, revoked, "View-only")
    row = page.get_by_role("region", name="Pending invitations").locator("tr").filter(
        has_text=revoked)
    row.get_by_role("button", name="Revoke").click()
    assert "revoked" in page.locator(".alert-ok").inner_text()
    context = browser.new_context()
    try:
        other = context.new_page()
        sign_in(other, base, declines, PASSWORD)
        visit(other, base, "/console/invitations")
        other.get_by_role("button", name="Decline").click()
        assert "declined" in other.locator(".alert-ok").inner_text()
        assert other.locator(".card.invite").count() == 0
        visit(other, base, "/console/orgs/demo-org", status=404)
    finally:
        context.close()


def test_product_team_and_api_users(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, "/console/products/demo-product/team")
    invite(page, unique("contractor"), "Support")
    assert "as Support" in page.locator(".alert-ok").inner_text()
    # Owner is an organization role: the product dialog does not offer it
    page.get_by_role("link", name="Invite team member").click()
    options = page.get_by_role("dialog").get_by_label("Role").locator("option").all_inner_texts()
    assert "Owner" not in options and "Administrator" in options
    page.keyboard.press("Escape")

    visit(page, base, "/console/products/demo-product/api-users")
    page.get_by_label("Name").fill("ingest bot")
    page.get_by_role("button", name="Create API user").click()  # no scope: refused
    assert "at least one scope" in page.locator("#scopes-err, .alert-error").first.inner_text()
    page.get_by_label("devices:list").check()
    page.get_by_label("products:get").check()
    page.get_by_role("button", name="Create API user").click()
    token = page.get_by_label("API user token").input_value()
    assert re.fullmatch(r"[0-9a-f]{40}", token)
    audit(page)
    # the token works on /v1 with exactly its scopes
    with Api(base).client(token) as c:
        assert c.get("/v1/products/demo-product/devices").status_code == 200
        assert c.get("/v1/products/demo-product/team").status_code == 403
    visit(page, base, "/console/products/demo-product/api-users")
    assert page.get_by_label("API user token").count() == 0
    row = page.locator("tbody tr").filter(has_text="ingest bot")
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Delete").click()
    assert "deleted" in page.locator(".alert-ok").inner_text()
    with Api(base).client(token) as c:
        assert c.get("/v1/products/demo-product/devices").status_code == 401
