"""The usage routes (JSON and CSV), notifications, plans, who may see billing, and
``corral billing usage``."""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Any

import pytest
from typer.testing import CliRunner

from corral.cli.main import app as cli_app
from corral.metering import plans
from helpers import assert_error, bearer, new_user
from meteringkit import at, set_plan_terms, team_world, tick
from sessionkit import ScriptedDevice, connect, import_device, live_server

A = "0123456789abcdef0000cc01"
B = "0123456789abcdef0000cc02"
C = "0123456789abcdef0000cc03"


@pytest.fixture
def settings(settings: Any) -> Any:
    return settings.model_copy(update={"event_rate_burst": 100_000,
                                       "event_rate_per_s": 100_000.0})


@pytest.fixture
async def world(client: Any, app: Any, manual_clock: Any) -> dict[str, Any]:
    """Acme with Widget (A: 3 publishes, 1 function call) and Gadget (B: 2 publishes; C
    imported, never online), in March 2026."""
    manual_clock.set(at(2026, 3, 10))
    w = await team_world(client, app)
    ada = w["tokens"]["ada"]
    for device, product in ((A, w["widget"]), (B, w["gadget"]), (C, w["gadget"])):
        await import_device(client, ada, product["id"], device)
    sa = await connect(app, A, ScriptedDevice(functions={"f": lambda a: 7}))
    sb = await connect(app, B, ScriptedDevice())
    for _ in range(3):
        await sa.publish("temp", "21.5")
    await sb.publish("temp", "x")
    await sb.publish("hum", "y")
    await sa.publish("spark/device/diagnostics/update", "{}", system=True)  # not counted
    r = await client.post(f"/v1/devices/{A}/f", headers=bearer(ada), json={"arg": "go"})
    assert r.json()["return_value"] == 7
    manual_clock.set(at(2026, 4, 2))
    await sa.publish("temp", "april")  # another month
    manual_clock.set(at(2026, 3, 20))
    w["sessions"] = [sa, sb]
    yield w
    for s in w["sessions"]:
        await s.close("test over")


def usage_url(w: dict[str, Any], rest: str = "") -> str:
    return f"/v1/orgs/{w['org']['slug']}/usage{rest}"


async def test_org_usage_totals_allowance_and_products(client, world):
    r = await client.get(usage_url(world), headers=bearer(world["tokens"]["ada"]),
                         params={"period": "2026-03"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["period"]["month"] == "2026-03"
    assert body["plan"]["code"] == "free" and body["allowance"] == {
        "data_operations": 100_000, "cellular_mb": 100, "devices": 100, "storage_mb": None}
    u = body["usage"]
    assert (u["data_operations"], u["events_published"], u["function_calls"]) == (6, 5, 1)
    assert u["billable_devices"] == 2  # C never came online
    assert body["percent"]["data_operations"] == 0.01 and body["percent"]["devices"] == 2.0
    by_slug = {p["slug"]: p for p in body["products"]}
    assert by_slug["widget"]["data_operations"] == 4 and by_slug["widget"]["billable_devices"] == 1
    assert by_slug["gadget"]["data_operations"] == 2 and by_slug["gadget"]["billable_devices"] == 1
    assert body["paused"] is False
    r = await client.get(usage_url(world), headers=bearer(world["tokens"]["cy"]),
                         params={"period": "2026-04"})
    assert r.json()["usage"]["data_operations"] == 1


async def test_device_usage_json_and_csv(client, world):
    ada = world["tokens"]["ada"]
    r = await client.get(usage_url(world, "/devices"), headers=bearer(ada),
                         params={"period": "2026-03"})
    rows = {d["device_id"]: d for d in r.json()["devices"]}
    assert set(rows) == {A, B}  # C: no usage and not billable
    assert rows[A]["data_operations"] == 4 and rows[A]["billable"] is True
    r = await client.get(usage_url(world, "/devices"), headers=bearer(ada),
                         params={"period": "2026-03", "format": "csv", "product": "gadget"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [(t["device_id"], t["data_operations"], t["billable"]) for t in table] == [
        (B, "2", "True")]
    # a billable device without usage in the month is listed with zeros
    r = await client.get(usage_url(world, "/devices"), headers=bearer(ada),
                         params={"period": "2026-05"})
    assert {d["device_id"]: d["data_operations"] for d in r.json()["devices"]} == {A: 0, B: 0}
    r = await client.get(usage_url(world, "/products"), headers=bearer(ada),
                         params={"period": "2026-03", "format": "csv"})
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert {t["product_slug"]: t["data_operations"] for t in table} == {"widget": "4",
                                                                        "gadget": "2"}


async def test_bad_input_is_a_clear_400(client, world):
    ada = world["tokens"]["ada"]
    for params in ({"period": "2026-13"}, {"period": "march"}, {"period": "2026-3"},
                   {"period": "9999-12"}, {"period": "0001-01"}, {"period": "2026-00"}):
        assert_error(await client.get(usage_url(world), headers=bearer(ada), params=params),
                     400, "invalid_period")
    assert_error(await client.get(usage_url(world, "/devices"), headers=bearer(ada),
                                  params={"format": "xml"}), 400, "invalid_format")
    assert_error(await client.get(usage_url(world, "/devices"), headers=bearer(ada),
                                  params={"product": "nope"}), 404)


async def test_only_administrators_and_owners_see_billing(client, world):
    for who in ("dev", "sup", "view"):
        for path in (usage_url(world), usage_url(world, "/devices"),
                     f"/v1/orgs/{world['org']['slug']}/notifications"):
            body = assert_error(await client.get(path, headers=bearer(world["tokens"][who])),
                                403, "forbidden")
            assert body["required"] == "orgs.billing:get"
    for who in ("ada", "cy"):
        r = await client.get(usage_url(world), headers=bearer(world["tokens"][who]))
        assert r.status_code == 200
    stranger = await new_user(client, "zed@example.com")
    assert_error(await client.get(usage_url(world), headers=bearer(stranger)), 404)


async def test_notifications_list_and_mark_read(client, app, world):
    await set_plan_terms(app, "free", max_data_ops=8)
    await tick(app)  # 6 of 8 in March: 70 %
    path = f"/v1/orgs/{world['org']['slug']}/notifications"
    cy = bearer(world["tokens"]["cy"])
    [n] = (await client.get(path, headers=cy)).json()["notifications"]
    assert n["kind"] == "usage.threshold" and n["state"] == "unread"
    assert n["details"]["threshold"] == 70 and "70%" in n["title"]
    r = await client.put(f"{path}/{n['id']}", headers=cy, json={})
    assert r.json()["notification"]["state"] == "read"
    assert (await client.get(path, headers=cy, params={"unread": "true"})).json()[
        "notifications"] == []
    assert_error(await client.put(f"{path}/999999", headers=cy, json={}), 404)
    assert_error(await client.put(f"{path}/abc", headers=cy, json={}), 404)
    assert_error(await client.put(f"{path}/99999999999999999999", headers=cy, json={}), 404)
    r = await client.post(f"{path}/read", headers=cy, json={})
    assert r.json() == {"ok": True, "updated": 0}


async def test_plans_are_listed_as_data(client, app):
    tok = await new_user(client, "pat@example.com")
    r = await client.get("/v1/plans", headers=bearer(tok))
    listed = {p["code"]: p for p in r.json()["plans"]}
    assert list(listed) == ["free", "basic", "enterprise"]
    assert listed["basic"]["block"] == {"devices": 100, "data_operations": 720_000,
                                        "cellular_mb": 540, "price_cents": 29_900}
    assert listed["free"]["pause_at_limit"] is True and listed["enterprise"]["period"] == "year"
    await set_plan_terms(app, "basic", block_data_ops=1_000_000)
    r = await client.get("/v1/plans", headers=bearer(tok))
    assert r.json()["plans"][1]["block"]["data_operations"] == 1_000_000


async def test_cli_billing_usage_prints_a_table(app, world, tmp_path):
    async with app.state.sessionmaker() as db:
        await plans.set_org_plan(db, world["org_id"], "basic", blocks=2)
        await db.commit()
    async with live_server(app) as url:
        env = {"CORRAL_API_URL": url, "CORRAL_TOKEN": world["tokens"]["ada"],
               "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path), "COLUMNS": "200"}
        result = await asyncio.to_thread(
            CliRunner().invoke, cli_app,
            ["billing", "usage", "--org", world["org"]["slug"], "--period", "2026-03"], env=env)
        assert result.exit_code == 0, result.output
        out = result.output
        assert "2026-03 on the basic plan (2 blocks)" in out
        assert "data operations" in out and "1,440,000" in out and "widget" in out
        result = await asyncio.to_thread(
            CliRunner().invoke, cli_app, ["billing", "usage", "--org", "nope"], env=env)
        assert result.exit_code == 1 and "not found" in result.output.lower()


def test_csv_cells_never_start_a_formula():
    from corral.metering.reports import csv_cell

    assert [csv_cell(v) for v in ("=SUM(A1)", "+1", "-2", "@x", "widget", None, 5)] == [
        "'=SUM(A1)", "'+1", "'-2", "'@x", "widget", "", 5]
