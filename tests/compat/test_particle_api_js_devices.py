"""particle-api-js 12 against corral's device routes (issue 3, "Must hold").

The module starts its own corral server (``conftest.py``: uvicorn, fresh SQLite), seeds over
HTTP a team owner, an org and a product, the product's OAuth client, a group ``beta`` with one
imported device in it, and a second user who owns a developer device. Then
``driver_devices.mjs`` runs once and drives the library: ``addDeviceToProduct`` (a file and
one ID), ``listDevices`` (paging, groups, by id), ``getDevice``, ``renameDevice``,
``claimDevice`` (own team's device; someone else's), ``removeDevice`` (product, product with
``deny``, and without product = unclaim) and ``createCustomer``. Each test checks one step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.compat

OWNER = "devices-owner@example.com"
OTHER = "devices-other@example.com"
PASSWORD = "compat correct horse 42"
ORG_NAME = "Compat Devices Org"
PRODUCT_NAME = "Compat Devices"
PLATFORM_ID = 12  # Argon
GROUP = "beta"
NEW_NAME = "compat-renamed"
CUSTOMER_EMAIL = "compat-customer@example.com"
CUSTOMER_PASSWORD = "customer correct horse 7"
TOKEN_RE = re.compile(r"^[0-9a-f]{40}$")
NINETY_DAYS = 7_776_000
BELONGS = "That belongs to someone else."

# Which device plays which part (24 hex characters; the server stores them lowercase).
GROUPED = "0123456789abcdef0000aa01"  # imported by the seed, in group "beta"
CLAIM = "0123456789abcdef0000aa02"  # file import; the owner claims, then unclaims it
REMOVE = "0123456789abcdef0000aa03"  # file import (sent upper-case); removed from the product
DENY = "0123456789abcdef0000aa04"  # file import; denied
SINGLE = "0123456789abcdef0000aa05"  # imported by ID; renamed; later claimed by the customer
FOREIGN = "0123456789abcdef0000bb01"  # the second user's developer device
INVALID = "0123456789abcdef0000aa0"  # 23 characters
FILE_LINES = [CLAIM, REMOVE.upper(), INVALID, DENY, GROUPED]
PRODUCT_DEVICES = {GROUPED, CLAIM, REMOVE, DENY, SINGLE}

EXPECTED_STEPS = {
    "login", "importFile", "importOne", "importOneAgain", "listPage1", "listPage2",
    "listPage3", "listAllById", "listGroup", "getDevice", "renameDevice",
    "getDeviceAfterRename", "claimDevice", "listMyDevices", "getMyDevice", "claimForeign",
    "removeDevice", "getRemoved", "denyDevice", "getDenied", "listDenied", "unclaimDevice",
    "listMyDevicesAfterUnclaim", "getUnclaimed", "createCustomer", "createCustomerWrongSecret",
    "customerListDevices", "customerClaim", "customerListAfterClaim", "customerLogin",
    "customerLoginListDevices",
}


@dataclass
class Seed:
    product_id: int
    product_slug: str
    client_id: str
    client_secret: str


def _client(base_url: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=15.0, trust_env=False)


def _describe(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:500]}"


def _expect(r: httpx.Response, *statuses: int) -> Any:
    assert r.status_code in statuses, f"seed step failed: {_describe(r)}"
    return r.json() if r.content else None


def _sign_up_and_login(http: httpx.Client, username: str) -> str:
    _expect(http.post("/v1/users", json={"username": username, "password": PASSWORD}), 200)
    body = _expect(http.post("/oauth/token", data={
        "grant_type": "password", "username": username, "password": PASSWORD,
        "client_id": "particle-cli", "client_secret": "particle-cli"}), 200)
    return str(body["access_token"])


@pytest.fixture(scope="module")
def seed(corral_server: Any) -> Seed:
    """Everything the driver needs that particle-api-js cannot make, created over HTTP."""
    base = corral_server.base_url
    with _client(base) as http:
        owner_token = _sign_up_and_login(http, OWNER)
        other_token = _sign_up_and_login(http, OTHER)
    with _client(base, owner_token) as http:
        org = _expect(http.post("/v1/orgs", json={"name": ORG_NAME}), 200, 201)["organization"]
        body = _expect(http.post(f"/v1/orgs/{org['slug']}/products", json={
            "product": {"name": PRODUCT_NAME, "platform_id": PLATFORM_ID}}), 200, 201)
        product = body.get("product", body)
        slug = product["slug"]
        client = _expect(http.post(f"/v1/products/{slug}/clients", json={
            "name": "compat backend", "type": "installed"}), 200, 201)["client"]
        assert client.get("id") and client.get("secret"), client
        _expect(http.post(f"/v1/products/{slug}/groups", json={"name": GROUP}), 201)
        imported = _expect(http.post(f"/v1/products/{slug}/devices", json={"id": GROUPED}), 200)
        assert imported["updatedDeviceIds"] == [GROUPED], imported
        changed = _expect(http.put(f"/v1/products/{slug}/devices/{GROUPED}",
                                   json={"groups": [GROUP]}), 200)
        assert changed["groups"] == [GROUP], changed
    with _client(base, other_token) as http:
        claimed = _expect(http.post("/v1/devices", json={"id": FOREIGN}), 200)
        assert claimed.get("ok") is True, claimed
    return Seed(product_id=int(product["id"]), product_slug=str(slug),
                client_id=str(client["id"]), client_secret=str(client["secret"]))


@pytest.fixture(scope="module")
def results(run_driver: Callable[[str, dict[str, str]], dict[str, Any]],
            seed: Seed) -> dict[str, Any]:
    plan = {
        "fileLines": FILE_LINES, "single": SINGLE, "claim": CLAIM, "remove": REMOVE,
        "deny": DENY, "foreign": FOREIGN, "group": GROUP, "newName": NEW_NAME,
        "customerEmail": CUSTOMER_EMAIL, "customerPassword": CUSTOMER_PASSWORD,
    }
    return run_driver("driver_devices.mjs", {
        "CORRAL_COMPAT_USERNAME": OWNER,
        "CORRAL_COMPAT_PASSWORD": PASSWORD,
        "CORRAL_COMPAT_PRODUCT": seed.product_slug,
        "CORRAL_COMPAT_PRODUCT_ID": str(seed.product_id),
        "CORRAL_COMPAT_CLIENT_ID": seed.client_id,
        "CORRAL_COMPAT_CLIENT_SECRET": seed.client_secret,
        "CORRAL_COMPAT_PLAN": json.dumps(plan),
        "CORRAL_COMPAT_DEADLINE_MS": "60000",
    })


# ------------------------------------------------------------------ reading the document


def _rec(results: dict[str, Any], name: str) -> dict[str, Any]:
    rec = results["steps"].get(name)
    assert rec is not None, (f"driver did not record step {name!r} (recorded: "
                             f"{results.get('order')}; unexpected: {results['unexpected']})")
    return rec


def _ok(results: dict[str, Any], name: str, status: int = 200) -> Any:
    """The body of a library call that must have resolved with ``status``."""
    rec = _rec(results, name)
    log = (f"\n--- server log ---\n{results['_server_log']}"
           if (rec.get("statusCode") or 0) >= 500 else "")
    assert rec["ok"], (f"particle-api-js {name}() rejected: HTTP {rec.get('statusCode')} "
                       f"{rec.get('message')}\nbody: {rec.get('body')}{log}")
    assert rec["statusCode"] == status, rec
    return rec["body"]


def _error(results: dict[str, Any], name: str, *statuses: int) -> dict[str, Any]:
    """A rejection with one of ``statuses`` whose body the library parsed as JSON."""
    rec = _rec(results, name)
    assert not rec["ok"], f"{name}: expected HTTP {statuses}, it succeeded: {rec.get('body')}"
    assert rec["statusCode"] in statuses, rec
    assert rec["bodyIsJson"], (f"{name}: error body was not JSON: "
                               f"{rec.get('bodyErrorName')}: {rec.get('bodyErrorMessage')}")
    assert (rec.get("contentType") or "").startswith("application/json"), rec
    return rec["body"]


def _ids(devices: Any) -> list[str]:
    assert isinstance(devices, list), devices
    return [d["id"] for d in devices]


def _product_listing(body: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    assert isinstance(body, dict), body
    assert isinstance(body.get("devices"), list), body
    assert isinstance(body.get("customers"), list), body
    assert isinstance(body.get("meta"), dict), body
    return body["devices"], body["meta"]


def _import_summary(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict), body
    for key in ("updatedDeviceIds", "existingDeviceIds", "invalidDeviceIds",
                "nonmemberDeviceIds", "protectedDeviceIds"):
        assert isinstance(body.get(key), list), (key, body)
    assert body["updated"] == len(body["updatedDeviceIds"]), body
    return body


# ------------------------------------------------------------------ the harness itself


def test_driver_ran_cleanly(results: dict[str, Any], node_tools: Any) -> None:
    assert results["library"]["version"] == node_tools.packages["particle-api-js"]
    assert results["library"]["version"].startswith("12."), results["library"]
    assert results["unexpected"] == [], results["unexpected"]
    assert results["_exit_code"] == 0, results["_stderr"]
    assert set(results["steps"]) == EXPECTED_STEPS, (
        f"missing {sorted(EXPECTED_STEPS - set(results['steps']))}, "
        f"extra {sorted(set(results['steps']) - EXPECTED_STEPS)}")


def test_login(results: dict[str, Any]) -> None:
    body = _ok(results, "login")
    assert TOKEN_RE.match(body["access_token"]), body


# ------------------------------------------------------------------ import


def test_import_file_crlf_with_an_invalid_id(results: dict[str, Any]) -> None:
    body = _import_summary(_ok(results, "importFile"))
    # REMOVE was sent upper-case: it comes back stored lowercase.
    assert sorted(body["updatedDeviceIds"]) == sorted([CLAIM, REMOVE, DENY]), body
    assert body["updated"] == 3, body
    assert body["existingDeviceIds"] == [GROUPED], body  # imported by the seed
    assert body["invalidDeviceIds"] == [INVALID], body
    assert body["nonmemberDeviceIds"] == [] and body["protectedDeviceIds"] == [], body


def test_import_one_device_id_is_idempotent(results: dict[str, Any]) -> None:
    first = _import_summary(_ok(results, "importOne"))
    assert first["updatedDeviceIds"] == [SINGLE] and first["updated"] == 1, first
    assert first["existingDeviceIds"] == [] and first["invalidDeviceIds"] == [], first
    again = _import_summary(_ok(results, "importOneAgain"))
    assert again["updated"] == 0 and again["updatedDeviceIds"] == [], again
    assert again["existingDeviceIds"] == [SINGLE], again


# ------------------------------------------------------------------ listing


def test_list_devices_pages_with_per_page(results: dict[str, Any], seed: Seed) -> None:
    seen: list[str] = []
    for page, size in ((1, 2), (2, 2), (3, 1)):
        devices, meta = _product_listing(_ok(results, f"listPage{page}"))
        assert len(devices) == size, (page, devices)
        assert meta["total_pages"] == 3, (page, meta)
        for d in devices:
            assert d["product_id"] == seed.product_id, d
            assert d["platform_id"] == PLATFORM_ID, d
            assert isinstance(d["groups"], list), d
            assert d["quarantined"] is False and d["denied"] is False, d
        seen += _ids(devices)
    assert len(seen) == len(set(seen)), f"a device appears on two pages: {seen}"
    assert set(seen) == PRODUCT_DEVICES, seen


def test_list_devices_by_product_id(results: dict[str, Any]) -> None:
    devices, meta = _product_listing(_ok(results, "listAllById"))
    assert set(_ids(devices)) == PRODUCT_DEVICES, devices
    assert len(devices) == len(PRODUCT_DEVICES), devices
    assert meta["total_pages"] == 1, meta


def test_list_devices_by_group(results: dict[str, Any]) -> None:
    devices, meta = _product_listing(_ok(results, "listGroup"))
    assert _ids(devices) == [GROUPED], devices
    assert devices[0]["groups"] == [GROUP], devices[0]
    assert meta["total_pages"] == 1, meta


# ------------------------------------------------------------------ get and rename


def test_get_product_device(results: dict[str, Any], seed: Seed) -> None:
    d = _ok(results, "getDevice")
    assert d["id"] == SINGLE, d
    assert d["product_id"] == seed.product_id, d
    assert d["platform_id"] == PLATFORM_ID, d
    assert d["groups"] == [], d
    assert d["name"] is None and d["owner"] is None, d
    assert d["quarantined"] is False and d["denied"] is False, d
    assert d["development"] is False, d


def test_rename_device(results: dict[str, Any]) -> None:
    body = _ok(results, "renameDevice")
    assert body["id"] == SINGLE, body
    assert body["name"] == NEW_NAME, body
    assert isinstance(body.get("updated_at"), str) and body["updated_at"], body
    after = _ok(results, "getDeviceAfterRename")
    assert after["id"] == SINGLE and after["name"] == NEW_NAME, after


# ------------------------------------------------------------------ claiming


def test_claim_product_device_as_team_member(results: dict[str, Any], seed: Seed) -> None:
    body = _ok(results, "claimDevice")
    assert body.get("ok") is True and body.get("claimed") is True, body
    assert body.get("deviceID") == CLAIM, body
    mine = _ok(results, "listMyDevices")
    assert _ids(mine) == [CLAIM], mine  # a bare array, not {"devices": ...}
    d = _ok(results, "getMyDevice")
    assert d["id"] == CLAIM and d["owner"] == OWNER, d
    assert d["product_id"] == seed.product_id, d


def test_claim_someone_elses_device_is_403(results: dict[str, Any]) -> None:
    body = _error(results, "claimForeign", 403)
    assert isinstance(body.get("errors"), list), body
    assert BELONGS in body["errors"], body


# ------------------------------------------------------------------ remove, deny, unclaim


def test_remove_device_from_product(results: dict[str, Any]) -> None:
    assert _ok(results, "removeDevice", 204) == {}  # the library's answer for a 204
    _error(results, "getRemoved", 404)


def test_deny_device(results: dict[str, Any]) -> None:
    assert _ok(results, "denyDevice", 204) == {}
    d = _ok(results, "getDenied")
    assert d["id"] == DENY, d
    assert d["denied"] is True and d["quarantined"] is False, d
    devices, _meta = _product_listing(_ok(results, "listDenied"))
    assert _ids(devices) == [DENY], devices
    assert devices[0]["denied"] is True, devices[0]


def test_remove_device_without_product_unclaims(results: dict[str, Any], seed: Seed) -> None:
    assert _ok(results, "unclaimDevice") == {"ok": True}
    assert _ok(results, "listMyDevicesAfterUnclaim") == []
    d = _ok(results, "getUnclaimed")  # still in the product, now without an owner
    assert d["id"] == CLAIM and d["owner"] is None, d
    assert d["product_id"] == seed.product_id and d["denied"] is False, d


# ------------------------------------------------------------------ customers


def test_create_customer_with_client_credentials(results: dict[str, Any]) -> None:
    body = _ok(results, "createCustomer", 201)
    assert body["token_type"] == "bearer", body
    assert TOKEN_RE.match(body["access_token"]), body
    assert isinstance(body.get("refresh_token"), str) and body["refresh_token"], body
    assert abs(body["expires_in"] - NINETY_DAYS) <= 5, body


def test_create_customer_wrong_client_secret(results: dict[str, Any]) -> None:
    body = _error(results, "createCustomerWrongSecret", 400, 401)
    assert body["error"] == "invalid_client", body
    assert isinstance(body.get("error_description"), str) and body["error_description"], body


def test_customer_sees_only_devices_claimed_to_them(results: dict[str, Any]) -> None:
    assert _ok(results, "customerListDevices") == []
    body = _ok(results, "customerClaim")
    assert body.get("ok") is True and body.get("claimed") is True, body
    assert body.get("deviceID") == SINGLE, body
    assert _ids(_ok(results, "customerListAfterClaim")) == [SINGLE]


def test_customer_logs_in_through_the_product_client(results: dict[str, Any]) -> None:
    body = _ok(results, "customerLogin")
    assert TOKEN_RE.match(body["access_token"]), body
    assert _ids(_ok(results, "customerLoginListDevices")) == [SINGLE]
