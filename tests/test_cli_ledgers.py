"""``corral ledger get|set|history|rollback`` over real HTTP against a live corral."""

from __future__ import annotations

import json

import httpx

import test_cli
from test_cli import PASSWORD, Cli, login

config_home, cli, user, live_server = (test_cli.config_home, test_cli.cli, test_cli.user,
                                       test_cli.live_server)


def _create(live_server: str, username: str) -> None:
    token = httpx.post(f"{live_server}/oauth/token", timeout=10, data={
        "grant_type": "password", "username": username, "password": PASSWORD,
        "client_id": "particle-cli", "client_secret": "particle-cli"}).json()["access_token"]
    r = httpx.post(f"{live_server}/v1/ledgers", timeout=10,
                   headers={"Authorization": f"Bearer {token}"},
                   json={"ledger": {"name": "cfg", "scope": "Owner",
                                    "schema": {"properties": {"n": {"type": "integer"}}}}})
    assert r.status_code == 201, r.text


def test_ledger_commands(cli: Cli, user: str, live_server: str, tmp_path) -> None:
    login(cli, user)
    _create(live_server, user)
    r = cli("ledger", "set", "cfg", "owner", '{"n": 1, "net": {"a": 1, "b": 2}}')
    assert r.exit_code == 0 and "version 1" in r.stdout, r.output
    doc = tmp_path / "doc.json"
    doc.write_text('{"net": {"b": 3}}')
    r = cli("ledger", "set", "cfg", "owner", f"@{doc}", "--merge", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data"] == {"n": 1, "net": {"a": 1, "b": 3}}
    r = cli("ledger", "set", "cfg", "owner", "-", input='{"n": 5}')
    assert r.exit_code == 0 and "version 3" in r.stdout, r.output
    r = cli("ledger", "get", "cfg", "owner", "--json")
    assert json.loads(r.stdout)["data"] == {"n": 5}
    r = cli("ledger", "get", "cfg", "owner", "--version", "1")
    assert r.exit_code == 0 and '"b": 2' in r.stdout, r.output
    r = cli("ledger", "history", "cfg", "owner", "--json")
    assert [(v["version"], v["op"]) for v in json.loads(r.stdout)] == [
        (3, "set"), (2, "merge"), (1, "set")]
    r = cli("ledger", "history", "cfg", "owner")
    assert r.exit_code == 0 and "merge" in r.stdout and "current" in r.stdout, r.output
    r = cli("ledger", "rollback", "cfg", "owner", "1")
    assert r.exit_code == 0 and "as version 4" in r.stdout, r.output
    # refusals: the schema (with where), not an object, not JSON, an unknown ledger
    r = cli("ledger", "set", "cfg", "owner", '{"n": "five"}')
    assert r.exit_code == 1 and "/n:" in r.output and "integer" in r.output, r.output
    assert cli("ledger", "set", "cfg", "owner", "[1]").exit_code == 2
    assert cli("ledger", "set", "cfg", "owner", "{nope").exit_code == 2
    r = cli("ledger", "get", "nope", "owner")
    assert r.exit_code == 1 and "not found" in r.output, r.output
