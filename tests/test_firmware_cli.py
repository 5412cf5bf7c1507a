"""``corral firmware upload|list|release`` and ``corral rollout status`` over real HTTP
(the live server of test_cli)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

import test_cli
from corral.firmware.module import build_module
from test_cli import Cli, login
from test_cli_devices import new_product, token_of

live_server, config_home, cli, user = (test_cli.live_server, test_cli.config_home,
                                       test_cli.cli, test_cli.user)


def test_upload_list_release_and_rollout_status(cli: Cli, user: str, live_server: str,
                                                config_home: Path, tmp_path: Path) -> None:
    login(cli, user)
    slug = new_product(cli, "Firmware CLI")
    auth = {"Authorization": f"Bearer {token_of(config_home)}"}
    product = httpx.get(f"{live_server}/v1/products/{slug}", headers=auth, timeout=10).json()
    pid = product["product"]["id"]
    path = tmp_path / "app.bin"
    path.write_bytes(build_module(b"\x42" * 300_000, platform_id=product["product"]["platform_id"],
                                  product_id=pid, product_version=1))

    r = cli("firmware", "upload", str(path), "--product", slug, "--version", "1",
            "--title", "first", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["size"] == path.stat().st_size
    assert "Uploading" in r.stderr  # the progress bar
    r = cli("firmware", "upload", str(path), "--product", slug, "--version", "1")
    assert r.exit_code == 1 and "greater than every earlier version" in r.output

    r = cli("firmware", "list", "--product", slug)
    assert r.exit_code == 0 and "first" in r.stdout, r.output

    r = cli("firmware", "release", "--product", slug, "--version", "1", "--default",
            "--percent", "50", "--dry-run")
    assert r.exit_code == 0 and "Dry run" in r.stdout and "without --dry-run" in r.stdout
    # the README's order (a dry run, then the status) explains itself instead of a 404
    r = cli("rollout", "status", "--product", slug, "--watch", "--times", "1")
    assert r.exit_code == 1 and "no rollout yet" in r.output and "--dry-run" in r.output
    r = cli("firmware", "release", "--product", slug, "--version", "1", "--default",
            "--percent", "50", "--failure-threshold", "10")
    assert r.exit_code == 0 and "Released version 1" in r.stdout, r.output

    rollouts = httpx.get(f"{live_server}/v1/products/{slug}/rollouts", headers=auth,
                         timeout=10).json()["rollouts"]
    rid = str(rollouts[0]["id"])
    assert f"Rollout {rid} started" in r.stdout
    assert f"corral rollout status {rid} --product {slug} --watch" in r.stdout
    r = cli("rollout", "status", "--product", slug, "--watch", "--interval", "0.2",
            "--times", "1")  # no id: the newest
    assert r.exit_code == 0 and f"Rollout {rid} of version" in r.stdout, r.output
    r = cli("rollout", "status", rid, "--product", slug)
    assert r.exit_code == 0, r.output
    assert "50 %" in r.stdout and "targeted" in r.stdout
    r = cli("rollout", "status", rid, "--product", slug, "--watch", "--interval", "0.2",
            "--times", "2")
    assert r.exit_code == 0 and "eligible" in r.stdout, r.output
    r = cli("rollout", "status", "999", "--product", slug)
    assert r.exit_code == 1 and "Rollout not found" in r.output
