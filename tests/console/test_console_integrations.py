"""The Integrations page of a product in a real browser, against ``corral serve --demo`` whose
integrations may reach 127.0.0.1: create a webhook with a preview of its request, an error
shown next to its field, the live demo fleet's events delivered to a real target, the delivery
log with redeliver, test, disable and enable, the chart, delete; a View-only member sees it
all without the controls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from consolekit import DEMO_PASSWORD, DEMO_USER, PASSWORD, Api, sign_in, visit
from hookkit import threaded_target

pytestmark = pytest.mark.slow

BASE = "/console/products/demo-product/integrations"


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_serve import corral_serve

    root = tmp_path_factory.mktemp("console-hooks")
    with corral_serve(root / "data", root / "logs", "--demo", start_timeout_s=90,
                      env={"CORRAL_INTEGRATIONS_ALLOW_HOSTS": "127.0.0.1",
                           "CORRAL_INTEGRATIONS_POLL_S": "0.2"}) as served:
        yield served


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[str, list[bytes]]]:
    with threaded_target() as t:
        yield t


def _wait(check: Any, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_create_preview_deliver_log_redeliver(page: Any, console_server: Any,
                                              target: tuple[str, list[bytes]]) -> None:
    url, got = target
    base = console_server.url
    sign_in(page, base)
    visit(page, base, BASE)
    page.get_by_role("heading", name="Integrations", level=1).wait_for()
    # an error lands next to its field, the rest of the form is kept
    page.get_by_label("Event name prefix").fill("sim/")  # the demo fleet's sim/temperature
    page.get_by_label("Target URL").fill("ftp://nowhere")
    page.get_by_role("button", name="Create integration").click()
    error = page.locator("#f-url-err")
    error.wait_for()
    assert "http" in error.inner_text()
    assert page.get_by_label("Event name prefix").input_value() == "sim/"
    # the preview shows the request a sample event makes
    page.get_by_label("Target URL").fill(url)
    page.get_by_label("Request body (webhook)").select_option("json")
    page.get_by_label("Template (JSON or body for a webhook, payload for MQTT)").fill(
        '{"t": "{{{temp}}}", "device": "{{{PARTICLE_DEVICE_ID}}}"}')
    page.get_by_label("HTTP headers (webhook, JSON object)").fill(
        '{"Authorization": "Bearer a-very-secret-token"}')
    page.get_by_label("Sample event data for the preview").fill('{"temp": 19.5}')
    page.get_by_role("button", name="Preview the request").click()
    preview = page.locator("[data-preview]")
    preview.wait_for()
    text = preview.inner_text()
    assert f"POST {url}" in text and '"t":"19.5"' in text and "Bear…" in text
    assert "a-very-secret-token" not in text  # (the form keeps what was typed, unsaved)
    page.get_by_role("button", name="Create integration").click()
    page.wait_for_url(f"**{BASE}/*")
    assert "signing secret (shown once): whsec_" in page.locator("[role=status]").inner_text()
    hook_url = page.url
    # the demo fleet publishes sim/temperature events: they arrive at the target
    _wait(lambda: len(got) >= 1, "a delivery from the demo fleet")

    def logged() -> bool:
        visit(page, base, hook_url.removeprefix(base))
        return page.locator("tr[data-attempt]").count() > 0

    _wait(logged, "the delivery log")
    assert "success" in page.locator("tr[data-attempt]").first.inner_text()
    assert page.locator("svg.chart rect").count() >= 1
    # redeliver one event from the log
    before = len(got)
    page.locator("tr[data-attempt]").first.get_by_role("button").click()
    assert "queued again" in page.locator("[role=status]").inner_text()
    _wait(lambda: len(got) > before, "the redelivery")
    # test, disable, enable
    page.get_by_label("Test event data").fill("from the console")
    page.get_by_role("button", name="Send a test event").click()
    assert "Test passed (HTTP 200)" in page.locator("[role=status]").inner_text()
    assert any(b'"from the console"' in body or b"from+the+console" in body for body in got)
    page.get_by_role("button", name="Disable").click()
    assert "disabled" in page.locator("[role=status]").inner_text()
    page.get_by_role("button", name="Enable").click()
    assert "enabled" in page.locator("[role=status]").inner_text()
    # a View-only member sees the page without its controls
    api = Api(base)
    owner = api.login(DEMO_USER, DEMO_PASSWORD)
    api.signup("hook-viewer@example.com")
    api.invite_and_accept(owner, "demo-org", "hook-viewer@example.com", "View-only")
    viewer = page.context.browser.new_context()
    try:
        vp = viewer.new_page()
        sign_in(vp, base, "hook-viewer@example.com", PASSWORD)
        visit(vp, base, hook_url.removeprefix(base))
        assert vp.get_by_role("button", name="Disable").count() == 0
        assert vp.get_by_role("button", name="Delete integration").count() == 0
        visit(vp, base, BASE)
        assert vp.get_by_role("button", name="Create integration").count() == 0
    finally:
        viewer.close()
    page.get_by_role("button", name="Delete integration").click()
    page.wait_for_url(f"**{BASE}")
    assert "Integration deleted" in page.locator("[role=status]").inner_text()


def _create(page: Any, url: str, prefix: str, name: str) -> str:
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Event name prefix").fill(prefix)
    page.get_by_label("Target URL").fill(url)
    page.get_by_role("button", name="Create integration").click()
    page.wait_for_url("**/integrations/*")
    assert "signing secret (shown once)" in page.locator("[role=status]").inner_text()
    return str(page.url)


def test_organization_and_sandbox_integrations(page: Any, console_server: Any,
                                               target: tuple[str, list[bytes]]) -> None:
    """The organization's page delivers every product's events; the sandbox's page holds the
    user's own integrations (``/v1/integrations``); each lists only its own."""
    url, got = target
    base = console_server.url
    api = Api(base)
    token = api.login(DEMO_USER, DEMO_PASSWORD)
    sign_in(page, base)
    visit(page, base, "/console/orgs/demo-org")
    page.get_by_role("navigation", name="Organization").get_by_role(
        "link", name="Integrations").click()
    page.wait_for_url("**/console/orgs/demo-org/integrations")
    assert "Demo Org's products' events" in page.locator(".page-head").inner_text()
    org_hook = _create(page, url, "sim/", "org-wide")
    before = len(got)
    _wait(lambda: len(got) > before, "a delivery of the demo fleet's event")

    def logged() -> bool:
        visit(page, base, org_hook.removeprefix(base))
        return "success" in " ".join(page.locator("tr[data-attempt]").all_inner_texts())

    _wait(logged, "the organization integration's delivery log")
    assert [h["name"] for h in api.call(token, "GET", "/v1/orgs/demo-org/integrations")
            ] == ["org-wide"]

    sandbox = next(o["slug"] for o in api.call(token, "GET", "/v1/orgs")["organizations"]
                   if o.get("personal"))
    visit(page, base, f"/console/orgs/{sandbox}")
    page.get_by_role("navigation", name="Sandbox").get_by_role(
        "link", name="Integrations").click()
    page.wait_for_url(f"**/console/orgs/{sandbox}/integrations")
    assert "your sandbox's devices' events" in page.locator(".page-head").inner_text()
    assert page.locator("tbody tr").count() == 0  # the organization's is not here
    _create(page, url, "mine/", "my-own")
    page.get_by_label("Test event data").fill("sandbox test")
    page.get_by_role("button", name="Send a test event").click()
    assert "Test passed (HTTP 200)" in page.locator("[role=status]").inner_text()
    assert [h["name"] for h in api.call(token, "GET", "/v1/integrations")] == ["my-own"]
    # another tenant's integration is "not found"
    visit(page, base, f"/console/orgs/{sandbox}/integrations/{org_hook.rsplit('/', 1)[1]}",
          status=404)
