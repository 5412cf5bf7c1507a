"""``corral integrations``: create, list, get, test, log, disable/enable, redeliver and delete
over real HTTP (a live corral and a live webhook target)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import test_cli
from hookkit import hook_settings, threaded_target
from test_cli import Cli, login, serving

config_home, cli, user = test_cli.config_home, test_cli.cli, test_cli.user


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(hook_settings(None, tmp_path_factory.mktemp("live"))) as url:
        yield url


@pytest.fixture
def target() -> Iterator[tuple[str, list[bytes]]]:
    with threaded_target() as t:
        yield t


def test_integrations_commands(cli: Cli, user: str, target: tuple[str, list[bytes]]) -> None:
    url, got = target
    login(cli, user)
    r = cli("integrations", "create", "temp", url, "--headers", '{"X-Key": "secret-value-1"}',
            "--json")
    assert r.exit_code == 0, r.output
    created = json.loads(r.stdout)
    hook = created["id"]
    assert created["signing_secret"].startswith("whsec_")
    r = cli("integrations", "list")
    assert r.exit_code == 0 and hook[:8] in r.stdout and "POST" in r.stdout, r.output
    r = cli("integrations", "get", hook, "--json")
    shown = json.loads(r.stdout)
    assert shown["headers"] == {"X-Key": "secr…"} and "secret-value-1" not in r.stdout
    r = cli("integrations", "test", hook, "--data", "hello")
    assert r.exit_code == 0 and "Passed" in r.stdout and "pong" in r.stdout, r.output
    assert b"data=hello" in got[0]
    r = cli("integrations", "log", hook)
    assert r.exit_code == 0 and "test" in r.stdout, r.output
    r = cli("integrations", "disable", hook)
    assert r.exit_code == 0 and "Disabled" in r.stdout
    r = cli("integrations", "list", "--json")
    assert json.loads(r.stdout)[0]["disabled"] is True
    r = cli("integrations", "enable", hook)
    assert r.exit_code == 0
    r = cli("integrations", "redeliver", hook, "--since", "2020-01-01T00:00:00Z")
    assert r.exit_code == 0 and "Queued 0" in r.stdout, r.output
    r = cli("integrations", "create", "x", "ftp://nope")
    assert r.exit_code == 1 and "url" in r.output
    r = cli("integrations", "delete", hook)
    assert r.exit_code == 0
    r = cli("integrations", "get", hook)
    assert r.exit_code == 1 and "not found" in r.output.lower()


def test_mqtt_create_and_product_scope(cli: Cli, user: str) -> None:
    login(cli, user)
    r = cli("products", "create", "Hooks", "--json")
    product = json.loads(r.stdout)["product"]["slug"]
    r = cli("integrations", "create", "env", "mqtt://127.0.0.1:1883", "--product", product,
            "--topic", "corral/{{{PARTICLE_DEVICE_ID}}}", "--qos", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["integration_type"] == "MQTT"
    r = cli("integrations", "list", "--product", product, "--json")
    [row] = json.loads(r.stdout)
    assert row["url"] == "mqtt://127.0.0.1:1883"
    r = cli("integrations", "list", "--product", product, "--org", "x")
    assert r.exit_code == 2
