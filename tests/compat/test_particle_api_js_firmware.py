"""particle-api-js 12 against corral's product firmware routes (issue 6, "Must hold").

The module starts its own corral server (``conftest.py``), seeds over HTTP an owner, an org,
a product (platform 12), a group ``beta`` with one imported device, then runs
``driver_firmware.mjs`` once: ``uploadProductFirmware`` (two Particle modules built for the
product, one whose PRODUCT_VERSION disagrees, one repeating a version),
``listProductFirmware``, ``getProductFirmware``, ``releaseProductFirmware`` (default, then a
group), ``lockDeviceProductFirmware`` with ``flash``, ``unlockDeviceProductFirmware`` and
``markAsDevelopmentDevice``, reading ``targeted_firmware_release_version`` after each.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from compatkit import step

from corral.firmware.module import build_module

pytestmark = pytest.mark.compat

OWNER = "firmware-owner@example.com"
PASSWORD = "compat correct horse 43"
PLATFORM_ID = 12
GROUP = "beta"
DEVICE = "0123456789abcdef0000fa01"


def _expect(r: httpx.Response, *statuses: int) -> Any:
    assert r.status_code in statuses, f"seed: {r.request.method} {r.request.url.path} -> " \
        f"{r.status_code} {r.text[:300]}"
    return r.json() if r.content else None


@pytest.fixture(scope="module")
def seed(corral_server: Any) -> dict[str, Any]:
    base = corral_server.base_url
    with httpx.Client(base_url=base, timeout=15.0, trust_env=False) as http:
        _expect(http.post("/v1/users", json={"username": OWNER, "password": PASSWORD}), 200)
        token = _expect(http.post("/oauth/token", data={
            "grant_type": "password", "username": OWNER, "password": PASSWORD,
            "client_id": "particle-cli", "client_secret": "particle-cli"}), 200)["access_token"]
        http.headers["Authorization"] = f"Bearer {token}"
        org = _expect(http.post("/v1/orgs", json={"name": "Compat Firmware Org"}),
                      200, 201)["organization"]
        body = _expect(http.post(f"/v1/orgs/{org['slug']}/products", json={
            "product": {"name": "Compat Firmware", "platform_id": PLATFORM_ID}}), 200, 201)
        product = body.get("product", body)
        slug = product["slug"]
        _expect(http.post(f"/v1/products/{slug}/groups", json={"name": GROUP}), 201)
        _expect(http.post(f"/v1/products/{slug}/devices", json={"id": DEVICE}), 200)
        _expect(http.put(f"/v1/products/{slug}/devices/{DEVICE}", json={"groups": [GROUP]}), 200)
    return {"slug": slug, "id": int(product["id"])}


@pytest.fixture(scope="module")
def results(run_driver: Callable[[str, dict[str, str]], dict[str, Any]],
            seed: dict[str, Any]) -> dict[str, Any]:
    def module(version: int, product_version: int) -> str:
        data = build_module(b"compat" * 200, platform_id=PLATFORM_ID, product_id=seed["id"],
                            product_version=product_version)
        return base64.b64encode(data).decode()

    plan = {"binaries": {"1": module(1, 1), "2": module(2, 2)}, "badBinary": module(3, 4),
            "device": DEVICE, "group": GROUP}
    return run_driver("driver_firmware.mjs", {
        "CORRAL_COMPAT_USERNAME": OWNER, "CORRAL_COMPAT_PASSWORD": PASSWORD,
        "CORRAL_COMPAT_PRODUCT": seed["slug"], "CORRAL_COMPAT_PLAN": json.dumps(plan),
        "CORRAL_COMPAT_DEADLINE_MS": "60000"})


def _ok(results: dict[str, Any], name: str, status: int = 200) -> Any:
    rec = step(results, name)
    assert rec["ok"], (f"{name}() rejected: HTTP {rec.get('statusCode')} {rec.get('message')}"
                       f"\nbody: {rec.get('body')}\n{results['_server_log'][-2000:]}")
    assert rec["statusCode"] == status, rec
    return rec["body"]


def _error(results: dict[str, Any], name: str, status: int) -> dict[str, Any]:
    rec = step(results, name)
    assert not rec["ok"] and rec["statusCode"] == status, rec
    assert rec["bodyIsJson"], rec
    return rec["body"]


def test_driver_ran_cleanly(results: dict[str, Any]) -> None:
    assert results["unexpected"] == [] and results["_exit_code"] == 0, results["unexpected"]
    assert results["library"]["version"].startswith("12.")


def test_upload_with_the_file_field(results: dict[str, Any]) -> None:
    first = _ok(results, "upload1", 201)
    assert first["version"] == 1 and first["title"] == "First"
    assert first["description"] == "the first one" and first["name"] == "firmware.bin"
    assert first["current"] is False and first["product_default"] is False
    assert _ok(results, "upload2", 201)["version"] == 2


def test_upload_refusals_are_json(results: dict[str, Any]) -> None:
    body = _error(results, "uploadMismatch", 400)
    assert body["error"] == "product_version_mismatch" and "PRODUCT_VERSION(4)" in \
        body["error_description"]
    assert _error(results, "uploadSameVersion", 400)["error"] == "version_too_low"


def test_list_and_get(results: dict[str, Any]) -> None:
    listed = _ok(results, "list")
    assert [f["version"] for f in listed] == [2, 1]
    for f in listed:
        for key in ("_id", "version", "title", "description", "name", "size", "product_default",
                    "uploaded_on", "product_id", "uploaded_by", "groups", "device_count",
                    "mandatory"):
            assert key in f, (key, f)
    assert _ok(results, "get1")["title"] == "First"
    assert _error(results, "getMissing", 404)["error"] == "firmware_not_found"


def test_release_and_precedence_seen_by_the_device(results: dict[str, Any]) -> None:
    released = _ok(results, "releaseDefault")
    assert released["product_default"] is True and released["version"] == 1
    assert _ok(results, "deviceAfterDefault")["targeted_firmware_release_version"] == 1
    group = _ok(results, "releaseGroup")
    assert group["groups"] == [GROUP] and group["intelligent"] is True
    assert _ok(results, "deviceAfterGroup")["targeted_firmware_release_version"] == 2


def test_lock_unlock_and_development(results: dict[str, Any]) -> None:
    lock = _ok(results, "lock")
    assert lock["desired_firmware_version"] == 1 and lock["flash"] is True
    after = _ok(results, "deviceAfterLock")
    assert after["desired_firmware_version"] == 1
    assert after["targeted_firmware_release_version"] == 1
    assert _ok(results, "unlock")["desired_firmware_version"] is None
    assert _ok(results, "deviceAfterUnlock")["targeted_firmware_release_version"] == 2
    assert _ok(results, "markDevelopment")["development"] is True
    dev = _ok(results, "deviceAfterDevelopment")
    assert dev["development"] is True and dev["targeted_firmware_release_version"] is None
    assert _ok(results, "unmarkDevelopment")["development"] is False
    listed = {f["version"]: f for f in _ok(results, "listAfterRelease")}
    assert listed[1]["product_default"] is True and listed[2]["groups"] == [GROUP]
