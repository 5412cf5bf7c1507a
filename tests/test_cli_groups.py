"""``corral groups``: a dynamic group created with --query, listed with its query, previewed,
and a bad query's positioned error, over real HTTP (the live server of test_cli)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

import test_cli
from test_cli import Cli
from test_cli_devices import product_with_devices, token_of

live_server, config_home, cli, user = (test_cli.live_server, test_cli.config_home,
                                       test_cli.cli, test_cli.user)


def test_create_list_preview_delete(cli: Cli, user: str, live_server: str, config_home: Path,
                                    tmp_path: Path) -> None:
    product, ids = product_with_devices(cli, user, tmp_path, "Grouped", 3)
    headers = {"Authorization": f"Bearer {token_of(config_home)}"}
    r = httpx.put(f"{live_server}/v1/products/{product}/devices", headers=headers, timeout=10,
                  json={"action": "tags", "devices": ids[:2], "metadata": {"add": ["eu"]}})
    assert r.status_code == 200, r.text

    r = cli("groups", "create", "europe", "--product", product, "--query", "tag = eu")
    assert r.exit_code == 0, r.output
    assert "tag = eu" in r.stdout and "True" in r.stdout
    r = cli("groups", "create", "plain", "--product", product)
    assert r.exit_code == 0, r.output
    r = cli("groups", "list", "--product", product)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if "europe" in line)
    assert "dynamic" in row and "tag = eu" in row and " 2 " in row, row
    assert "static" in next(line for line in r.stdout.splitlines() if "plain" in line)
    r = cli("groups", "list", "--product", product, "--json")
    assert {g["name"]: g["query"] for g in json.loads(r.stdout)["groups"]} == {
        "europe": "tag = eu", "plain": None}

    r = cli("groups", "preview", "not tag = eu", "--product", product, "--json")
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert body["device_count"] == 1 and [d["id"] for d in body["devices"]] == [ids[2]]
    r = cli("groups", "preview", "tag = eu", "--product", product)
    assert r.exit_code == 0 and "2 device(s) match" in r.stdout and ids[0] in r.stdout

    r = cli("groups", "create", "bad", "--product", product, "--query", "tag < 3")
    assert r.exit_code == 1
    assert "tag does not take < " in r.output and "line 1, column 5" in r.output, r.output
    r = cli("devices", "list", "--product", product, "--group", "europe", "--json")
    assert sorted(d["id"] for d in json.loads(r.stdout)["devices"]) == sorted(ids[:2])
    r = cli("groups", "delete", "europe", "--product", product)
    assert r.exit_code == 0 and "deleted" in r.stdout
