"""``corral billing status`` and ``corral billing invoices`` over real HTTP (test_cli's
live server, whose payment provider is the shipped fake)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

import test_cli
from test_cli import Cli, login

live_server, config_home, cli, user = (test_cli.live_server, test_cli.config_home,
                                       test_cli.cli, test_cli.user)


def _token(config_home: Path) -> str:
    return json.loads((config_home / "corral" / "config.json").read_text())["token"]


def test_status_and_invoices(cli: Cli, user: str, live_server: str, config_home: Path) -> None:
    login(cli, user)
    r = cli("orgs", "create", "Billing CLI Co", "--json")
    assert r.exit_code == 0, r.output
    slug = json.loads(r.stdout)["organization"]["slug"]

    r = cli("billing", "status", "--org", slug)
    assert r.exit_code == 0, r.output
    assert "free" in r.output and "no subscription" in r.output

    put = httpx.put(f"{live_server}/v1/orgs/{slug}/billing", timeout=10,
                    headers={"Authorization": f"Bearer {_token(config_home)}"},
                    json={"payment_method": "pm_card_visa", "interval": "year", "blocks": 1})
    assert put.status_code == 200, put.text

    r = cli("billing", "status", "--org", slug)
    assert r.exit_code == 0, r.output
    assert "active" in r.output and "year" in r.output and "visa •••• 4242" in r.output
    r = cli("billing", "status", "--org", slug, "--json")
    assert json.loads(r.stdout)["billing"]["subscription"]["seats"] == 1
    # whoami and orgs list show the subscribed organization's plan and status (were blank)
    for command in (["whoami"], ["orgs", "list"]):
        r = cli(*command)
        assert r.exit_code == 0, r.output
        [row] = [line for line in r.output.splitlines() if slug in line]
        assert "basic (active)" in row, r.output
        assert "none" in r.output  # the personal organization has no subscription
    r = cli("orgs", "list", "--json")
    subs = {o["slug"]: o["subscription"] for o in json.loads(r.stdout)["organizations"]}
    assert subs[slug] == {"plan": "basic", "status": "active"}

    r = cli("billing", "invoices", "--org", slug, "--json")
    assert r.exit_code == 0, r.output
    [inv] = json.loads(r.stdout)["invoices"]
    assert inv["total_cents"] == 12 * (4900 + 29_900)
    r = cli("billing", "invoices", "--org", slug)
    assert r.exit_code == 0 and inv["number"] in r.output and "4,176.00 USD" in r.output
    r = cli("billing", "invoices", "--org", slug, inv["number"])
    assert r.exit_code == 0 and "Team members" in r.output and "Total" in r.output
    r = cli("billing", "invoices", "--org", slug, inv["number"], "--text")
    assert r.exit_code == 0 and r.output.startswith(f"Invoice {inv['number']}")

    r = cli("billing", "invoices", "--org", slug, "99999")
    assert r.exit_code == 1 and "Invoice not found" in r.output
