"""``corral devices``: import, list and get over real HTTP (the live server of test_cli)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import httpx

import test_cli
from test_cli import Cli, login

# test_cli's fixtures (pytest finds them by name): a live server, the CLI pointed at it
live_server, config_home, cli, user = (test_cli.live_server, test_cli.config_home,
                                       test_cli.cli, test_cli.user)

SUMMARY_ROW = re.compile(r"│ (updated|existing|invalid|nonmember|protected)\s+│ ([\d,]+)\s+│")


def device_ids(n: int, salt: str) -> list[str]:
    return [hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:24] for i in range(n)]


def summary(output: str) -> dict[str, int]:
    """The counts of the import summary table."""
    return {k: int(v.replace(",", "")) for k, v in SUMMARY_ROW.findall(output)}


def new_product(cli: Cli, name: str) -> str:
    r = cli("products", "create", name, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["product"]["slug"]


def token_of(config_home: Path) -> str:
    return json.loads((config_home / "corral" / "config.json").read_text())["token"]


def api_get(live_server: str, config_home: Path, path: str, **params: Any) -> Any:
    r = httpx.get(f"{live_server}{path}", params=params, timeout=10,
                  headers={"Authorization": f"Bearer {token_of(config_home)}"})
    assert r.status_code == 200, r.text
    return r.json()


def import_requests(live_server: str, config_home: Path, product: str) -> int:
    """How many import requests the server handled for ``product`` (one audit entry each)."""
    body = api_get(live_server, config_home, f"/v1/products/{product}/audit",
                   action="devices.imported", per_page=500)
    return len(body["entries"])


def test_import_a_file_with_crlf_blanks_and_invalid_ids(
        cli: Cli, user: str, live_server: str, config_home: Path, tmp_path: Path) -> None:
    login(cli, user)
    product = new_product(cli, "Sensors")
    a, b, c = device_ids(3, "crlf")
    junk = [f"junk-{i}" for i in range(24)]
    path = tmp_path / "ids.txt"
    path.write_bytes(f"{a}\r\n\r\n  {b.upper()}  \r\n{a}\r\n\r\n{c}\r\n".encode()
                     + "\n".join(["not-a-device-id", *junk]).encode())

    r = cli("devices", "import", str(path), "--product", product)
    assert r.exit_code == 0, r.output
    assert summary(r.stdout) == {"updated": 3, "existing": 0, "invalid": 25, "nonmember": 0,
                                 "protected": 0}
    # the first 20 invalid entries are listed, then how many more there are
    assert "Invalid (25):" in r.stdout
    assert "  not-a-device-id\n" in r.stdout and "  junk-18\n" in r.stdout
    assert "junk-19" not in r.stdout and "... and 5 more" in r.stdout
    assert "Traceback" not in r.output

    body = api_get(live_server, config_home, f"/v1/products/{product}/devices")
    assert sorted(d["id"] for d in body["devices"]) == sorted([a, b, c])

    # again, from standard input, as JSON: nothing new, the three are existing now
    r = cli("devices", "import", "-", "--product", product, "--json",
            input=path.read_text())
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert (result["updated"], sorted(result["existingDeviceIds"])) == (0, sorted([a, b, c]))
    assert result["invalidDeviceIds"][:2] == ["not-a-device-id", "junk-0"]
    assert import_requests(live_server, config_home, product) == 2


def test_import_in_chunks_merges_the_results(cli: Cli, user: str, live_server: str,
                                            config_home: Path, tmp_path: Path) -> None:
    login(cli, user)
    product = new_product(cli, "Chunked")
    ids = device_ids(7, "chunks")
    path = tmp_path / "ids.txt"
    path.write_text("\n".join([*ids[:4], "nope", *ids[4:]]) + "\n")

    r = cli("devices", "import", str(path), "--product", product, "--json",
            "--chunk-size", "3")
    assert r.exit_code == 0, r.output
    merged = json.loads(r.stdout)
    assert merged["updated"] == 7
    assert merged["updatedDeviceIds"] == ids  # in file order across the requests
    assert merged["invalidDeviceIds"] == ["nope"]
    assert import_requests(live_server, config_home, product) == 3  # 8 lines / 3 per request

    r = cli("devices", "import", str(path), "--product", product, "--chunk-size", "5")
    assert r.exit_code == 0, r.output
    assert summary(r.stdout) == {"updated": 0, "existing": 7, "invalid": 1, "nonmember": 0,
                                 "protected": 0}
    assert import_requests(live_server, config_home, product) == 5


def test_a_failed_request_says_what_was_imported_before(
        cli: Cli, user: str, live_server: str, config_home: Path, tmp_path: Path) -> None:
    login(cli, user)
    product = new_product(cli, "Partial")
    good = device_ids(1100, "partial")
    path = tmp_path / "ids.txt"
    # the second request is all junk, which the server refuses as a whole
    path.write_text("\n".join(good + [f"junk{i}" for i in range(1100)]))

    r = cli("devices", "import", str(path), "--product", product, "--chunk-size", "1100")
    assert r.exit_code == 1
    assert "Request 2 of 2 failed" in r.output and "are not device IDs" in r.output
    assert "(HTTP 400)" in r.output and "The 1,100 IDs of request 1 were imported" in r.output
    assert "Traceback" not in r.output
    body = api_get(live_server, config_home, f"/v1/products/{product}/devices", per_page=1)
    assert body["meta"]["total"] == 1100


def test_force_moves_a_device_from_another_product(cli: Cli, user: str,
                                                   tmp_path: Path) -> None:
    login(cli, user)
    first, second = new_product(cli, "First"), new_product(cli, "Second")
    (did,) = device_ids(1, "force")
    path = tmp_path / "one.txt"
    path.write_text(did + "\n")
    assert cli("devices", "import", str(path), "--product", first).exit_code == 0

    r = cli("devices", "import", str(path), "--product", second)
    assert r.exit_code == 0, r.output
    assert summary(r.stdout)["protected"] == 1
    assert "Protected (1):" in r.stdout and did in r.stdout

    r = cli("devices", "import", str(path), "--product", second, "--force", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["updatedDeviceIds"] == [did]


def product_with_devices(cli: Cli, user: str, tmp_path: Path, name: str,
                         n: int) -> tuple[str, list[str]]:
    """Log in, create product ``name`` and import ``n`` new device IDs into it."""
    login(cli, user)
    product = new_product(cli, name)
    ids = device_ids(n, name.lower())
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(ids))
    assert cli("devices", "import", str(path), "--product", product).exit_code == 0
    return product, ids


def test_list_and_get(cli: Cli, user: str, live_server: str, config_home: Path,
                      tmp_path: Path) -> None:
    product, ids = product_with_devices(cli, user, tmp_path, "Listed", 3)
    headers = {"Authorization": f"Bearer {token_of(config_home)}"}
    for n, did in enumerate(ids, start=1):
        body: dict[str, Any] = {"name": f"unit-{n}", "groups": ["north" if n < 3 else "south"]}
        if n == 1:
            body["development"] = True
        r = httpx.put(f"{live_server}/v1/products/{product}/devices/{did}", json=body,
                      headers=headers, timeout=10)
        assert r.status_code == 200, r.text

    r = cli("devices", "list", "--product", product)
    assert r.exit_code == 0, r.output
    for n, did in enumerate(ids, start=1):
        assert did in r.stdout and f"unit-{n}" in r.stdout
    assert "Page 1 of 1 (3 devices)" in r.stdout
    header = next(line for line in r.stdout.splitlines() if "┃ id" in line)
    assert re.findall(r"┃ (\w+)", header)[:2] == ["id", "name"]

    r = cli("devices", "list", "--product", product, "--group", "south", "--json")
    assert r.exit_code == 0, r.output
    assert [d["id"] for d in json.loads(r.stdout)["devices"]] == [ids[2]]
    r = cli("devices", "list", "--product", product, "--group", "south", "--group", "north",
            "--per-page", "2", "--page", "2", "--json")
    assert r.exit_code == 0, r.output
    page = json.loads(r.stdout)
    assert (len(page["devices"]), page["meta"]["total"], page["meta"]["page"]) == (1, 3, 2)

    r = cli("devices", "get", ids[0], "--product", product)
    assert r.exit_code == 0, r.output
    assert "unit-1" in r.stdout and '["north"]' in r.stdout
    assert re.search(r"│ development\s+│ True", r.stdout)
    r = cli("devices", "get", ids[1], "--json")  # /v1/devices/ID: a team member may see it
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["id"], json.loads(r.stdout)["name"]) == (ids[1], "unit-2")


def test_api_errors_exit_1_with_the_servers_message(cli: Cli, user: str,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text(device_ids(1, "errors")[0] + "\n")
    r = cli("devices", "import", str(path), "--product", "anything")
    assert r.exit_code == 1 and "Not logged in" in r.output

    login(cli, user)
    r = cli("devices", "import", str(path), "--product", "no-such-product")
    assert r.exit_code == 1
    assert "Product not found (HTTP 404)" in r.output and "Traceback" not in r.output
    r = cli("devices", "list", "--product", "no-such-product")
    assert r.exit_code == 1 and "Product not found (HTTP 404)" in r.output
    r = cli("devices", "get", "0" * 24)
    assert r.exit_code == 1 and "Device not found (HTTP 404)" in r.output
    r = cli("--token", "0" * 40, "devices", "list", "--product", "no-such-product")
    assert r.exit_code == 1 and "corral login" in r.output

    empty = tmp_path / "empty.txt"
    empty.write_text("\r\n\n   \n")
    r = cli("devices", "import", str(empty), "--product", new_product(cli, "Empty"))
    assert r.exit_code == 1 and "No device IDs" in r.output
    r = cli("devices", "import", str(tmp_path / "missing.txt"), "--product", "x")
    assert r.exit_code == 2 and "Cannot read" in r.output


def test_secret_prints_a_new_mqtt_secret_once(cli: Cli, user: str, live_server: str,
                                              config_home: Path, tmp_path: Path) -> None:
    login(cli, user)
    product = new_product(cli, "Meters")
    [dev] = device_ids(1, "secret")
    ids = tmp_path / "ids.txt"
    ids.write_text(dev + "\n")
    assert cli("devices", "import", str(ids), "--product", product).exit_code == 0
    r = cli("devices", "secret", dev, "--product", product)
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip().splitlines()[-1]
    assert len(secret) >= 24 and "secret" not in secret
    again = cli("devices", "secret", dev, "--product", product, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["mqtt_secret"] != secret
    body = api_get(live_server, config_home, f"/v1/products/{product}/devices/{dev}")
    assert body.get("functions", body.get("device", {}).get("functions")) == []
    missing = cli("devices", "secret", "f" * 24, "--product", product)
    assert missing.exit_code == 1


def test_tag_add_remove_set_and_list_by_tag(cli: Cli, user: str, live_server: str,
                                             config_home: Path, tmp_path: Path) -> None:
    product, ids = product_with_devices(cli, user, tmp_path, "Tagged", 3)

    r = cli("devices", "tag", *ids[:2], "--product", product, "--add", "eu", "--add", "roof")
    assert r.exit_code == 0, r.output
    assert "Tags changed on 2 device(s)" in r.stdout
    r = cli("devices", "tag", ids[1], "--product", product, "--remove", "roof")
    assert r.exit_code == 0, r.output
    r = cli("devices", "tag", ids[2], "--product", product, "--set", "eu, spare")
    assert r.exit_code == 0 and "Tags of" in r.stdout and "eu, spare" in r.stdout, r.output

    r = cli("devices", "list", "--product", product, "--tag", "eu", "--json")
    assert r.exit_code == 0, r.output
    assert sorted(d["id"] for d in json.loads(r.stdout)["devices"]) == sorted(ids)
    r = cli("devices", "list", "--product", product, "--tag", "eu", "--tag", "roof", "--json")
    assert [d["id"] for d in json.loads(r.stdout)["devices"]] == [ids[0]]
    r = cli("devices", "get", ids[2], "--product", product, "--json")
    assert json.loads(r.stdout)["tags"] == ["eu", "spare"]

    # refusals: nothing to do, --set on several, a bad tag (the server's message, exit 1)
    assert cli("devices", "tag", ids[0], "--product", product).exit_code == 1
    assert cli("devices", "tag", *ids[:2], "--product", product, "--set", "a").exit_code == 1
    r = cli("devices", "tag", ids[0], "--product", product, "--add", "x" * 101)
    assert r.exit_code == 1 and "at most 100 characters" in r.output
    r = cli("devices", "get", ids[0], "--product", product, "--json")
    assert json.loads(r.stdout)["tags"] == ["eu", "roof"]
