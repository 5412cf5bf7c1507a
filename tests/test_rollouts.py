"""Phased rollouts over /v1 and the per-device update state the delivery engine moves:
start with a release, grow, pause/resume/abort, progress, the automatic pause on failures,
plan_update for a connecting device, and the update state machine."""

from __future__ import annotations

from typing import Any

import pytest

from corral.firmware import updates
from corral.firmware.resolver import bucket
from corral.kit.errors import Conflict
from helpers import add_devices, assert_error, audit_actions, bearer, load, owner_and_product
from test_firmware_api import release, upload

IDS = [f"{i:024x}" for i in range(0x100, 0x100 + 40)]


async def fw_id(client: Any, tok: str, p: dict[str, Any], version: int) -> int:
    r = await client.get(f"/v1/products/{p['id']}/firmware/{version}", headers=bearer(tok))
    return int(r.json()["id"])


async def targets(client: Any, tok: str, p: dict[str, Any]) -> dict[str, Any]:
    body = (await client.get(f"/v1/products/{p['id']}/devices?per_page=100",
                             headers=bearer(tok))).json()
    return {d["id"]: d["targeted_firmware_release_version"] for d in body["devices"]}


async def rollout_of(client: Any, tok: str, p: dict[str, Any], rid: int) -> dict[str, Any]:
    r = await client.get(f"/v1/products/{p['id']}/rollouts/{rid}", headers=bearer(tok))
    assert r.status_code == 200, r.text
    return r.json()["rollout"]


async def fleet(client: Any, app: Any) -> tuple[str, dict[str, Any]]:
    """40 devices running 1; version 1 is the default, version 2 is uploaded."""
    tok, p = await owner_and_product(client)
    for v in (1, 2):
        assert (await upload(client, tok, p, v)).status_code == 201
    await add_devices(app, p["id"], *IDS, firmware_version=1)
    assert (await release(client, tok, p, version=1, product_default=True)).status_code == 200
    return tok, p


async def test_percentage_rollout_grows_sticky_and_shows_progress(client, app):
    tok, p = await fleet(client, app)
    r = await release(client, tok, p, version=2, product_default=True,
                      rollout={"percent": 25, "failure_threshold_percent": 50})
    assert r.status_code == 200, r.text
    fid = await fw_id(client, tok, p, 2)
    expect25 = {i for i in IDS if bucket(fid, i) < 2500}
    t = await targets(client, tok, p)
    assert {i for i, v in t.items() if v == 2} == expect25
    assert all(v == 1 for i, v in t.items() if i not in expect25)  # the old default stays

    listed = (await client.get(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok))).json()
    rid = listed["rollouts"][0]["id"]
    ro = await rollout_of(client, tok, p, rid)
    assert ro["percent"] == 25 and ro["state"] == "active" and ro["version"] == 2
    assert ro["progress"]["targeted"] == len(expect25) and ro["progress"]["eligible"] == 40
    assert ro["progress"]["pending"] == len(expect25) and ro["progress"]["updated"] == 0
    assert ro["progress"]["pending_by_version"] == [{"version": 1, "total": len(expect25)}]

    r = await client.put(f"/v1/products/{p['id']}/rollouts/{rid}", headers=bearer(tok),
                         json={"percent": 60})
    assert r.status_code == 200, r.text
    t60 = {i for i, v in (await targets(client, tok, p)).items() if v == 2}
    assert expect25 <= t60 and t60 == {i for i in IDS if bucket(fid, i) < 6000}
    assert_error(await client.put(f"/v1/products/{p['id']}/rollouts/{rid}", headers=bearer(tok),
                                  json={"percent": 10}), 400, "rollout_shrink")
    assert_error(await client.put(f"/v1/products/{p['id']}/rollouts/{rid}", headers=bearer(tok),
                                  json={"count": 10}), 400)
    assert_error(await client.put(f"/v1/products/{p['id']}/rollouts/{rid}", headers=bearer(tok),
                                  json={"percent": 101}), 400)
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok),
                                   json={"version": 2, "percent": 5}), 409, "rollout_exists")


async def test_count_rollout_pause_resume_abort(client, app):
    tok, p = await fleet(client, app)
    r = await release(client, tok, p, version=2, product_default=True, rollout={"count": 5})
    assert r.status_code == 200, r.text
    rid = (await client.get(f"/v1/products/{p['id']}/rollouts",
                            headers=bearer(tok))).json()["rollouts"][0]["id"]
    first = {i for i, v in (await targets(client, tok, p)).items() if v == 2}
    assert len(first) == 5
    await client.put(f"/v1/products/{p['id']}/rollouts/{rid}", headers=bearer(tok),
                     json={"count": 12})
    second = {i for i, v in (await targets(client, tok, p)).items() if v == 2}
    assert len(second) == 12 and first <= second

    some = sorted(first)[0]
    async with app.state.sessionmaker() as db:
        assert (await updates.plan_update(db, app.state.settings, some)) is not None
    r = await client.post(f"/v1/products/{p['id']}/rollouts/{rid}/pause", headers=bearer(tok),
                          json={"reason": "looking at crash reports"})
    assert r.status_code == 200 and r.json()["rollout"]["state"] == "paused"
    assert r.json()["rollout"]["state_reason"] == "looking at crash reports"
    async with app.state.sessionmaker() as db:
        assert (await updates.plan_update(db, app.state.settings, some)) is None  # held
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts/{rid}/pause",
                                   headers=bearer(tok)), 409, "invalid_transition")
    r = await client.post(f"/v1/products/{p['id']}/rollouts/{rid}/resume", headers=bearer(tok))
    assert r.json()["rollout"]["state"] == "active" and r.json()["rollout"]["state_reason"] is None

    # one device got it; abort keeps that one on 2 and sends everyone else back to the rules
    async with app.state.sessionmaker() as db:
        plan = await updates.plan_update(db, app.state.settings, some)
        assert plan is not None and plan.rollout_id == rid
        u = await updates.begin_update(db, device_id=some, product_id=p["id"],
                                       fw=await _fw(db, plan.firmware_id), trigger="release",
                                       rollout_id=rid, from_version=1)
        await updates.mark_sending(db, u.id, transport="mqtt")
        await updates.mark_applied(db, u.id)
        await db.commit()
    r = await client.post(f"/v1/products/{p['id']}/rollouts/{rid}/abort", headers=bearer(tok))
    assert r.json()["rollout"]["state"] == "aborted" and r.json()["rollout"]["finished_at"]
    t = await targets(client, tok, p)
    assert {i for i, v in t.items() if v == 2} == {some}
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts/{rid}/resume",
                                   headers=bearer(tok)), 409)
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts/{rid}/explode",
                                   headers=bearer(tok)), 400)
    assert [e.action for e in await audit_actions(app, "rollout.")] == [
        "rollout.started", "rollout.changed", "rollout.paused", "rollout.active",
        "rollout.aborted"]


async def _fw(db: Any, firmware_id: int) -> Any:
    from corral.firmware.models import ProductFirmware

    return await db.get(ProductFirmware, firmware_id)


async def test_failures_over_the_threshold_pause_the_rollout(client, app):
    tok, p = await fleet(client, app)
    r = await release(client, tok, p, version=2, product_default=True,
                      rollout={"percent": 100, "failure_threshold_percent": 20,
                               "failure_min_attempts": 5})
    assert r.status_code == 200, r.text
    rid = (await client.get(f"/v1/products/{p['id']}/rollouts",
                            headers=bearer(tok))).json()["rollouts"][0]["id"]
    outcomes = ["ok", "fail", "ok", "ok", "fail"]
    async with app.state.sessionmaker() as db:
        for did, outcome in zip(IDS, outcomes, strict=False):
            plan = await updates.plan_update(db, app.state.settings, did)
            assert plan is not None
            u = await updates.begin_update(db, device_id=did, product_id=p["id"],
                                           fw=await _fw(db, plan.firmware_id), trigger="release",
                                           rollout_id=plan.rollout_id, from_version=1)
            await updates.mark_sending(db, u.id)
            if outcome == "ok":
                await updates.mark_applied(db, u.id)
            else:
                await updates.mark_failed(db, u.id, "image rejected: bad CRC")
            await db.commit()
            paused = (await rollout_of(client, tok, p, rid))["state"] == "paused"
            # 1 of 4 (25 %) is over 20 % but below the 5 attempts needed to judge
            assert paused == (did == IDS[4]), did
        # paused: the next device is held, not sent anything
        assert await updates.plan_update(db, app.state.settings, IDS[5]) is None
        await db.commit()
    ro = await rollout_of(client, tok, p, rid)
    assert ro["state"] == "paused"
    assert ro["state_reason"] == ("Paused automatically: 2 of 5 finished updates failed "
                                  "(40.0 % > 20 % threshold)")
    assert ro["progress"]["updated"] == 3 and ro["progress"]["failed"] == 2
    assert ro["progress"]["pending"] == 35
    assert ro["progress"]["updates"]["failed"] == 2 and ro["progress"]["failure_rate"] == 0.4
    r = await client.get(f"/v1/products/{p['id']}/firmware/2/adoption", headers=bearer(tok))
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["device_count"] == 3 and a["updates"]["applied"] == 3 and a["success_rate"] == 0.6
    assert a["failure_reasons"] == [{"reason": "image rejected: bad CRC", "count": 2}]
    assert a["timeline"][0]["cumulative_applied"] == 3
    assert (await load(app, IDS[0])).firmware_version == 2
    # the automatic pause is in the organization's audit log too (it had no org_id)
    r = await client.get(f"/v1/orgs/{p['org_id']}/audit", headers=bearer(tok),
                         params={"action": "rollout.paused"})
    assert r.status_code == 200, r.text
    [entry] = r.json()["entries"]
    assert entry["actor"] == "corral" and entry["details"]["reason"] == ro["state_reason"]


async def test_update_state_machine(client, app):
    tok, p = await fleet(client, app)
    async with app.state.sessionmaker() as db:
        fw2 = await _fw(db, await fw_id(client, tok, p, 2))
        fw1 = await _fw(db, await fw_id(client, tok, p, 1))
        u = await updates.begin_update(db, device_id=IDS[0], product_id=p["id"], fw=fw2,
                                       trigger="flash", rollout_id=None, from_version=1)
        assert u.state == "pending" and u.attempts == 0
        again = await updates.begin_update(db, device_id=IDS[0], product_id=p["id"], fw=fw2,
                                           trigger="release", rollout_id=None, from_version=1)
        assert again.id == u.id and again.trigger == "flash"
        await updates.mark_sending(db, u.id, transport="particle")
        await updates.record_progress(db, u.id, 512)
        await updates.mark_deferred(db, u.id, "updates disabled on the device")
        assert (await updates.open_update(db, IDS[0])).id == u.id
        await updates.mark_sending(db, u.id, bytes_sent=512)  # resume
        assert u.attempts == 2 and u.bytes_sent == 512 and u.reason is None
        await updates.mark_failed(db, u.id, "reconnected with the old version")
        assert u.state == "failed" and u.finished_at is not None
        with pytest.raises(Conflict):
            await updates.mark_applied(db, u.id)
        with pytest.raises(Conflict):
            await updates.record_progress(db, u.id, 1024)
        assert await updates.open_update(db, IDS[0]) is None
        # a new update to another version supersedes an open one
        a = await updates.begin_update(db, device_id=IDS[1], product_id=p["id"], fw=fw2,
                                       trigger="release", rollout_id=None, from_version=1)
        b = await updates.begin_update(db, device_id=IDS[1], product_id=p["id"], fw=fw1,
                                       trigger="flash", rollout_id=None, from_version=1)
        assert a.state == "cancelled" and b.state == "pending"
        await db.commit()
        rows = await updates.device_updates(db, IDS[0])
        assert updates.update_json(rows[0])["state"] == "failed"


async def test_plan_update_follows_the_rules(client, app):
    tok, p = await fleet(client, app)
    async with app.state.sessionmaker() as db:
        assert await updates.plan_update(db, app.state.settings, IDS[0]) is None  # runs 1
    await release(client, tok, p, version=2, product_default=True)
    async with app.state.sessionmaker() as db:
        plan = await updates.plan_update(db, app.state.settings, IDS[0])
        assert plan is not None and plan.version == 2 and plan.source == "default"
        assert plan.path.is_file() and plan.path.stat().st_size == plan.size
        assert await updates.plan_update(db, app.state.settings, "f" * 24) is None
    r = await client.put(f"/v1/products/{p['id']}/devices/{IDS[0]}", headers=bearer(tok),
                         json={"development": True})
    assert r.status_code == 200
    async with app.state.sessionmaker() as db:
        assert await updates.plan_update(db, app.state.settings, IDS[0]) is None


async def test_rollout_api_validation_and_tenancy(client, app):
    tok, p = await fleet(client, app)
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok),
                                   json={"version": 2, "percent": 5}), 400,
                 "firmware_not_released")
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok),
                                   json={"version": 1}), 400)
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok),
                                   json={"version": 1, "percent": 5, "count": 3}), 400)
    assert_error(await client.post(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok),
                                   json={"version": 1, "percent": "lots"}), 400)
    r = await client.post(f"/v1/products/{p['id']}/rollouts", headers=bearer(tok),
                          json={"version": 1, "percent": 50})
    assert r.status_code == 201, r.text
    rid = r.json()["rollout"]["id"]
    assert_error(await client.get(f"/v1/products/{p['id']}/rollouts/999999",
                                  headers=bearer(tok)), 404, "rollout_not_found")
    bob, q = await owner_and_product(client, "bob@example.com")
    assert_error(await client.get(f"/v1/products/{q['id']}/rollouts/{rid}",
                                  headers=bearer(bob)), 404, "rollout_not_found")
    assert_error(await client.get(f"/v1/products/{p['id']}/rollouts/{rid}",
                                  headers=bearer(bob)), 404)
