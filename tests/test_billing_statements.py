"""Monthly statements (billing.statements) with the injected clock: one bill per organization
and month with the month's usage, zero for the months of a prepaid annual term, the charges
due that month, text/CSV renderings, locked organizations, Enterprise terms set by an
operator (the service and ``corral admin enterprise``)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

import test_billing_lifecycle as life
from corral.billing import enterprise, statements
from corral.billing.models import Invoice, Subscription
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict
from corral.metering import plans
from corral.metering.models import UsageCounter
from helpers import add_device, assert_error
from meteringkit import org_product
from test_cli import FAST_HASH, PASSWORD, invoke

mc, org = life.mc, life.org
Org, subscribe, lines_by_kind = life.Org, life.subscribe, life.lines_by_kind
SEAT, BLOCK = life.SEAT, life.BLOCK
UTC = dt.UTC


def at(y: int, m: int, d: int = 1, h: int = 0, mi: int = 10) -> dt.datetime:
    return dt.datetime(y, m, d, h, mi, tzinfo=UTC)


async def all_invoices(o: Org) -> list[dict[str, Any]]:
    r = await o.req("GET", "/invoices", params={"per_page": 100})
    assert r.status_code == 200, r.text
    return list(reversed(r.json()["invoices"]))


async def statements_of(o: Org) -> list[dict[str, Any]]:
    return [i for i in await all_invoices(o) if i["reason"] == "statement"]


async def jump(o: Org, when: dt.datetime) -> None:
    o.mc.set(when)
    await o.tick()


async def usage_world(o: Org) -> dict[str, Any]:
    """Product "Widget" with one device that came online in January 2027 and used data in
    January and February; product "Gadget" with nothing."""
    token = await o.token()
    widget = await org_product(o.client, token, o.slug, "Widget")
    gadget = await org_product(o.client, token, o.slug, "Gadget")
    dev = "aa0000000000000000000001"
    await add_device(o.app, dev, widget["id"], first_online_at=at(2027, 1, 20))
    async with o.app.state.sessionmaker() as db:
        for period, ops, cell in ((dt.date(2027, 1, 1), 1000, 0),
                                  (dt.date(2027, 2, 1), 1234, 2_500_000)):
            db.add(UsageCounter(device_id=dev, period=period, product_id=widget["id"],
                                org_id=o.id, data_operations=ops, data_operations_kb=ops,
                                cellular_bytes=cell, updated_at=at(2027, 2, 1)))
        await db.commit()
    return {"widget": widget, "gadget": gadget, "device": dev}


def usage_line(inv: dict[str, Any], start: str) -> dict[str, Any]:
    [line] = [x for x in inv["lines"] if x["description"].startswith(start)]
    return line


# --- annual term -------------------------------------------------------------------------

async def test_annual_term_gets_a_statement_every_month(org: Org):
    assert (await subscribe(org, interval="year", blocks=1)).status_code == 200
    world = await usage_world(org)
    annual = 12 * (SEAT + BLOCK)

    await jump(org, at(2027, 1, 31, 23, 59))  # January has not closed yet
    assert await statements_of(org) == []
    await jump(org, at(2027, 2, 1))
    [jan] = await statements_of(org)
    assert jan["number"] == f"CRL-{org.id:06d}-M202701"
    assert (jan["period_start"], jan["period_end"]) == ("2027-01-01T00:00:00.000Z",
                                                        "2027-02-01T00:00:00.000Z")
    # the first period's charge was due in January: it is on January's bill
    assert (jan["status"], jan["total_cents"]) == ("paid", annual)
    full = await org.invoice(jan["number"])
    [charge] = lines_by_kind(full)["charge"]
    assert charge["amount_cents"] == annual and "(paid)" in charge["description"]
    assert charge["description"].startswith(f"Invoice CRL-{org.id:06d}-0001: first period")

    await org.walk(366)  # to 2028-02-01: the renewal of 2028-01-15, thirteen statements
    stmts = await statements_of(org)
    assert [s["period_start"][:7] for s in stmts] == [
        f"{y}-{m:02d}" for y, m in [(2027, m) for m in range(1, 13)] + [(2028, 1)]]
    # the eleven months in between are zero-total statements of the prepaid term
    assert [s["total_cents"] for s in stmts] == [annual] + [0] * 11 + [annual]
    assert all(s["status"] == "paid" for s in stmts)
    regular = [i for i in await all_invoices(org) if i["reason"] != "statement"]
    assert [i["reason"] for i in regular] == ["subscribe", "renewal"]

    feb = await org.invoice(stmts[1]["number"])
    kinds = lines_by_kind(feb)
    assert "charge" not in kinds
    name = f"Widget (product {world['widget']['id']})"
    assert usage_line(feb, f"Data operations, {name}")["quantity"] == 1234
    assert usage_line(feb, f"Billable devices, {name}")["quantity"] == 1
    assert usage_line(feb, f"Cellular data, {name}")["description"].endswith(": 2.500 MB")
    gadget = f"Gadget (product {world['gadget']['id']})"
    assert usage_line(feb, f"Data operations, {gadget}")["quantity"] == 0
    totals = {x["description"].split(" this month")[0]: x for x in kinds["usage_total"]}
    assert totals["Data operations"]["description"] == (
        "Data operations this month: 1,234 of 720,000 included (0.2 %)")
    assert totals["Billable devices"]["description"] == (
        "Billable devices this month: 1 of 100 included (1.0 %)")
    assert totals["Cellular data"]["description"] == (
        "Cellular data this month: 2.500 MB of 540 MB included (0.5 %)")
    assert all(x["amount_cents"] == 0 for x in kinds["usage"] + kinds["usage_total"])
    # March: no usage, still one device billable (it came online before)
    mar = await org.invoice(stmts[2]["number"])
    assert usage_line(mar, f"Data operations, {name}")["quantity"] == 0
    assert usage_line(mar, f"Billable devices, {name}")["quantity"] == 1


async def test_exactly_one_statement_per_org_and_month(org: Org):
    assert (await subscribe(org, interval="year", blocks=1)).status_code == 200
    await jump(org, at(2027, 3, 2))  # January and February caught up in one tick
    for _ in range(3):
        await org.tick()
        await org.app.state.runtime.billing.statements(org.mc.now())
    assert [s["number"][-7:] for s in await statements_of(org)] == ["M202701", "M202702"]
    # a second server's tick (a fresh service without the in-memory mark) adds nothing
    other = type(org.app.state.runtime.billing)(org.app.state.sessionmaker,
                                                org.app.state.runtime.settings, org.fake)
    assert await other.statements(org.mc.now()) == 0
    async with org.app.state.sessionmaker() as db:
        sub = (await db.execute(select(Subscription))).scalar_one()
        assert await statements.issue_statement(db, sub, dt.date(2027, 2, 1), org.mc.now()) is None
        # and the database refuses a second row with the month's number
        db.add(Invoice(org_id=org.id, subscription_id=sub.id,
                       number=statements.number(org.id, dt.date(2027, 2, 1)),
                       reason="statement", status="paid", currency="usd", total_cents=0,
                       period_start=at(2027, 2, 1, 0, 0), period_end=at(2027, 3, 1, 0, 0),
                       issued_at=org.mc.now()))
        with pytest.raises(IntegrityError):
            await db.flush()
        await db.rollback()
    assert len(await statements_of(org)) == 2


# --- monthly term ------------------------------------------------------------------------

async def test_monthly_term_statements_carry_the_months_charges(org: Org):
    assert (await subscribe(org, interval="month", blocks=1)).status_code == 200
    await usage_world(org)
    await org.walk(77)  # 2027-01-15 -> 2027-04-02
    stmts = await statements_of(org)
    assert [s["number"][-7:] for s in stmts] == ["M202701", "M202702", "M202703"]
    assert [s["total_cents"] for s in stmts] == [SEAT + BLOCK] * 3
    feb = await org.invoice(stmts[1]["number"])
    [charge] = lines_by_kind(feb)["charge"]
    assert "renewal 2027-02-15 to 2027-03-15 (paid)" in charge["description"]
    assert usage_line(feb, "Data operations this month")["quantity"] == 1234
    # the regular invoices keep their own numbering
    regular = [i["number"] for i in await all_invoices(org) if i["reason"] != "statement"]
    assert regular == [f"CRL-{org.id:06d}-{n:04d}" for n in range(1, 4)]


async def test_statement_text_and_csv(org: Org):
    assert (await subscribe(org, interval="year", blocks=1)).status_code == 200
    await usage_world(org)
    await jump(org, at(2027, 3, 1))
    number = (await statements_of(org))[1]["number"]
    r = await org.req("GET", f"/invoices/{number}", params={"format": "text"})
    assert r.status_code == 200, r.text
    text = r.text
    assert text.startswith(f"Invoice {number} (monthly statement, February 2027)")
    assert "Period: 2027-02-01 to 2027-03-01" in text
    total_at, usage_at = text.index("Total"), text.index("Usage:")
    assert total_at < usage_at and "0.00 USD" in text[total_at:usage_at]
    assert "  Data operations this month: 1,234 of 720,000 included" in text
    r = await org.req("GET", f"/invoices/{number}", params={"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["kind"] for row in rows} == {"usage", "usage_total", "total"}
    assert any(row["description"].startswith("Cellular data, Widget") for row in rows)


# --- locked, and enterprise -------------------------------------------------------------

async def test_a_locked_org_gets_the_statement_of_its_last_month_only(org: Org):
    assert (await subscribe(org, interval="month", blocks=1)).status_code == 200
    org.fake.decline_always = True
    await org.walk(80)  # renewal 02-15 declined, retries, locked 02-24; then to 04-05
    assert (await org.sub())["status"] == "locked"
    stmts = await statements_of(org)
    assert [s["number"][-7:] for s in stmts] == ["M202701", "M202702"]
    feb = await org.invoice(stmts[1]["number"])
    [charge] = lines_by_kind(feb)["charge"]
    assert "(uncollectible)" in charge["description"]
    # a statement collects nothing itself; this month's bill was not settled
    assert feb["status"] == "issued"
    # the statements stay readable while the organization is locked
    assert (await org.req("GET", f"/invoices/{stmts[1]['number']}")).status_code == 200


async def put_enterprise(o: Org, **terms: Any) -> Subscription:
    async with o.app.state.sessionmaker() as db:
        sub = await enterprise.put_on_enterprise(
            db, o.app.state.runtime.settings, org_key=o.slug,
            **({"max_devices": 500, "max_data_ops": 5_000_000, "max_cellular_mb": 10_000}
               | terms), actor_label="admin (test)", now=o.mc.now())
        await db.commit()
        return sub


async def test_enterprise_contract_statements_and_renewal(org: Org):
    await put_enterprise(org, contract_start=dt.date(2027, 1, 1))
    await usage_world(org)
    b = await org.billing()
    assert (b["plan"]["code"], b["plan"]["max_devices"], b["plan"]["contract_start"]) == (
        "enterprise", 500, "2027-01-01")
    sub = b["subscription"]
    assert (sub["status"], sub["plan"], sub["interval"]) == ("active", "enterprise", "year")
    assert (sub["current_period_start"][:10], sub["current_period_end"][:10]) == (
        "2027-01-01", "2028-01-01")
    assert sub["seat_price_cents"] == 0 and b["upcoming"]["estimated_total_cents"] == 0

    await jump(org, at(2027, 3, 1))
    stmts = await statements_of(org)
    assert [(s["number"][-7:], s["total_cents"]) for s in stmts] == [
        ("M202701", 0), ("M202702", 0)]
    feb = await org.invoice(stmts[1]["number"])
    assert usage_line(feb, "Data operations this month")["description"] == (
        "Data operations this month: 1,234; contract year 2027-01 to 2027-12: 2,234 of "
        "5,000,000 included (0.0 %)")

    await jump(org, at(2028, 1, 2))  # the contract year renews at zero; no card needed
    assert (await org.sub())["status"] == "active"
    regular = [i for i in await all_invoices(org) if i["reason"] != "statement"]
    assert [(i["reason"], i["status"], i["total_cents"]) for i in regular] == [
        ("subscribe", "paid", 0), ("renewal", "paid", 0)]
    assert org.fake.charges == []
    assert [s["number"][-2:] for s in await statements_of(org)] == [
        f"{m:02d}" for m in range(1, 13)]

    # running it again updates the terms and keeps the cycle
    await put_enterprise(org, max_devices=800)
    b = await org.billing()
    assert b["plan"]["max_devices"] == 800
    assert b["subscription"]["current_period_start"][:10] == "2028-01-01"
    assert len([i for i in await all_invoices(org) if i["reason"] != "statement"]) == 2


async def test_enterprise_refuses_bad_terms_and_replaces_only_when_asked(org: Org):
    with pytest.raises(BadRequest):
        await put_enterprise(org, max_devices=-1)
    with pytest.raises(BadRequest):
        await put_enterprise(org, contract_start=dt.date(2030, 1, 1))
    with pytest.raises(BadRequest):
        await put_enterprise(org, max_data_ops=None)
    assert (await subscribe(org, interval="month", blocks=1)).status_code == 200
    with pytest.raises(Conflict):
        await put_enterprise(org)
    assert (await org.sub())["plan"] == "basic"
    sub = await put_enterprise(org, replace=True)
    assert (sub.plan_code, sub.status, sub.seat_price_cents) == ("enterprise", "active", 0)
    await org.walk(40)
    assert org.fake.charges[1:] == []  # only the Basic subscribe charge, nothing after
    # the owner still cannot subscribe to Enterprise themselves
    assert_error(await org.req("PUT", "/billing", json={"plan": "enterprise"}), 400,
                 "invalid_plan")
    async with org.app.state.sessionmaker() as db:
        assert (await plans.effective_plan(db, org.id)).plan_code == "enterprise"


def test_admin_enterprise_command(tmp_path: Path):
    from corral.auth.subject import Subject
    from corral.cli.admin import database
    from corral.orgs import service as orgs
    from corral.settings import Settings

    data = ["--data-dir", str(tmp_path / "data")]
    env: dict[str, str | None] = {**FAST_HASH}
    r = invoke(["admin", "create-user", "ent@example.com", "--password", PASSWORD, *data], env)
    assert r.exit_code == 0, r.output

    async def make_org() -> str:  # no admin command creates organizations
        async with database(Settings(data_dir=tmp_path / "data")) as sm, sm() as db:
            from corral.auth.models import User
            user = (await db.execute(select(User))).scalar_one()
            actor = Subject(kind="user", token_id=0, client="test", user_id=user.id,
                            username=user.username)
            o = await orgs.new_org(db, actor=actor, name="Ent Co", ip="127.0.0.1")
            await db.commit()
            return o.slug

    slug = asyncio.run(make_org())
    args = ["admin", "enterprise", slug, "--max-devices", "500", "--max-data-ops",
            "5000000", "--max-cellular-mb", "10000"]
    r = invoke([*args, "--contract-start", "2026-01-01", "--per-kb", "--json", *data], env)
    assert r.exit_code == 0, r.output
    sub = json.loads(r.stdout)["subscription"]
    assert (sub["plan"], sub["interval"], sub["status"]) == ("enterprise", "year", "active")
    now = clock.now()
    assert sub["current_period_start"][:10] == f"{now.year}-01-01"  # the contract year now
    r = invoke([*args, *data], env)
    assert r.exit_code == 0 and "is on Enterprise: 500 devices" in r.output

    r = invoke([*args, "--contract-start", "01/01/2026", *data], env)
    assert r.exit_code == 1 and "YYYY-MM-DD" in r.output
    r = invoke(["admin", "enterprise", "no-such-org", *args[3:], *data], env)
    assert r.exit_code == 1 and "There is no organization" in r.output
    r = invoke(["admin", "enterprise", slug, "--max-devices", "5", *data], env)
    assert r.exit_code == 2  # the maximums are required
