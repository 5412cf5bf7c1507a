"""The console's Billing & usage routes in-process, on both databases: subscribe with a
declined then a good card, change blocks, bad input next to its field, cancel, the period
ending (the injected clock), the Inactive subscription page and re-activating from it, the
usage CSV and an invoice. The browser test (tests/console/test_console_billing.py) drives
the same page in Chromium."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import select

from corral.billing.models import Charge
from corral.console.session import csrf_for_session
from corral.kit import clock
from helpers import add_member, console_session, make_org, new_user

START = dt.datetime(2027, 1, 15, 12, 0, tzinfo=dt.UTC)


class Browser:
    """Console requests with a session cookie and the form's CSRF token."""

    def __init__(self, client: Any, token: str) -> None:
        self.client, self.token = client, token

    async def get(self, path: str) -> Any:
        return await self.client.get(path, headers={"Cookie": f"corral_session={self.token}"})

    async def post(self, path: str, **fields: Any) -> Any:
        return await self.client.post(path, data={"csrf_token": csrf_for_session(self.token),
                                                  **fields},
                                      headers={"Cookie": f"corral_session={self.token}"})


def field_error(html: str, name: str) -> str:
    m = re.search(rf'id="f-{name}-err">([^<]*)<', html)
    return m.group(1) if m else ""


async def test_subscribe_change_cancel_inactive_reactivate(client, app, manual_clock):
    mc = manual_clock
    mc.set(START)
    owner = await new_user(client, "owner@example.com")
    org = await make_org(client, owner, "Acme Inc")
    base = f"/console/orgs/{org['slug']}/billing"
    b = Browser(client, await console_session(app, "owner@example.com"))

    r = await b.get(base)
    assert r.status_code == 200 and "<h1>Billing &amp; usage</h1>" in r.text
    assert "Subscribe" in r.text and 'aria-label="Data operations per day' in r.text

    # a declined card: the message next to the field, the attempt recorded, still on Free
    r = await b.post(base, which="subscribe", plan="basic", interval="month", blocks="1",
                     payment_method="pm_card_chargeDeclined")
    assert r.status_code == 402
    assert "declined" in field_error(r.text, "payment_method")
    async with app.state.sessionmaker() as db:
        assert [c.status for c in (await db.execute(select(Charge))).scalars()] == ["declined"]
    # bad input: the service's own rule, next to the field
    r = await b.post(base, which="subscribe", plan="basic", blocks="-3",
                     payment_method="pm_card_visa")
    assert r.status_code == 400  # the API's rule (BillingChange), next to the field
    assert "greater than or equal to 0" in field_error(r.text, "blocks")
    r = await b.post(base, which="subscribe", plan="basic", interval="month", blocks="1",
                     payment_method="pm_card_visa")
    assert r.status_code == 303 and r.headers["location"] == base
    r = await b.get(base)
    assert "data-subscription-status>active" in r.text and "visa •••• 4242" in r.text
    number = re.search(r'data-invoice="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]

    r = await b.post(base, which="blocks", blocks="3")
    assert r.status_code == 303
    assert "Basic · 3 blocks" in (await b.get(base)).text
    r = await b.post(base, which="blocks", blocks="100001")
    assert r.status_code == 400
    assert "less than or equal to 100000" in field_error(r.text, "blocks")

    # the invoice, its downloads and the usage CSVs
    r = await b.get(f"{base}/invoices/{number}")
    assert r.status_code == 200 and number in r.text and "Payment attempts" in r.text
    r = await b.get(f"{base}/invoices/{number}?format=csv")
    assert r.headers["content-type"].startswith("text/csv")
    assert r.text.splitlines()[0].startswith("invoice,kind,description")
    r = await b.get(f"{base}/usage.csv?kind=products")
    assert r.text.splitlines()[0].startswith("product_id,product_slug,product_name")
    r = await b.get(f"{base}/usage.csv?kind=devices&period=2027-01")
    assert r.text.splitlines()[0].startswith("device_id,product_id,billable")
    r = await b.get(f"{base}/usage.csv?kind=nope")
    assert r.status_code == 400 and "kind must be devices or products" in r.text
    assert (await b.get(f"{base}?period=2027-13")).status_code == 400

    # cancel: access to the end of the period, then the organization is inactive
    r = await b.post(f"{base}/cancel")
    assert r.status_code == 303
    r = await b.get(base)
    assert "data-subscription-status>canceled" in r.text and "Re-activate" in r.text
    r = await b.post(f"{base}/cancel")
    assert r.status_code == 400 and "already canceled" in r.text
    mc.set(dt.datetime(2027, 2, 16, tzinfo=dt.UTC))
    await app.state.runtime.billing.tick(mc.now())

    # an Administrator sees the Inactive subscription page with the re-activate form; a
    # Developer sees it without; nothing else of the organization is shown
    await new_user(client, "dev@example.com")
    await add_member(app, "dev@example.com", org_id=org["id"], role="Developer")
    dev = Browser(client, await console_session(app, "dev@example.com"))
    for path in (f"/console/orgs/{org['slug']}", f"/console/orgs/{org['slug']}/team"):
        r = await dev.get(path)
        assert r.status_code == 402 and "Inactive subscription" in r.text
        assert "/billing/reactivate" not in r.text and "Ask an Owner" in r.text
    for path in (base, f"/console/orgs/{org['slug']}", f"/console/orgs/{org['slug']}/team"):
        r = await b.get(path)
        assert r.status_code == 402 and "<h1>Inactive subscription</h1>" in r.text, path
        assert f'action="{base}/reactivate"' in r.text and "Invoices" not in r.text
    # a bad card: the error on the Inactive page itself
    r = await b.post(f"{base}/reactivate", payment_method="not-a-card")
    assert r.status_code in (400, 402) and "<h1>Inactive subscription</h1>" in r.text
    assert "PaymentMethod" in r.text
    r = await b.post(f"{base}/reactivate", payment_method="pm_card_visa")
    assert r.status_code == 303
    r = await b.get(base)
    assert r.status_code == 200 and "data-subscription-status>active" in r.text
    assert (await b.get(f"/console/orgs/{org['slug']}/team")).status_code == 200


async def test_usage_warning_banner_and_sandbox(client, app):
    """The 70/90/100 % banner reads the same usage the API reports; the sandbox page shows
    usage against the Free plan without a subscribe form."""
    from sqlalchemy import update

    from corral.metering.models import Plan, UsageCounter

    owner = await new_user(client, "owner@example.com")
    org = await make_org(client, owner, "Acme Inc")
    b = Browser(client, await console_session(app, "owner@example.com"))
    month = clock.now().date().replace(day=1)
    async with app.state.sessionmaker() as db:
        await db.execute(update(Plan).where(Plan.code == "free").values(max_data_ops=100))
        db.add(UsageCounter(device_id="0123456789abcdef0000bb01", period=month,
                            org_id=org["id"], data_operations=93, data_operations_kb=93,
                            updated_at=clock.now()))
        await db.commit()
    r = await b.get(f"/console/orgs/{org['slug']}/billing")
    assert 'data-usage-warning="90"' in r.text and "93.0 %" in r.text
    # the organization's overview shows it too, to those who see billing only
    assert 'data-usage-warning="90"' in (await b.get(f"/console/orgs/{org['slug']}")).text
    await new_user(client, "dev@example.com")
    await add_member(app, "dev@example.com", org_id=org["id"], role="Developer")
    dev = Browser(client, await console_session(app, "dev@example.com"))
    r = await dev.get(f"/console/orgs/{org['slug']}")
    assert r.status_code == 200 and "data-usage-warning" not in r.text
    async with app.state.sessionmaker() as db:
        await db.execute(update(UsageCounter).values(data_operations=100))
        await db.commit()
    r = await b.get(f"/console/orgs/{org['slug']}/billing")
    assert 'data-usage-warning="100"' in r.text and "paused" in r.text

    sandbox = next(o for o in (await client.get(
        "/v1/orgs", headers={"Authorization": f"Bearer {owner}"})).json()["organizations"]
        if o.get("personal"))
    r = await b.get(f"/console/orgs/{sandbox['slug']}/billing")
    assert r.status_code == 200 and "stays on the Free plan" in r.text
    assert 'value="subscribe"' not in r.text
