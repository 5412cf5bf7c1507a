"""``corral fleet health`` over real HTTP (the live server of test_cli)."""

from __future__ import annotations

import json
from pathlib import Path

import test_cli
from test_cli import Cli, login
from test_cli_devices import new_product

# test_cli's fixtures (pytest finds them by name): a live server, the CLI pointed at it
live_server, config_home, cli, user = (test_cli.live_server, test_cli.config_home,
                                       test_cli.cli, test_cli.user)


def test_fleet_health_prints_a_products_health(cli: Cli, user: str, tmp_path: Path) -> None:
    login(cli, user)
    slug = new_product(cli, "Fleet Watch")
    ids = tmp_path / "ids.txt"
    ids.write_text("0123456789abcdef0123fe01\n")
    r = cli("devices", "import", str(ids), "--product", slug)
    assert r.exit_code == 0, r.output
    r = cli("fleet", "health", "--product", slug, "--json")
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)
    assert h["devices"] == {"total": 1, "online": 0, "online_max": 0}
    assert h["firmware"] == [{"version": None, "devices": 1, "online": 0}]
    r = cli("fleet", "health", "--product", slug)
    assert r.exit_code == 0 and "Fleet health" in r.stdout and "Firmware" in r.stdout, r.output
    r = cli("fleet", "health", "--product", slug, "--start", "yesterday")
    assert r.exit_code == 1 and "ISO8601" in r.output
