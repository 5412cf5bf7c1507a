"""Subscription lifecycle with the injected clock: months and years of renewals, retries then
the lock, cancel then inactive, both reactivations, and mid-period adjustments."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from corral.billing import subscriptions
from corral.billing.models import Adjustment, Charge, Invoice, Subscription
from corral.billing.providers import FakeProvider
from corral.kit import clock
from corral.mail.models import OutboxMail
from corral.metering.models import Plan
from helpers import add_device, add_member, assert_error, bearer, login, make_org, new_user

START = dt.datetime(2027, 1, 15, 12, 0, tzinfo=dt.UTC)
SEAT = 4900  # settings default: $49 per member per month
BLOCK = 29_900  # the seeded Basic plan's block price


@pytest.fixture
def mc() -> Any:
    c = clock.ManualClock(START)
    previous = clock.install(c)
    yield c
    clock.install(previous)


@dataclass
class Org:
    client: httpx.AsyncClient
    app: Any
    mc: clock.ManualClock
    slug: str
    id: int
    owner: str = "owner@example.com"

    @property
    def fake(self) -> FakeProvider:
        return self.app.state.runtime.payments

    async def token(self) -> str:
        return await login(self.client, self.owner)  # tokens expire over a walked year

    async def req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.client.request(method, f"/v1/orgs/{self.slug}{path}",
                                         headers=bearer(await self.token()), **kw)

    async def billing(self) -> dict[str, Any]:
        r = await self.req("GET", "/billing")
        assert r.status_code == 200, r.text
        return r.json()["billing"]

    async def sub(self) -> dict[str, Any]:
        return (await self.billing())["subscription"]

    async def tick(self) -> None:
        await self.app.state.runtime.billing.tick(self.mc.now())

    async def walk(self, days: int, step_h: int = 24) -> None:
        """Move the clock ``days`` forward, ticking every ``step_h`` hours."""
        for _ in range(days * 24 // step_h):
            self.mc.advance(hours=step_h)
            await self.tick()

    async def invoices(self) -> list[dict[str, Any]]:
        r = await self.req("GET", "/invoices", params={"per_page": 100})
        assert r.status_code == 200, r.text
        # oldest first; the monthly statements (tests/test_billing_statements.py) left out
        return [i for i in reversed(r.json()["invoices"]) if i["reason"] != "statement"]

    async def invoice(self, number: str) -> dict[str, Any]:
        r = await self.req("GET", f"/invoices/{number}")
        assert r.status_code == 200, r.text
        return r.json()["invoice"]

    async def mails(self, kind: str) -> list[OutboxMail]:
        async with self.app.state.sessionmaker() as db:
            return list((await db.execute(select(OutboxMail).where(
                OutboxMail.kind == kind).order_by(OutboxMail.id))).scalars())


@pytest.fixture
async def org(client, app, mc) -> Org:
    token = await new_user(client, "owner@example.com")
    o = await make_org(client, token, "Acme Inc")
    return Org(client, app, mc, o["slug"], o["id"])


async def subscribe(org: Org, **body: Any) -> httpx.Response:
    return await org.req("PUT", "/billing", json={"payment_method": "pm_card_visa", **body})


def lines_by_kind(inv: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in inv["lines"]:
        out.setdefault(line["kind"], []).append(line)
    return out


# --- subscribe and renew -------------------------------------------------------------------

async def test_subscribe_charges_the_first_month_now(org: Org):
    r = await subscribe(org, interval="month", blocks=1)
    assert r.status_code == 200, r.text
    b = r.json()["billing"]
    sub = b["subscription"]
    assert sub["status"] == "active" and sub["plan"] == "basic" and sub["seats"] == 1
    assert sub["current_period_start"] == "2027-01-15T12:00:00.000Z"
    assert sub["current_period_end"] == "2027-02-15T12:00:00.000Z"
    assert sub["payment_method"]["label"] == "visa •••• 4242"
    assert b["plan"]["code"] == "basic" and b["plan"]["blocks"] == 1

    [inv] = await org.invoices()
    assert (inv["reason"], inv["status"], inv["total_cents"]) == ("subscribe", "paid", SEAT + BLOCK)
    full = await org.invoice(inv["number"])
    kinds = lines_by_kind(full)
    assert kinds["members"][0]["quantity"] == 1 and kinds["members"][0]["amount_cents"] == SEAT
    assert kinds["blocks"][0]["amount_cents"] == BLOCK
    assert kinds["plan"][0]["amount_cents"] == 0
    assert [p["status"] for p in full["payments"]] == ["succeeded"]
    assert [c.amount_cents for c in org.fake.succeeded] == [SEAT + BLOCK]


async def test_a_year_of_monthly_renewals(org: Org):
    assert (await subscribe(org, blocks=2)).status_code == 200
    await org.walk(365)
    invs = await org.invoices()
    assert len(invs) == 13  # the first month, then one renewal at each of 12 period starts
    assert all(i["status"] == "paid" and i["total_cents"] == SEAT + 2 * BLOCK for i in invs)
    starts = [i["period_start"][:10] for i in invs]
    assert starts[:3] == ["2027-01-15", "2027-02-15", "2027-03-15"]
    assert starts[-1] == "2028-01-15"
    # each renewal is charged at the start of the period it pays for
    assert all(i["issued_at"][:10] == i["period_start"][:10] for i in invs)
    assert len(org.fake.succeeded) == 13
    assert (await org.sub())["current_period_end"] == "2028-02-15T12:00:00.000Z"


async def test_month_ends_are_clamped_and_keep_the_anchor(client, app):
    mc = clock.ManualClock(dt.datetime(2027, 1, 31, 9, tzinfo=dt.UTC))
    previous = clock.install(mc)
    try:
        token = await new_user(client, "owner@example.com")
        o = await make_org(client, token)
        org = Org(client, app, mc, o["slug"], o["id"])
        assert (await subscribe(org)).status_code == 200
        await org.walk(70)
        ends = [i["period_end"][:10] for i in await org.invoices()]
        assert ends == ["2027-02-28", "2027-03-31", "2027-04-30"]
    finally:
        clock.install(previous)


async def test_annual_plan_charges_twelve_months_once_a_year(org: Org):
    await new_user(org.client, "dev@example.com")
    await add_member(org.app, "dev@example.com", org_id=org.id, role="Developer")
    assert (await subscribe(org, interval="year", blocks=1)).status_code == 200
    await org.walk(732, step_h=72)  # to Jan 16, 2029
    invs = await org.invoices()
    # $49 per member per month, paid annually: 2 members = $1,176 plus 12 months of a block
    assert [i["total_cents"] for i in invs] == [12 * (2 * SEAT + BLOCK)] * 3
    assert [i["period_start"][:10] for i in invs] == ["2027-01-15", "2028-01-15", "2029-01-15"]


async def test_interval_switch_applies_from_the_next_renewal(org: Org):
    assert (await subscribe(org, interval="month")).status_code == 200
    r = await org.req("PUT", "/billing", json={"interval": "year"})
    assert r.status_code == 200, r.text
    sub = r.json()["billing"]["subscription"]
    assert (sub["interval"], sub["next_interval"]) == ("month", "year")
    assert r.json()["billing"]["pending_adjustments"] == []
    await org.walk(32)
    sub = await org.sub()
    assert (sub["interval"], sub["next_interval"]) == ("year", None)
    assert sub["current_period_start"][:10] == "2027-02-15"
    assert sub["current_period_end"][:10] == "2028-02-15"
    assert [i["total_cents"] for i in await org.invoices()] == [SEAT + BLOCK,
                                                                  12 * (SEAT + BLOCK)]


# --- mid-period adjustments ---------------------------------------------------------------

async def test_members_added_and_removed_mid_period_are_prorated_on_the_next_invoice(org: Org):
    org.mc.set(dt.datetime(2027, 3, 1, tzinfo=dt.UTC))  # a 31-day month from here
    assert (await subscribe(org, blocks=1)).status_code == 200
    for name in ("a", "b"):
        await new_user(org.client, f"{name}@example.com")
    org.mc.set(dt.datetime(2027, 3, 16, 12, tzinfo=dt.UTC))  # half of the period is left
    await add_member(org.app, "a@example.com", org_id=org.id, role="Developer")
    await add_member(org.app, "b@example.com", org_id=org.id, role="View-only")
    await org.tick()
    b = await org.billing()
    assert b["subscription"]["seats"] == 3
    [adj] = b["pending_adjustments"]
    assert adj["amount_cents"] == 2 * SEAT // 2  # two members for half the period

    # one leaves a quarter before the end: a credit for the rest of the period
    org.mc.set(dt.datetime(2027, 3, 24, 6, tzinfo=dt.UTC))
    async with org.app.state.sessionmaker() as db:
        from corral.auth.models import Membership, User

        uid = (await db.execute(select(User.id).where(User.username == "b@example.com"))
               ).scalar_one()
        m = (await db.execute(select(Membership).where(
            Membership.user_id == uid, Membership.org_id == org.id))).scalar_one()
        await db.delete(m)
        await db.commit()
    await org.tick()
    adjs = (await org.billing())["pending_adjustments"]
    assert [a["amount_cents"] for a in adjs] == [SEAT, -round(SEAT / 4)]

    await org.walk(9)  # past Apr 1: the renewal takes the adjustments up
    invs = await org.invoices()
    assert len(invs) == 2
    renewal = await org.invoice(invs[1]["number"])
    kinds = lines_by_kind(renewal)
    assert kinds["members"][0]["quantity"] == 2
    assert [a["amount_cents"] for a in kinds["adjustment"]] == [SEAT, -round(SEAT / 4)]
    assert renewal["total_cents"] == 2 * SEAT + BLOCK + SEAT - round(SEAT / 4)
    assert (await org.billing())["pending_adjustments"] == []


async def test_blocks_and_plan_switches_are_prorated(org: Org):
    async with org.app.state.sessionmaker() as db:  # an operator's extra self-service plan
        db.add(Plan(code="plus", name="Plus", period="month", max_devices=0, max_data_ops=0,
                    max_cellular_mb=0, max_storage_mb=None, block_devices=200,
                    block_data_ops=1_000_000, block_cellular_mb=1000, block_price_cents=50_000,
                    min_blocks=1, pause_at_limit=False, per_kb=False, self_service=True,
                    position=5))
        await db.commit()
    org.app.state.settings.billing_seat_price_cents = {"default": SEAT, "plus": 9900}
    org.mc.set(dt.datetime(2027, 4, 1, tzinfo=dt.UTC))  # 30 days
    assert (await subscribe(org, blocks=1)).status_code == 200
    org.mc.set(dt.datetime(2027, 4, 21, tzinfo=dt.UTC))  # a third left
    r = await org.req("PUT", "/billing", json={"blocks": 4})
    assert r.status_code == 200, r.text
    b = r.json()["billing"]
    assert b["plan"]["blocks"] == 4 and b["subscription"]["blocks"] == 4
    assert [a["amount_cents"] for a in b["pending_adjustments"]] == [3 * BLOCK // 3]

    org.mc.set(dt.datetime(2027, 4, 26, tzinfo=dt.UTC))  # a sixth left
    r = await org.req("PUT", "/billing", json={"plan": "plus", "blocks": 1})
    assert r.status_code == 200, r.text
    b = r.json()["billing"]
    assert b["plan"]["code"] == "plus" and b["subscription"]["seat_price_cents"] == 9900
    before, after = SEAT + 4 * BLOCK, 9900 + 50_000
    assert b["pending_adjustments"][1]["amount_cents"] == round((after - before) / 6)

    await org.walk(6)
    renewal = (await org.invoices())[-1]
    assert renewal["total_cents"] == after + BLOCK + round((after - before) / 6)


async def test_net_credit_is_carried_forward(org: Org):
    org.mc.set(dt.datetime(2027, 4, 1, tzinfo=dt.UTC))
    assert (await subscribe(org, blocks=10)).status_code == 200
    org.mc.set(dt.datetime(2027, 4, 2, tzinfo=dt.UTC))
    assert (await org.req("PUT", "/billing", json={"blocks": 1})).status_code == 200
    credit = round(-9 * BLOCK * 29 / 30)
    await org.walk(30)
    invs = await org.invoices()
    renewal = await org.invoice(invs[1]["number"])
    assert renewal["total_cents"] == 0 and renewal["status"] == "paid"
    carried = lines_by_kind(renewal)["credit_carried"][0]["amount_cents"]
    assert carried == -(SEAT + BLOCK + credit)
    assert len(org.fake.succeeded) == 1  # nothing charged for a zero invoice
    [adj] = (await org.billing())["pending_adjustments"]
    assert adj["amount_cents"] == SEAT + BLOCK + credit


# --- failed payments, retries, the lock, reactivation ------------------------------------

async def test_retries_then_lock_then_reactivate_with_a_new_card(org: Org):
    product = (await org.client.post(f"/v1/orgs/{org.slug}/products",
                                     headers=bearer(await org.token()),
                                     json={"product": {"name": "Sensors", "platform_id": 12}}
                                     )).json()["product"]
    assert (await subscribe(org, pause_devices_when_locked=True)).status_code == 200
    org.fake.decline_always = True
    await org.walk(31)  # Feb 15: the renewal is declined
    sub = await org.sub()
    assert sub["status"] == "past_due" and sub["retry_count"] == 0
    assert sub["next_retry_at"][:10] == "2027-02-18"
    assert len(await org.mails("billing.payment_failed")) == 1
    # access continues while payments are retried
    assert (await org.req("GET", "/team")).status_code == 200

    await org.walk(3)
    assert (await org.sub())["retry_count"] == 1
    await org.walk(3)
    assert (await org.sub())["retry_count"] == 2
    assert len(await org.mails("billing.payment_failed")) == 3
    assert (await org.sub())["status"] == "past_due"
    await org.walk(3)  # the third retry fails: locked
    sub = await org.sub()
    assert sub["status"] == "locked" and sub["locked_at"][:10] == "2027-02-24"
    failed = await org.mails("billing.payment_failed")
    locked = await org.mails("billing.locked")
    assert len(failed) == 3 and len(locked) == 1
    assert {m.to_addr for m in failed + locked} == {"owner@example.com"}
    assert "try again on 2027-02-18" in failed[0].body and "retry 2 of 3" in failed[2].body
    assert "locked" in locked[0].subject and "Acme Inc" in locked[0].subject
    async with org.app.state.sessionmaker() as db:
        n = (await db.execute(select(func.count(Charge.id)).where(
            Charge.org_id == org.id, Charge.status == "declined"))).scalar_one()
    assert n == 4  # the first attempt and three retries

    # the organization is locked: its routes answer 402, billing still works
    body = assert_error(await org.req("GET", "/team"), 402, "subscription_inactive")
    assert body["subscription_status"] == "locked"
    assert_error(await org.client.get(f"/v1/products/{product['slug']}/devices",
                                      headers=bearer(await org.token())),
                 402, "subscription_inactive")
    assert (await org.req("GET", "")).status_code == 200  # the org itself, for the console
    invs = await org.invoices()
    assert invs[-1]["status"] == "uncollectible"
    # data kept; devices pause because the subscription says so
    async with org.app.state.sessionmaker() as db:
        assert await subscriptions.paused_orgs(db) == {org.id: "subscription_locked"}
    gate = org.app.state.runtime.gate  # the usage gate asks billing at each refresh
    await org.app.state.runtime.metering.tick(org.mc.now())
    assert gate.paused(org.id) == "subscription_locked"
    await org.walk(40)  # nothing more is attempted while locked
    assert len(await org.invoices()) == len(invs)

    # reactivate: a declining card answers 402 and stays locked
    r = await org.req("POST", "/billing/reactivate")
    assert_error(r, 402, "payment_declined")
    assert (await org.sub())["status"] == "locked"
    org.fake.reset()
    when = org.mc.now()
    r = await org.req("POST", "/billing/reactivate", json={"payment_method": "pm_card_mastercard"})
    assert r.status_code == 200, r.text
    sub = r.json()["billing"]["subscription"]
    assert sub["status"] == "active" and sub["retry_count"] == 0
    assert sub["current_period_start"] == clock.iso(when)  # a new cycle from today
    last = (await org.invoices())[-1]
    assert (last["reason"], last["status"]) == ("reactivation", "paid")
    assert (await org.req("GET", "/team")).status_code == 200
    async with org.app.state.sessionmaker() as db:
        assert await subscriptions.paused_orgs(db) == {}
    await org.app.state.runtime.metering.tick(org.mc.now())
    assert gate.paused(org.id) is None


async def test_adjustments_of_an_uncollected_invoice_are_charged_at_reactivation(org: Org):
    org.mc.set(dt.datetime(2027, 3, 1, tzinfo=dt.UTC))
    assert (await subscribe(org)).status_code == 200
    await new_user(org.client, "a@example.com")
    org.mc.set(dt.datetime(2027, 3, 16, 12, tzinfo=dt.UTC))
    await add_member(org.app, "a@example.com", org_id=org.id, role="Developer")
    await org.tick()
    org.fake.decline_always = True
    await org.walk(26)  # Apr 1 renewal declined, then three retries: locked on Apr 10
    assert (await org.sub())["status"] == "locked"
    assert [a["amount_cents"] for a in (await org.billing())["pending_adjustments"]] == [SEAT // 2]
    org.fake.reset()
    r = await org.req("POST", "/billing/reactivate")
    assert r.status_code == 200, r.text
    inv = await org.invoice((await org.invoices())[-1]["number"])
    assert inv["reason"] == "reactivation"
    assert inv["total_cents"] == 2 * SEAT + BLOCK + SEAT // 2
    assert (await org.billing())["pending_adjustments"] == []


async def test_a_retry_that_succeeds_ends_past_due(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.fake.decline_next(2)  # the renewal and the first retry
    await org.walk(37)
    sub = await org.sub()
    assert sub["status"] == "active" and sub["retry_count"] == 0
    assert len(await org.mails("billing.payment_failed")) == 2
    assert len(await org.mails("billing.payment_succeeded")) == 1
    assert (await org.invoices())[-1]["status"] == "paid"


async def test_new_card_while_past_due_is_tried_at_the_next_tick(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.fake.decline_next(1)
    await org.walk(31)
    assert (await org.sub())["status"] == "past_due"
    r = await org.req("PUT", "/billing", json={"payment_method": "pm_card_amex"})
    assert r.status_code == 200
    await org.tick()
    assert (await org.sub())["status"] == "active"


async def test_provider_outage_is_not_a_failed_attempt(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.fake.fail_next(1)
    await org.walk(31)
    sub = await org.sub()
    assert sub["status"] == "past_due" and sub["retry_count"] == 0
    assert await org.mails("billing.payment_failed") == []
    await org.walk(1, step_h=2)
    assert (await org.sub())["status"] == "active"
    # asked again with the same idempotency key
    keys = [c.idempotency_key for c in org.fake.charges]
    assert len(keys) == 2 and keys[1].endswith("-0002-1")


async def test_pay_now_while_past_due(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.fake.decline_next(1)
    await org.walk(31)
    r = await org.req("POST", "/billing/reactivate")
    assert r.status_code == 200, r.text
    assert r.json()["billing"]["subscription"]["status"] == "active"


# --- cancel and the two reactivations ------------------------------------------------------

async def test_cancel_keeps_access_to_period_end_then_inactive_then_reactivate(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.mc.set(dt.datetime(2027, 2, 1, tzinfo=dt.UTC))
    r = await org.req("POST", "/billing/cancel")
    assert r.status_code == 200, r.text
    sub = r.json()["billing"]["subscription"]
    assert sub["status"] == "canceled" and sub["cancel_at_period_end"] is True
    assert_error(await org.req("POST", "/billing/cancel"), 409, "already_canceled")
    await org.walk(14)  # Feb 15, 00:00: still in the paid period
    assert (await org.req("GET", "/team")).status_code == 200
    await org.walk(1)  # Feb 16: the period ended at Feb 15 12:00
    sub = await org.sub()
    assert sub["status"] == "inactive"
    assert_error(await org.req("GET", "/team"), 402, "subscription_inactive")
    assert len(await org.invoices()) == 1  # nothing charged after cancelling
    assert len(await org.mails("billing.inactive")) == 1
    # the plan's allowances stay, so the devices keep working (they pause only when the
    # subscription's pause_devices_when_locked says so)
    assert (await org.billing())["plan"]["code"] == "basic"
    async with org.app.state.sessionmaker() as db:
        assert await subscriptions.paused_orgs(db) == {}

    org.mc.set(dt.datetime(2027, 3, 3, 8, tzinfo=dt.UTC))
    r = await org.req("POST", "/billing/reactivate")
    assert r.status_code == 200, r.text
    sub = r.json()["billing"]["subscription"]
    assert sub["status"] == "active"
    assert (sub["current_period_start"], sub["current_period_end"]) == (
        "2027-03-03T08:00:00.000Z", "2027-04-03T08:00:00.000Z")
    assert (await org.invoices())[-1]["reason"] == "reactivation"
    assert (await org.billing())["plan"]["code"] == "basic"  # re-enrolled in its plan
    assert (await org.req("GET", "/team")).status_code == 200


async def test_reactivate_within_the_period_keeps_the_cycle(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.mc.set(dt.datetime(2027, 2, 1, tzinfo=dt.UTC))
    assert (await org.req("POST", "/billing/cancel")).status_code == 200
    org.mc.set(dt.datetime(2027, 2, 10, tzinfo=dt.UTC))
    r = await org.req("POST", "/billing/reactivate")
    assert r.status_code == 200, r.text
    sub = r.json()["billing"]["subscription"]
    assert sub["status"] == "active" and sub["cancel_at_period_end"] is False
    assert sub["current_period_end"] == "2027-02-15T12:00:00.000Z"
    assert len(org.fake.charges) == 1  # not charged now
    assert_error(await org.req("POST", "/billing/reactivate"), 409, "already_active")
    await org.walk(6)
    invs = await org.invoices()
    assert [i["period_start"][:10] for i in invs] == ["2027-01-15", "2027-02-15"]


async def test_cancel_while_past_due_ends_now(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.fake.decline_always = True
    await org.walk(31)
    assert (await org.req("POST", "/billing/cancel")).status_code == 200
    assert (await org.sub())["status"] == "inactive"
    assert (await org.invoices())[-1]["status"] == "uncollectible"
    await org.walk(10)
    assert await org.mails("billing.locked") == []


# --- subscribing: declines and bad input ---------------------------------------------------

async def test_declined_first_charge_leaves_the_org_on_free(org: Org):
    r = await org.req("PUT", "/billing", json={"payment_method": "pm_card_chargeDeclined"})
    body = assert_error(r, 402, "payment_declined")
    assert body["decline_code"] == "generic_decline"
    b = await org.billing()
    assert b["plan"]["code"] == "free" and b["subscription"]["status"] == "incomplete"
    assert (await org.req("GET", "/team")).status_code == 200  # not locked
    assert (await org.invoices())[0]["status"] == "void"
    # subscribing again with a good card works
    r = await subscribe(org)
    assert r.status_code == 200, r.text
    assert r.json()["billing"]["subscription"]["status"] == "active"
    async with org.app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count(Subscription.id)))).scalar_one() == 1
    await org.tick()  # an incomplete subscription's void invoice is never retried
    assert len(org.fake.charges) == 2


@pytest.mark.parametrize(("body", "status", "code"), [
    ({}, 400, "payment_method_required"),
    ({"payment_method": "pm_card_visa", "interval": "week"}, 400, "invalid_interval"),
    ({"payment_method": "pm_card_visa", "blocks": "many"}, 400, "invalid_plan"),
    ({"payment_method": "pm_card_visa", "blocks": 0}, 400, "invalid_plan"),
    ({"payment_method": "pm_card_visa", "blocks": -1}, 400, "invalid_plan"),
    ({"payment_method": "pm_card_visa", "blocks": True}, 400, "invalid_plan"),
    ({"payment_method": "pm_card_visa", "plan": "enterprise"}, 400, "invalid_plan"),
    ({"payment_method": "pm_card_visa", "plan": "free"}, 400, "invalid_plan"),
    ({"payment_method": "pm_card_visa", "plan": "gold"}, 404, "unknown_plan"),
    ({"payment_method": "pm_card_visa", "plan": 7}, 400, "invalid_plan"),
    ({"payment_method": "4242 4242 4242 4242"}, 402, "payment_method_invalid"),
    ({"payment_method": ["pm_card_visa"]}, 400, "invalid_payment_method"),
    ({"payment_method": "pm_card_visa", "pause_devices_when_locked": "maybe"}, 400, None),
    ({"payment_method": "pm_card_visa", "seats": 3}, 400, "invalid_request"),
])
async def test_subscribe_bad_input(org: Org, body, status, code):
    assert_error(await org.req("PUT", "/billing", json=body), status, code)
    b = await org.billing()
    assert b["plan"]["code"] == "free"
    assert b["subscription"] is None or b["subscription"]["status"] == "incomplete"
    assert org.fake.succeeded == []


async def test_personal_org_cannot_subscribe(client, app, mc):
    token = await new_user(client, "ada@example.com")
    orgs = (await client.get("/v1/orgs", headers=bearer(token))).json()["organizations"]
    personal = next(o for o in orgs if o["personal"])
    r = await client.put(f"/v1/orgs/{personal['slug']}/billing", headers=bearer(token),
                         json={"payment_method": "pm_card_visa"})
    assert_error(r, 400, "personal_org")


async def test_changes_need_an_active_subscription(org: Org):
    assert_error(await org.req("POST", "/billing/cancel"), 409, "no_subscription")
    assert_error(await org.req("POST", "/billing/reactivate"), 409, "no_subscription")
    assert (await subscribe(org)).status_code == 200
    assert_error(await org.req("PUT", "/billing", json={"blocks": "x"}), 400, "invalid_plan")
    assert (await org.req("POST", "/billing/cancel")).status_code == 200
    assert_error(await org.req("PUT", "/billing", json={"blocks": 3}), 409,
                 "subscription_not_active")


# --- who sees billing; invoices ----------------------------------------------------------

@pytest.mark.parametrize("role", ["Developer", "Support", "View-only"])
async def test_only_owners_and_administrators_see_billing(org: Org, role: str):
    assert (await subscribe(org)).status_code == 200
    token = await new_user(org.client, "member@example.com")
    await add_member(org.app, "member@example.com", org_id=org.id, role=role)
    number = (await org.invoices())[0]["number"]
    for method, path in [("GET", "/billing"), ("PUT", "/billing"), ("POST", "/billing/cancel"),
                         ("POST", "/billing/reactivate"), ("GET", "/invoices"),
                         ("GET", f"/invoices/{number}")]:
        r = await org.client.request(method, f"/v1/orgs/{org.slug}{path}", json={},
                                     headers=bearer(token))
        assert_error(r, 403, "forbidden")
    admin = await new_user(org.client, "admin@example.com")
    await add_member(org.app, "admin@example.com", org_id=org.id, role="Administrator")
    r = await org.client.get(f"/v1/orgs/{org.slug}/invoices/{number}", headers=bearer(admin))
    assert r.status_code == 200


async def test_invoice_renderings_and_tenancy(org: Org):
    assert (await subscribe(org, blocks=2)).status_code == 200
    inv = (await org.invoices())[0]
    r = await org.req("GET", f"/invoices/{inv['id']}", params={"format": "text"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert f"Invoice {inv['number']}" in r.text and "Acme Inc" in r.text
    assert "647.00 USD" in r.text  # 49 + 2 x 299
    r = await org.req("GET", f"/invoices/{inv['number'].lower()}", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = r.text.strip().splitlines()
    assert rows[0].startswith("invoice,kind,description")
    assert rows[-1].endswith(f"total,Total,,,{SEAT + 2 * BLOCK},usd")
    assert_error(await org.req("GET", f"/invoices/{inv['id']}", params={"format": "pdf"}), 400)
    assert_error(await org.req("GET", "/invoices/99999"), 404)
    assert_error(await org.req("GET", "/invoices", params={"per_page": 0}), 400)

    other = await new_user(org.client, "eve@example.com")
    eve_org = await make_org(org.client, other, "Eve Corp")
    r = await org.client.get(f"/v1/orgs/{eve_org['slug']}/invoices/{inv['id']}",
                             headers=bearer(other))
    assert_error(r, 404)
    r = await org.client.get(f"/v1/orgs/{org.slug}/invoices", headers=bearer(other))
    assert_error(r, 404)


async def test_locked_org_product_device_routes_and_api_users(org: Org, client):
    product = (await client.post(f"/v1/orgs/{org.slug}/products",
                                 headers=bearer(await org.token()),
                                 json={"product": {"name": "Sensors", "platform_id": 12}}
                                 )).json()["product"]
    await add_device(org.app, "0123456789abcdef01234567", product["id"])
    r = await client.post(f"/v1/products/{product['slug']}/team", headers=bearer(await org.token()),
                          json={"friendly_name": "bot", "scopes": ["devices:list"]})
    assert r.status_code == 200, r.text
    bot = r.json()["created"]["tokens"][0]["token"]
    assert (await subscribe(org)).status_code == 200
    org.fake.decline_always = True
    await org.walk(31 + 9)
    assert (await org.sub())["status"] == "locked"
    assert_error(await client.get("/v1/devices/0123456789abcdef01234567",
                                  headers=bearer(await org.token())), 402, "subscription_inactive")
    assert_error(await client.get(f"/v1/products/{product['slug']}/devices",
                                  headers=bearer(bot)), 402, "subscription_inactive")
    # the owner's other organizations are not affected
    assert (await client.get("/v1/orgs", headers=bearer(await org.token()))).status_code == 200


async def test_tick_is_idempotent_and_catches_up(org: Org):
    assert (await subscribe(org)).status_code == 200
    org.mc.set(dt.datetime(2027, 5, 20, tzinfo=dt.UTC))  # four periods passed unnoticed
    await org.tick()
    await org.tick()
    invs = await org.invoices()
    assert [i["period_start"][:10] for i in invs] == [
        "2027-01-15", "2027-02-15", "2027-03-15", "2027-04-15", "2027-05-15"]
    async with org.app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count(Adjustment.id)))).scalar_one() == 0
        assert (await db.execute(select(func.count(Invoice.id)).where(
            Invoice.reason != "statement"))).scalar_one() == 5


class Crash(BaseException):
    """The process dies (not an Exception: nothing in billing catches it)."""


async def test_a_crash_after_charging_is_booked_once_with_the_same_key(org: Org):
    assert (await subscribe(org)).status_code == 200
    fake = org.fake
    real_charge = fake.charge

    async def charge_then_die(**kw):
        await real_charge(**kw)  # the provider took the money...
        raise Crash  # ...and the answer never reached the database

    fake.charge = charge_then_die  # type: ignore[method-assign]
    org.mc.set(dt.datetime(2027, 2, 15, 13, tzinfo=dt.UTC))
    with pytest.raises(Crash):
        await org.tick()
    async with org.app.state.sessionmaker() as db:
        pending = (await db.execute(select(Charge).where(Charge.status == "pending"))
                   ).scalars().all()
    assert len(pending) == 1
    fake.charge = real_charge  # type: ignore[method-assign]
    await org.tick()  # after the restart: asked again with the same key
    sub = await org.sub()
    assert sub["status"] == "active"
    invs = await org.invoices()
    assert [i["status"] for i in invs] == ["paid", "paid"]
    assert len(fake.succeeded) == 2  # the first month and one renewal, not two
    full = await org.invoice(invs[1]["number"])
    assert [p["status"] for p in full["payments"]] == ["succeeded"]


async def test_form_encoded_bodies_work_like_curl(org: Org):
    r = await org.req("PUT", "/billing", data={"payment_method": "pm_card_visa",
                                                "interval": "year", "blocks": "2",
                                                "pause_devices_when_locked": "true"})
    assert r.status_code == 200, r.text
    sub = r.json()["billing"]["subscription"]
    assert (sub["interval"], sub["blocks"], sub["pause_devices_when_locked"]) == ("year", 2, True)
    r = await org.req("POST", "/billing/reactivate", data={"payment_method": "pm_card_visa"})
    assert_error(r, 409, "already_active")
