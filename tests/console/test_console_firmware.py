"""Firmware in a real browser: upload with progress (and a refused one, its error next to the
field), the list with device counts, a release previewed before it is confirmed, a phased
rollout with its progress, pause / resume / abort, and signing keys."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from consolekit import audit, sign_in, visit

pytestmark = pytest.mark.slow

PRODUCT = "/console/products/demo-product"


def binary(tmp_path: Path, name: str, size: int = 200_000) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def upload(page: Any, version: int, title: str, file: Path) -> None:
    page.get_by_role("link", name="Upload").click()
    form = page.locator("form[data-upload]")
    form.get_by_label("Version", exact=True).fill(str(version))
    form.get_by_label("Title").fill(title)
    form.get_by_label("Description").fill(f"{title}, built for the console test")
    form.get_by_label("Binary (.bin)").set_input_files(str(file))
    form.get_by_role("button", name="Upload").click()


def test_the_demo_shows_a_release_in_progress(page: Any, console_server: Any) -> None:
    """`corral serve --demo` releases v2 as a phased rollout to half of the fleet: live,
    with devices updated or pending."""
    base = console_server.url
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/rollouts")
    row = page.locator("tbody tr").filter(has_text="v2").first
    assert "active" in row.inner_text() and "50" in row.inner_text()
    row.get_by_role("link").first.click()
    page.wait_for_url(re.compile(r".*/rollouts/\d+$"))
    assert page.locator("[data-rollout-state]").inner_text().startswith("Active")
    assert int(page.locator('[data-progress-key="targeted"]').inner_text()) > 0
    audit(page)


def test_upload_release_with_preview_and_rollout(page: Any, console_server: Any,
                                                 tmp_path: Path) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/firmware")
    # a version that is not higher than the newest is refused next to the version field
    upload(page, 3, "Second", binary(tmp_path, "second.bin"))
    page.wait_for_url(re.compile(r".*/firmware/3$"))
    assert page.get_by_role("heading", name="v3 · Second").is_visible()
    audit(page)
    visit(page, base, f"{PRODUCT}/firmware")
    upload(page, 3, "Again", binary(tmp_path, "again.bin", 1000))
    error = page.locator("form[data-upload] p.error")
    error.wait_for()
    assert "greater than every earlier version" in error.inner_text()
    assert page.locator("form[data-upload] #f-version").get_attribute("aria-invalid") == "true"
    # the list: v3 (the demo released v2) with its device count (nobody runs it yet)
    visit(page, base, f"{PRODUCT}/firmware")
    row = page.locator("tbody tr").filter(has=page.get_by_role("link", name="v3", exact=True))
    assert row.locator("td.numeric").inner_text() == "0"
    # release to the beta group: the preview first, nothing released yet
    row.get_by_role("link", name="Release…").click()
    page.get_by_label(re.compile("^Group")).first.check()  # beta
    page.get_by_role("button", name="Preview impact").click()
    impact = page.get_by_role("region", name="Impact")
    assert re.search(r"\d+ devices? will update to v3", impact.inner_text())
    audit(page)
    visit(page, base, f"{PRODUCT}/firmware/3")
    assert "not released" in page.locator(".stats").inner_text()
    page.go_back()
    page.get_by_role("button", name=re.compile("^Confirm: release v3")).click()
    page.wait_for_url(re.compile(r".*/firmware/3$"))
    assert "released" in page.locator(".alert-ok").inner_text()
    assert "beta" in page.locator(".stats").inner_text()
    # v4 as the product default, as a phased rollout of 50 %
    visit(page, base, f"{PRODUCT}/firmware")
    upload(page, 4, "Third", binary(tmp_path, "third.bin"))
    page.wait_for_url(re.compile(r".*/firmware/4$"))
    page.get_by_role("link", name="Release…").click()
    page.get_by_label(re.compile("^The product default")).check()
    page.get_by_label(re.compile("^Intelligent")).check()
    page.get_by_label("A percentage of them first").check()
    page.get_by_label("Share (percent or devices)").fill("50")
    page.get_by_label("Pause when failures exceed (%)").fill("20")
    page.get_by_role("button", name="Preview impact").click()
    page.get_by_role("button", name=re.compile("as a phased rollout")).click()
    page.wait_for_url(re.compile(r".*/rollouts/\d+$"))
    audit(page)
    assert page.locator("[data-rollout-state]").inner_text().startswith("Active")
    targeted = int(page.locator('[data-progress-key="targeted"]').inner_text().replace(",", ""))
    eligible = int(page.locator('[data-progress-key="eligible"]').inner_text().replace(",", ""))
    assert 0 <= targeted <= eligible
    # grow it (never shrink), pause, resume, abort
    page.get_by_label("New share (percent)").fill("10")
    page.get_by_role("button", name="Save").click()
    assert "only grows" in page.locator("p.error, .alert-error").first.inner_text()
    page.get_by_label("New share (percent)").fill("80")
    page.get_by_role("button", name="Save").click()
    assert "80.0 %" in page.locator(".page-head").inner_text()
    page.get_by_role("button", name="Pause").click()
    assert page.locator("[data-rollout-state]").inner_text().startswith("Paused")
    page.get_by_role("button", name="Resume").click()
    assert page.locator("[data-rollout-state]").inner_text().startswith("Active")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Abort").click()
    assert page.locator("[data-rollout-state]").inner_text().startswith("Aborted")
    assert page.get_by_role("button", name="Resume").count() == 0
    visit(page, base, f"{PRODUCT}/rollouts")
    assert "aborted" in page.locator("tbody").inner_text()


def test_signing_keys(page: Any, console_server: Any) -> None:
    base = console_server.url
    sign_in(page, base)
    visit(page, base, f"{PRODUCT}/signing-keys")
    page.get_by_label("Public key (optional)").fill("not a key")
    page.get_by_role("button", name="Add key").click()
    page.locator("#f-public_key-err").wait_for()  # the answer is a new page: wait for it, then look
    assert page.locator("#f-public_key-err").is_visible()
    page.get_by_label("Name").fill("release key")
    page.get_by_label("Public key (optional)").fill("")
    page.get_by_role("button", name="Add key").click()
    assert "added" in page.locator(".alert-ok").inner_text()
    row = page.locator("tbody tr").filter(has_text="release key")
    assert "active" in row.inner_text()
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Revoke").click()
    assert "revoked" in page.locator("tbody tr").filter(has_text="release key").inner_text()
