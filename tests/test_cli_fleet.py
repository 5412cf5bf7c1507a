"""``corral fleet health`` over real HTTP (the live server of test_cli)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

import test_cli
from test_cli import Cli, login
from test_cli_devices import new_product, token_of

# test_cli's fixtures (pytest finds them by name): a live server, the CLI pointed at it
live_server, config_home, cli, user = (test_cli.live_server, test_cli.config_home,
                                       test_cli.cli, test_cli.user)


def product_of(cli: Cli, user: str, tmp_path: Path, name: str, *devices: str) -> str:
    """A new product of the signed-in ``user`` with ``devices`` imported: its slug."""
    login(cli, user)
    slug = new_product(cli, name)
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{d}\n" for d in devices))
    r = cli("devices", "import", str(ids), "--product", slug)
    assert r.exit_code == 0, r.output
    return slug


def test_fleet_health_prints_a_products_health(cli: Cli, user: str, tmp_path: Path) -> None:
    slug = product_of(cli, user, tmp_path, "Fleet Watch", "0123456789abcdef0123fe01")
    r = cli("fleet", "health", "--product", slug, "--json")
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)
    assert h["devices"] == {"total": 1, "online": 0, "online_max": 0, "as_of": None}
    assert h["top"] == {"disconnects": [], "errors": [], "approximate": False}
    assert h["firmware"] == [{"version": None, "devices": 1, "online": 0}]
    assert h["data_operations"] == 0 and h["functions"]["timeout"] == 0
    r = cli("fleet", "health", "--product", slug)
    assert r.exit_code == 0 and "Fleet health" in r.stdout and "Firmware" in r.stdout, r.output
    assert "timed out" in r.stdout, r.output
    r = cli("fleet", "health", "--product", slug, "--bucket", "10")
    assert r.exit_code != 0, r.output
    r = cli("fleet", "health", "--product", slug, "--start", "yesterday")
    assert r.exit_code == 1 and "ISO8601" in r.output


def test_fleet_health_filtered_by_group_and_device_os(cli: Cli, user: str, tmp_path: Path,
                                                      live_server: str,
                                                      config_home: Path) -> None:
    """``--group`` and ``--device-os`` reach the API: a group's devices only; an unknown
    group and a group with a Device OS version are refused with the API's reason."""
    slug = product_of(cli, user, tmp_path, "Fleet Groups", "0123456789abcdef0123fe11",
                      "0123456789abcdef0123fe12", "0123456789abcdef0123fe13")
    r = httpx.put(f"{live_server}/v1/products/{slug}/devices/0123456789abcdef0123fe12",
                  headers={"Authorization": f"Bearer {token_of(config_home)}"},
                  json={"groups": ["beta"]}, timeout=10)
    assert r.status_code == 200, r.text
    r = cli("fleet", "health", "--product", slug, "--group", "beta", "--json")
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)
    assert h["devices"]["total"] == 1 and h["filter"]["device_group_id"] is not None
    r = cli("fleet", "health", "--product", slug, "--group", "beta")
    assert r.exit_code == 0 and "(group beta)" in r.stdout, r.output
    r = cli("fleet", "health", "--product", slug, "--device-os", "6.2.0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["devices"]["total"] == 0  # imported devices never reported one
    r = cli("fleet", "health", "--product", slug, "--group", "nope")
    assert r.exit_code == 1 and "Group nope not found" in r.output, r.output
    r = cli("fleet", "health", "--product", slug, "--group", "beta", "--device-os", "6.2.0")
    assert r.exit_code == 1 and "cannot be combined" in r.output, r.output


def test_fleet_health_of_an_organization(cli: Cli, user: str, tmp_path: Path,
                                         live_server: str, config_home: Path) -> None:
    """``--org`` prints each product of the organization and the sum; the filters reach
    the API (``--group``: each product's group of that name)."""
    slug = product_of(cli, user, tmp_path, "Fleet Org", "0123456789abcdef0123fe21",
                      "0123456789abcdef0123fe22")
    auth = {"Authorization": f"Bearer {token_of(config_home)}"}
    r = httpx.put(f"{live_server}/v1/products/{slug}/devices/0123456789abcdef0123fe22",
                  headers=auth, json={"groups": ["beta"]}, timeout=10)
    assert r.status_code == 200, r.text
    org = httpx.get(f"{live_server}/v1/products/{slug}", headers=auth,
                    timeout=10).json()["product"]["org_id"]
    r = cli("fleet", "health", "--org", str(org), "--json")
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)
    row = next(p for p in h["products"] if p["slug"] == slug)
    assert row["devices"] == 2
    r = cli("fleet", "health", "--org", str(org), "--group", "beta", "--json")
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)
    assert [(p["slug"], p["devices"]) for p in h["products"]] == [(slug, 1)]
    assert h["total"]["devices"] == 1
    r = cli("fleet", "health", "--org", str(org), "--group", "beta")
    assert r.exit_code == 0 and "(group beta)" in r.stdout and "total" in r.stdout, r.output
    r = cli("fleet", "health", "--org", str(org), "--product", slug)
    assert r.exit_code != 0 and "one of them" in r.output, r.output
