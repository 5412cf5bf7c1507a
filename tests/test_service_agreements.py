"""Particle's billing surface from corral's plans and usage: service agreements (user and
organization), asynchronous usage reports (request, poll, build in the worker, download),
and service-agreement notifications (70/90/100 %, pause, unpause)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from helpers import assert_error, bearer, new_user, seed
from meteringkit import at, give_sim, set_plan_terms, team_world, tick
from sessionkit import ScriptedDevice, connect, import_device

A = "0123456789abcdef0000dd01"
B = "0123456789abcdef0000dd02"
T = "0123456789abcdef0000dd03"
ICCID = "89014103211118510755"


@pytest.fixture
def settings(settings: Any) -> Any:
    return settings.model_copy(update={"event_rate_burst": 100_000,
                                       "event_rate_per_s": 100_000.0,
                                       "token_lifetime_s": 20 * 365 * 86400})


@pytest.fixture
async def world(client: Any, app: Any, manual_clock: Any) -> Any:
    """Acme: Widget with A (Wi-Fi, 3 publishes in March, 1 in April) and B (cellular, 2
    publishes and 2 MB in March); Gadget with T (a tracker, never online)."""
    manual_clock.set(at(2026, 3, 10))
    w = await team_world(client, app)
    ada = w["tokens"]["ada"]
    await import_device(client, ada, w["widget"]["id"], A)
    await seed(app, {"id": B, "product_id": w["widget"]["id"], "platform_id": 13},
               {"id": T, "product_id": w["gadget"]["id"], "platform_id": 26})
    await give_sim(app, B, ICCID)
    sa = await connect(app, A, ScriptedDevice())
    sb = await connect(app, B, ScriptedDevice())
    for _ in range(3):
        await sa.publish("temp", "21.5")
    await sb.publish("temp", "x")
    await sb.publish("hum", "y")
    sb.count_bytes(2_000_000)
    await sb.close("bye")
    manual_clock.set(at(2026, 4, 2))
    await sa.publish("temp", "april")
    await sa.close("bye")
    manual_clock.set(at(2026, 3, 20))
    await tick(app)
    return w


def org_base(w: Any) -> str:
    return f"/v1/orgs/{w['org']['slug']}"


async def test_org_service_agreement_answers_from_plan_and_usage(client, world):
    r = await client.get(f"{org_base(world)}/service_agreements",
                         headers=bearer(world["tokens"]["cy"]))
    assert r.status_code == 200, r.text
    [sa] = r.json()["data"]
    assert sa["id"] == world["org_id"] and sa["type"] == "service_agreement"
    a = sa["attributes"]
    assert a["owner_type"] == "organization" and a["agreement_type"] == "developer"
    assert a["duration"] == "monthly" and a["state"] == "active"
    assert a["current_billing_period_start"] == "2026-03-01"
    assert a["current_billing_period_end"] == "2026-03-31"
    assert a["next_billing_period_start"] == "2026-04-01"
    conn = a["current_usage_summary"]["connectivity"]
    assert conn["all"] == {"owned_devices": 3, "billable_devices": 2,
                           "device_data": 2_000_000, "device_messages": 5}
    assert conn["wifi"] == {"owned_devices": 1, "billable_devices": 1, "device_data": 0,
                            "device_messages": 3}
    assert conn["cellular"] == {"owned_devices": 1, "billable_devices": 1,
                                "device_data": 2_000_000, "device_messages": 2}
    assert conn["asset_tracker"]["owned_devices"] == 1
    assert conn["asset_tracker"]["billable_devices"] == 0
    assert a["current_usage_summary"]["device_limit_reached"] is False
    terms = a["pricing_terms"]
    assert terms["device"]["max_devices"] == 100
    assert terms["messaging"]["max_messages"] == 100_000
    assert terms["device_data"]["max_data"] == 100_000_000
    # billing information: Administrators and Owners only
    r = await client.get(f"{org_base(world)}/service_agreements",
                         headers=bearer(world["tokens"]["dev"]))
    assert r.status_code == 403 and r.json()["ok"] is False


async def test_user_service_agreement_is_the_personal_organizations(client, app):
    tok = await new_user(client, "solo@example.com")
    r = await client.get("/v1/user/service_agreements", headers=bearer(tok))
    assert r.status_code == 200, r.text
    [sa] = r.json()["data"]
    assert sa["attributes"]["owner_type"] == "user"
    assert sa["attributes"]["current_usage_summary"]["connectivity"]["all"][
        "owned_devices"] == 0
    said = sa["id"]
    r = await client.get(f"/v1/user/service_agreements/{said}/notifications",
                         headers=bearer(tok))
    assert r.status_code == 200 and r.json() == {"data": []}
    other = await new_user(client, "other@example.com")
    r = await client.get(f"/v1/user/service_agreements/{said}/notifications",
                         headers=bearer(other))
    assert r.status_code == 404 and r.json()["ok"] is False


async def test_usage_report_requested_built_polled_and_downloaded(client, app, world):
    cy = bearer(world["tokens"]["cy"])
    said = world["org_id"]
    url = f"{org_base(world)}/service_agreements/{said}/usage_reports"
    r = await client.post(url, headers=cy, json={
        "report_type": "devices", "date_period_start": "2026-03-01",
        "date_period_end": "2026-04-30"})
    assert r.status_code == 202, r.text
    report = r.json()["data"]
    assert report["type"] == "usage_report"
    attrs = report["attributes"]
    assert attrs["state"] == "pending" and attrs["download_url"] is None
    assert attrs["service_agreement_id"] == said and attrs["report_type"] == "devices"
    poll = f"{org_base(world)}/usage_reports/{report['id']}"
    r = await client.get(poll, headers=cy)
    assert r.json()["data"]["attributes"]["state"] == "pending"
    assert_error(await client.get(f"{poll}/download", headers=cy), 409, "report_not_ready")
    assert await app.state.runtime.usage_reports.run_due() == 1
    r = await client.get(poll, headers=cy)
    attrs = r.json()["data"]["attributes"]
    assert attrs["state"] == "available"
    assert attrs["download_url"].endswith(f"/usage_reports/{report['id']}/download")
    r = await client.get(f"{poll}/download", headers=cy)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    got = {(x["month"], x["device_id"]): x for x in rows}
    assert got[("2026-03", A)]["data_operations"] == "3"
    assert got[("2026-03", B)]["cellular_bytes"] == "2000000"
    assert got[("2026-04", A)]["data_operations"] == "1"
    # a products report narrowed to one product
    r = await client.post(url, headers=cy, data={
        "report_type": "products", "date_period_start": "2026-03-05",
        "date_period_end": "2026-03-06", "products": world["widget"]["slug"]})
    assert r.status_code == 202, r.text
    rid = r.json()["data"]["id"]
    await app.state.runtime.usage_reports.run_due()
    r = await client.get(f"{org_base(world)}/usage_reports/{rid}/download", headers=cy)
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(x["month"], x["product_slug"], x["data_operations"]) for x in rows] == [
        ("2026-03", world["widget"]["slug"], "5")]
    # another organization's report is not found; neither is a bad id
    zed = await new_user(client, "zed@example.com")
    assert_error(await client.get(f"/v1/user/usage_reports/{rid}", headers=bearer(zed)), 404)
    for bad in ("%C2%B2", "abc", "99999999999999999999"):
        assert_error(await client.get(f"{org_base(world)}/usage_reports/{bad}", headers=cy),
                     404)


@pytest.mark.parametrize(("payload", "code"), [
    ({"report_type": "sims", "date_period_start": "2026-03-01",
      "date_period_end": "2026-03-02"}, "invalid_report_type"),
    ({"report_type": "devices", "date_period_start": "March",
      "date_period_end": "2026-03-02"}, "invalid_date"),
    ({"report_type": "devices", "date_period_start": "2026-03-05",
      "date_period_end": "2026-03-01"}, "invalid_date"),
    ({"report_type": "devices", "date_period_start": "2025-01-01",
      "date_period_end": "2026-03-01"}, "invalid_date"),
    ({"report_type": "devices", "date_period_start": "2026-03-01",
      "date_period_end": "2026-03-02", "devices": ["nope"]}, "invalid_device_id"),
    ({"report_type": "devices", "date_period_start": "2026-03-01",
      "date_period_end": "2026-03-02", "devices": ["ffffffffffffffffffffffff"]},
     "invalid_device_id"),
    ({"report_type": "products", "date_period_start": "2026-03-01",
      "date_period_end": "2026-03-02", "products": ["someone-elses"]}, "invalid_product"),
    ({"date_period_start": "2026-03-01", "date_period_end": "2026-03-02"},
     "invalid_report_type"),
])
async def test_bad_usage_report_requests_are_clear_400s(client, world, payload, code):
    url = f"{org_base(world)}/service_agreements/{world['org_id']}/usage_reports"
    r = await client.post(url, headers=bearer(world["tokens"]["ada"]), json=payload)
    assert_error(r, 400, code)


async def test_usage_report_for_another_agreement_is_not_found(client, world):
    url = f"{org_base(world)}/service_agreements/{world['org_id'] + 1000}/usage_reports"
    r = await client.post(url, headers=bearer(world["tokens"]["ada"]), json={
        "report_type": "devices", "date_period_start": "2026-03-01",
        "date_period_end": "2026-03-02"})
    assert_error(r, 404)


async def test_notifications_at_70_90_100_pause_and_unpause(client, app, world, manual_clock):
    base = f"{org_base(world)}/service_agreements/{world['org_id']}/notifications"
    cy = bearer(world["tokens"]["cy"])
    await set_plan_terms(app, "free", max_data_ops=7)
    await tick(app)  # 5 of 7 in March: 70 %
    await set_plan_terms(app, "free", max_data_ops=5)
    await tick(app)  # 100 %: the free plan pauses
    manual_clock.set(at(2026, 4, 1, 1))
    await tick(app)  # April: a new period, unpaused
    r = await client.get(base, headers=cy)
    assert r.status_code == 200, r.text
    names = [n["attributes"]["event_name"] for n in r.json()["data"]]
    assert names == ["developer:usage_activity:automatic_unpause",
                     "developer:usage_activity:automatic_pause",
                     "developer:usage_activity:90_percent",
                     "developer:usage_activity:70_percent"]
    last = r.json()["data"][-1]
    assert last["type"] == "notification"
    assert last["attributes"]["resource_type"] == "ServiceAgreement"
    assert last["attributes"]["resource_id"] == world["org_id"]
    assert last["attributes"]["details"]["metric"] == "data_operations"
    assert last["attributes"]["time_period"] == "2026-03-01"
    r = await client.get(base, headers=bearer(world["tokens"]["view"]))
    assert r.status_code == 403
