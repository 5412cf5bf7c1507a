"""Product firmware over /v1: upload (module header checks, versions, size limit, signing),
list/get/edit/download/delete, release and precedence as devices see it, the impact
preview and dry run, locking/flashing one device, and tenancy."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from corral.devices.models import Device
from corral.firmware import signals, signing
from corral.firmware.models import DeviceUpdate
from corral.firmware.module import build_module
from helpers import (
    add_devices,
    add_role,
    assert_error,
    audit_actions,
    bearer,
    load,
    new_user,
    owner_and_product,
    seed,
)

IDS = [f"{i:024x}" for i in range(0xA0, 0xA8)]


def module(product: dict[str, Any], version: int, payload: bytes = b"app", **kw: Any) -> bytes:
    return build_module(payload * 50, platform_id=kw.pop("platform_id", product["platform_id"]),
                        product_id=kw.pop("product_id", product["id"]),
                        product_version=kw.pop("product_version", version), **kw)


async def upload(client: httpx.AsyncClient, token: str, product: dict[str, Any], version: int,
                 data: bytes | None = None, *, field: str = "file", **fields: Any
                 ) -> httpx.Response:
    data = module(product, version) if data is None else data
    form = {"version": str(version), "title": f"v{version}", **fields}
    return await client.post(f"/v1/products/{product['id']}/firmware", headers=bearer(token),
                             data=form, files={field: ("firmware.bin", data,
                                                       "application/octet-stream")})


async def release(client: httpx.AsyncClient, token: str, product: dict[str, Any],
                  **body: Any) -> httpx.Response:
    return await client.put(f"/v1/products/{product['id']}/firmware/release",
                            headers=bearer(token), json=body)


async def device(client: httpx.AsyncClient, token: str, product: dict[str, Any],
                 device_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/products/{product['id']}/devices/{device_id}",
                         headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()


async def group(client: httpx.AsyncClient, token: str, product: dict[str, Any], name: str,
                *device_ids: str) -> None:
    r = await client.post(f"/v1/products/{product['id']}/groups", headers=bearer(token),
                          json={"name": name})
    assert r.status_code == 201, r.text
    for d in device_ids:
        current = (await device(client, token, product, d))["groups"]
        r = await client.put(f"/v1/products/{product['id']}/devices/{d}", headers=bearer(token),
                             json={"groups": [*current, name]})
        assert r.status_code == 200, r.text


# --- upload -------------------------------------------------------------------------------------

async def test_upload_list_get_edit_download(client, app):
    tok, p = await owner_and_product(client)
    data = module(p, 3)
    r = await upload(client, tok, p, 3, data, field="binary", description="first")
    assert r.status_code == 201, r.text
    fw = r.json()
    assert fw["version"] == 3 and fw["title"] == "v3" and fw["description"] == "first"
    assert fw["size"] == len(data) and fw["sha256"] == hashlib.sha256(data).hexdigest()
    assert fw["name"] == "firmware.bin" and fw["product_default"] is False
    assert fw["current"] is False and fw["groups"] == [] and fw["signature"] is None
    assert fw["uploaded_by"] == {"username": "ada@example.com"}
    assert fw["module"]["platform_id"] == 12 and fw["module"]["product_version"] == 3

    assert (await upload(client, tok, p, 5, field="file")).status_code == 201
    listed = (await client.get(f"/v1/products/{p['id']}/firmware", headers=bearer(tok))).json()
    assert [f["version"] for f in listed] == [5, 3]
    assert all(f["device_count"] == 0 for f in listed)

    r = await client.put(f"/v1/products/{p['slug']}/firmware/3", headers=bearer(tok),
                         json={"title": "Renamed", "description": "better"})
    assert r.status_code == 200 and r.json()["title"] == "Renamed", r.text
    got = (await client.get(f"/v1/products/{p['id']}/firmware/3", headers=bearer(tok))).json()
    assert got["title"] == "Renamed" and got["description"] == "better"

    r = await client.get(f"/v1/products/{p['id']}/firmware/3/binary", headers=bearer(tok))
    assert r.status_code == 200 and r.content == data
    assert r.headers["x-firmware-sha256"] == fw["sha256"]
    r = await client.get(f"/v1/products/{p['id']}/firmware/3/binary",
                         headers={**bearer(tok), "Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert [e.action for e in await audit_actions(app, "firmware.")] == [
        "firmware.uploaded", "firmware.uploaded", "firmware.updated"]


async def test_device_count_counts_devices_reporting_the_version(client, app):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 2)
    await add_devices(app, p["id"], *IDS[:3], firmware_version=2)
    await add_devices(app, p["id"], IDS[3], firmware_version=1)
    listed = (await client.get(f"/v1/products/{p['id']}/firmware", headers=bearer(tok))).json()
    assert listed[0]["device_count"] == 3


@pytest.mark.parametrize(("kw", "code"), [
    ({"platform_id": 6}, "platform_mismatch"),
    ({"product_id": 4242}, "product_mismatch"),
    ({"product_version": 8}, "product_version_mismatch"),
    ({"product_version": None}, "product_version_mismatch"),
    ({"corrupt_crc": True}, "invalid_binary"),
    ({"function": 4}, "invalid_binary"),
])
async def test_module_header_must_match_the_product(client, app, kw, code):
    tok, p = await owner_and_product(client)
    body = assert_error(await upload(client, tok, p, 7, module(p, 7, **kw)), 400, code)
    assert body["error_description"]
    listed = (await client.get(f"/v1/products/{p['id']}/firmware", headers=bearer(tok))).json()
    assert listed == []


async def test_module_without_product_id_and_opaque_binaries_are_accepted(client):
    tok, p = await owner_and_product(client)
    assert (await upload(client, tok, p, 1, module(p, 1, product_id=None))).status_code == 201
    r = await upload(client, tok, p, 2, b"\x7fELF not a particle module" * 10)
    assert r.status_code == 201 and r.json()["module"] is None


async def test_versions_must_grow_and_fields_are_checked(client):
    tok, p = await owner_and_product(client)
    assert (await upload(client, tok, p, 4)).status_code == 201
    assert_error(await upload(client, tok, p, 4), 400, "version_too_low")
    assert_error(await upload(client, tok, p, 3), 400, "version_too_low")
    assert_error(await upload(client, tok, p, 0, b"x"), 400)
    assert_error(await upload(client, tok, p, 70000, b"x"), 400)
    r = await client.post(f"/v1/products/{p['id']}/firmware", headers=bearer(tok),
                          data={"version": "6"},
                          files={"file": ("f.bin", module(p, 6), "application/octet-stream")})
    assert_error(r, 400, "invalid_request")  # no title
    r = await client.post(f"/v1/products/{p['id']}/firmware", headers=bearer(tok),
                          json={"version": 6, "title": "x"})
    assert_error(r, 400, "invalid_request")  # not multipart
    r = await client.post(f"/v1/products/{p['id']}/firmware", headers=bearer(tok),
                          data={"version": "6", "title": "t"},
                          files={"binary": ("a", b"1"), "file": ("b", b"2")})
    assert_error(r, 400, "invalid_request")  # two files
    assert_error(await upload(client, tok, p, 6, wat="1"), 400, "invalid_request")
    assert_error(await upload(client, tok, p, 6, b""), 400, "invalid_binary")


async def test_size_limit_is_enforced(client, app):
    tok, p = await owner_and_product(client)
    app.state.settings.firmware_max_bytes = 2048
    big = b"\x00" * 2049
    assert_error(await upload(client, tok, p, 1, big), 413, "payload_too_large")
    assert (await upload(client, tok, p, 1, b"\x01" * 2048)).status_code == 201


async def test_delete_only_unreleased_and_unlocked_firmware(client, app):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 1)
    await upload(client, tok, p, 2)
    await upload(client, tok, p, 3)
    assert (await release(client, tok, p, version=1, product_default=True)).status_code == 200
    assert_error(await client.delete(f"/v1/products/{p['id']}/firmware/1",
                                     headers=bearer(tok)), 400, "firmware_released")
    await add_devices(app, p["id"], IDS[0])
    r = await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}", headers=bearer(tok),
                         json={"desired_firmware_version": 2})
    assert r.status_code == 200, r.text
    assert_error(await client.delete(f"/v1/products/{p['id']}/firmware/2",
                                     headers=bearer(tok)), 400, "firmware_locked")
    sha3 = (await client.get(f"/v1/products/{p['id']}/firmware/3", headers=bearer(tok))).json()["sha256"]
    path = app.state.settings.data_dir / "firmware" / sha3[:2] / sha3
    assert path.is_file()
    r = await client.delete(f"/v1/products/{p['id']}/firmware/3", headers=bearer(tok))
    assert r.status_code == 204
    assert not path.exists()
    assert_error(await client.get(f"/v1/products/{p['id']}/firmware/3", headers=bearer(tok)),
                 404, "firmware_not_found")
    assert_error(await client.get(f"/v1/products/{p['id']}/firmware/abc", headers=bearer(tok)),
                 404, "firmware_not_found")


# --- release and precedence -----------------------------------------------------------------------

async def test_release_follows_particle_precedence(client, app):
    tok, p = await owner_and_product(client)
    for v in (1, 2, 3, 4):
        assert (await upload(client, tok, p, v)).status_code == 201
    plain, beta, both, dev, locked, none_ = IDS[:6]
    await add_devices(app, p["id"], *IDS[:6], firmware_version=1)
    await group(client, tok, p, "beta", beta, both, locked)
    await group(client, tok, p, "canary", both)
    await group(client, tok, p, "empty")

    async def targets() -> dict[str, Any]:
        body = (await client.get(f"/v1/products/{p['id']}/devices?per_page=100",
                                 headers=bearer(tok))).json()
        return {d["id"]: d["targeted_firmware_release_version"] for d in body["devices"]}

    assert set((await targets()).values()) == {None}
    r = await release(client, tok, p, version=2, product_default=True, groups=[],
                      intelligent=False)
    assert r.status_code == 200, r.text
    assert r.json()["product_default"] is True and r.json()["current"] is True
    assert r.json()["released_at"] and r.json()["updated_at"]
    r = await client.put(f"/v1/products/{p['id']}/devices/{dev}", headers=bearer(tok),
                         json={"development": True})
    assert r.status_code == 200
    r = await client.put(f"/v1/products/{p['id']}/devices/{locked}", headers=bearer(tok),
                         json={"desired_firmware_version": 1})
    assert r.status_code == 200 and r.json()["desired_firmware_version"] == 1, r.text
    r = await release(client, tok, p, version=3, groups=["beta"])
    assert r.json()["groups"] == ["beta"] and r.json()["product_default"] is False
    r = await release(client, tok, p, version=4, groups=["canary", "empty"])
    assert r.status_code == 200 and r.json()["groups"] == ["canary", "empty"]

    t = await targets()
    assert t == {plain: 2, beta: 3, both: 4, dev: None, locked: 1, none_: 2}
    assert (await device(client, tok, p, both))["targeted_firmware_release_version"] == 4

    # a release is absolute for its firmware: 4 leaves canary, goes to beta (3 loses beta)
    r = await release(client, tok, p, version=4, groups=["beta"])
    assert r.json()["groups"] == ["beta"]
    assert (await client.get(f"/v1/products/{p['id']}/firmware/3",
                             headers=bearer(tok))).json()["groups"] == []
    t = await targets()
    assert t[both] == 4 and t[beta] == 4 and t[plain] == 2
    # a new default replaces the old one; unlocking falls back to the rules
    await release(client, tok, p, version=3, product_default=True)
    assert (await client.get(f"/v1/products/{p['id']}/firmware/2",
                             headers=bearer(tok))).json()["product_default"] is False
    r = await client.put(f"/v1/products/{p['id']}/devices/{locked}", headers=bearer(tok),
                         json={"desired_firmware_version": None})
    assert r.status_code == 200 and r.json()["desired_firmware_version"] is None
    t = await targets()
    assert t == {plain: 3, beta: 4, both: 4, dev: None, locked: 4, none_: 3}
    acts = [e.action for e in await audit_actions(app, "firmware.released")]
    assert len(acts) == 5


async def test_release_validation(client):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 1)
    assert_error(await release(client, tok, p), 400)
    assert_error(await release(client, tok, p, version=9, product_default=True), 404,
                 "firmware_not_found")
    assert_error(await release(client, tok, p, version=1, groups=["nope"]), 400,
                 "group_not_found")
    assert_error(await release(client, tok, p, version=1, groups=["Bad Name"]), 400)
    assert_error(await release(client, tok, p, version=1, colour="red"), 400, "invalid_request")
    assert_error(await release(client, tok, p, version=1, rollout=5), 400, "invalid_request")
    # nothing was released by any of those
    fw = (await client.get(f"/v1/products/{p['id']}/firmware/1", headers=bearer(tok))).json()
    assert fw["released_at"] is None


async def test_impact_preview_and_dry_run_write_nothing(client, app):
    tok, p = await owner_and_product(client)
    for v in (1, 2):
        await upload(client, tok, p, v)
    await add_devices(app, p["id"], *IDS[:3], firmware_version=1)
    await add_devices(app, p["id"], IDS[3], firmware_version=2)
    await add_devices(app, p["id"], IDS[4])  # never reported a version
    await add_devices(app, p["id"], IDS[5], firmware_version=1, development=True)
    await group(client, tok, p, "beta", IDS[0])

    r = await client.get(f"/v1/products/{p['id']}/impact", headers=bearer(tok), params={
        "action": "edit_groups_for_firmware", "firmware_version": 2, "product_default": "true"})
    assert r.status_code == 200, r.text
    assert r.json() == {"devices": {"firmware_update": {"total": 4, "by_version": [
        {"version": 1, "total": 3}, {"version": None, "total": 1}]}}}
    r = await client.get(f"/v1/products/{p['id']}/impact", headers=bearer(tok),
                         params={"firmware_version": 2, "groups": "beta"})
    assert r.json()["devices"]["firmware_update"] == {"total": 1, "by_version": [
        {"version": 1, "total": 1}]}
    assert_error(await client.get(f"/v1/products/{p['id']}/impact", headers=bearer(tok)), 400)

    r = await release(client, tok, p, version=2, product_default=True, dry_run=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dry_run"] is True and body["meta"]["total"] == 5
    assert body["impact"]["devices"]["firmware_update"]["total"] == 4
    rows = {d["id"]: d for d in body["devices"]}
    assert rows[IDS[3]]["before"]["version"] is None and rows[IDS[3]]["after"]["version"] == 2
    assert IDS[5] not in rows  # development
    fw = (await client.get(f"/v1/products/{p['id']}/firmware/2", headers=bearer(tok))).json()
    assert fw["product_default"] is False and fw["released_at"] is None
    assert (await device(client, tok, p, IDS[0]))["targeted_firmware_release_version"] is None


async def test_lock_and_flash_emit_an_intent_after_commit(client, app):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 1)
    await upload(client, tok, p, 2)
    await add_devices(app, p["id"], IDS[0], firmware_version=1, online=True)
    seen: list[signals.UpdateIntent] = []
    signals.UPDATE_HOOKS.append(seen.append)
    try:
        r = await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}", headers=bearer(tok),
                             json={"desired_firmware_version": 2, "flash": True})
        assert r.status_code == 200, r.text
        assert r.json()["desired_firmware_version"] == 2 and r.json()["flash"] is True
        assert [(i.device_id, i.version, i.trigger) for i in seen] == [(IDS[0], 2, "flash")]
        # a refused change sends nothing
        assert_error(await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}",
                                      headers=bearer(tok),
                                      json={"desired_firmware_version": 9, "flash": True}),
                     404, "firmware_not_found")
        assert_error(await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}",
                                      headers=bearer(tok),
                                      json={"desired_firmware_version": 2, "name": "bad name"}),
                     400)
        assert len(seen) == 1
    finally:
        signals.UPDATE_HOOKS.remove(seen.append)
    async with app.state.sessionmaker() as db:
        rows = list((await db.execute(select(DeviceUpdate))).scalars())
    assert [(u.device_id, u.target_version, u.state, u.trigger) for u in rows] == [
        (IDS[0], 2, "pending", "flash")]
    assert seen[0].update_id == rows[0].id
    assert (await device(client, tok, p, IDS[0]))["targeted_firmware_release_version"] == 2
    r = await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}", headers=bearer(tok),
                         json={"desired_firmware_version": None})
    assert r.status_code == 200 and (await load(app, IDS[0])).desired_firmware_version is None
    assert_error(await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}",
                                  headers=bearer(tok), json={"flash": True}), 400)
    assert_error(await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}",
                                  headers=bearer(tok), json={"desired_firmware_version": "x"}),
                 400)


async def test_locking_needs_firmware_release_permission(client, app):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 1)
    await add_devices(app, p["id"], IDS[0])
    support = await new_user(client, "sam@example.com")
    await add_role(app, "sam@example.com", p, "Support")
    r = await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}", headers=bearer(support),
                         json={"desired_firmware_version": 1})
    assert_error(r, 403, "forbidden")
    assert (await load(app, IDS[0])).desired_firmware_version is None
    # the sandbox route does not take firmware fields
    r = await client.put(f"/v1/devices/{IDS[0]}", headers=bearer(tok),
                         json={"desired_firmware_version": 1})
    assert r.status_code in (400, 403, 404)


async def test_intelligent_release_records_updates_for_online_devices(client, app):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 1)
    await upload(client, tok, p, 2)
    await add_devices(app, p["id"], IDS[0], firmware_version=1, online=True)
    await add_devices(app, p["id"], IDS[1], firmware_version=1, online=False)
    await add_devices(app, p["id"], IDS[2], firmware_version=2, online=True)
    seen: list[signals.UpdateIntent] = []
    signals.UPDATE_HOOKS.append(seen.append)
    try:
        r = await release(client, tok, p, version=2, product_default=True, intelligent=True)
        assert r.status_code == 200 and r.json()["intelligent"] is True
    finally:
        signals.UPDATE_HOOKS.remove(seen.append)
    assert [(i.device_id, i.trigger) for i in seen] == [(IDS[0], "intelligent")]



async def test_intelligent_release_with_a_phased_rollout(client, app):
    """The immediate-delivery updates of an intelligent release name the rollout that admitted
    their devices (it was a foreign-key 500: the updates were written before the rollout had
    its id)."""
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 1)
    await upload(client, tok, p, 2)
    await add_devices(app, p["id"], *IDS[:3], firmware_version=1, online=True)
    seen: list[signals.UpdateIntent] = []
    signals.UPDATE_HOOKS.append(seen.append)
    try:
        r = await release(client, tok, p, version=2, product_default=True, intelligent=True,
                          rollout={"percent": 100})
        assert r.status_code == 200, r.text
    finally:
        signals.UPDATE_HOOKS.remove(seen.append)
    assert sorted(i.device_id for i in seen) == sorted(IDS[:3])
    rollouts = (await client.get(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok))).json()
    rid = rollouts["rollouts"][0]["id"]
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(DeviceUpdate))).scalars().all()
    assert {(u.trigger, u.rollout_id) for u in rows} == {("intelligent", rid)}

# --- signing ------------------------------------------------------------------------------------

async def test_generated_key_signs_uploads_and_the_sdk_function_verifies(client, app):
    tok, p = await owner_and_product(client)
    r = await client.post(f"/v1/products/{p['id']}/signing_keys", headers=bearer(tok),
                          json={"name": "release key"})
    assert r.status_code == 201, r.text
    key = r.json()["signing_key"]
    assert key["can_sign"] is True and key["active"] is True and "private" not in str(key)
    data = module(p, 1)
    fw = (await upload(client, tok, p, 1, data)).json()
    assert fw["signing_key_id"] == key["key_id"]
    assert signing.verify_firmware(data, fw["signature"], [key["public_key"]]) == key["key_id"]
    assert signing.verify_firmware(data + b"x", fw["signature"], [key["public_key"]]) is None
    listed = (await client.get(f"/v1/products/{p['id']}/signing_keys",
                               headers=bearer(tok))).json()["signing_keys"]
    assert [k["key_id"] for k in listed] == [key["key_id"]]

    r = await client.delete(f"/v1/products/{p['id']}/signing_keys/{key['key_id']}",
                            headers=bearer(tok))
    assert r.status_code == 204
    listed = (await client.get(f"/v1/products/{p['id']}/signing_keys",
                               headers=bearer(tok))).json()["signing_keys"]
    assert listed[0]["active"] is False and listed[0]["can_sign"] is False
    # no active key left: uploads are unsigned again
    assert (await upload(client, tok, p, 2)).json()["signature"] is None


async def test_uploader_supplied_signature_is_checked(client):
    tok, p = await owner_and_product(client)
    private, public = signing.generate_key()
    r = await client.post(f"/v1/products/{p['id']}/signing_keys", headers=bearer(tok),
                          json={"public_key": signing.b64(public)})
    assert r.status_code == 201 and r.json()["signing_key"]["can_sign"] is False
    kid = r.json()["signing_key"]["key_id"]
    data = module(p, 1)
    assert_error(await upload(client, tok, p, 1, data), 400, "signature_required")
    other_private, _ = signing.generate_key()
    bad = signing.b64(signing.sign_firmware(data, other_private))
    assert_error(await upload(client, tok, p, 1, data, signature=bad), 400, "invalid_signature")
    assert_error(await upload(client, tok, p, 1, data, signature="!!"), 400, "invalid_signature")
    good = signing.sign_firmware(data, private).hex()
    r = await upload(client, tok, p, 1, data, signature=good, signing_key_id=kid)
    assert r.status_code == 201, r.text
    assert r.json()["signing_key_id"] == kid
    assert_error(await client.post(f"/v1/products/{p['id']}/signing_keys", headers=bearer(tok),
                                   json={"public_key": signing.b64(public)}), 409, "key_exists")
    assert_error(await client.post(f"/v1/products/{p['id']}/signing_keys", headers=bearer(tok),
                                   json={"public_key": "bm90IGEga2V5"}), 400, "invalid_key")


# --- tenancy and roles --------------------------------------------------------------------------

async def test_other_tenants_see_nothing(client, app):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 1)
    bob, q = await owner_and_product(client, "bob@example.com")
    for method, path in [("GET", "firmware"), ("GET", "firmware/1"), ("GET", "firmware/1/binary"),
                         ("PUT", "firmware/release"), ("GET", "impact?firmware_version=1"),
                         ("GET", "signing_keys"), ("DELETE", "firmware/1")]:
        r = await client.request(method, f"/v1/products/{p['id']}/{path}", headers=bearer(bob),
                                 json={"version": 1, "product_default": True})
        assert_error(r, 404)
        assert r.json()["error_description"] == "Product not found"
    # bob's own product does not see ada's version 1
    assert_error(await client.get(f"/v1/products/{q['id']}/firmware/1", headers=bearer(bob)),
                 404, "firmware_not_found")
    viewer = await new_user(client, "vic@example.com")
    await add_role(app, "vic@example.com", p, "View-only")
    assert (await client.get(f"/v1/products/{p['id']}/firmware",
                             headers=bearer(viewer))).status_code == 200
    assert_error(await upload(client, viewer, p, 2), 403, "forbidden")
    assert_error(await release(client, viewer, p, version=1, product_default=True), 403)


async def test_device_json_has_target_for_seeded_devices(client, app):
    tok, p = await owner_and_product(client)
    await upload(client, tok, p, 5)
    await seed(app, {"id": IDS[7], "product_id": p["id"], "platform_id": 12,
                     "firmware_version": 4})
    await release(client, tok, p, version=5, product_default=True)
    assert (await device(client, tok, p, IDS[7]))["targeted_firmware_release_version"] == 5
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, IDS[7])
        assert d is not None and d.firmware_version == 4


async def test_device_os_4_module_with_the_platform_id_as_product_id(client):
    """Device OS 4+ firmware built without PRODUCT_ID (the macro is gone) carries the
    platform ID in the module's product ID field: that means "no product ID"."""
    tok, p = await owner_and_product(client)
    data = module(p, 3, product_id=p["platform_id"])
    r = await upload(client, tok, p, 3, data)
    assert r.status_code == 201, r.text
    assert r.json()["module"]["product_id"] is None
    # another product's ID is still a mismatch
    other = module(p, 4, product_id=4243)
    assert_error(await upload(client, tok, p, 4, other), 400, "product_mismatch")
