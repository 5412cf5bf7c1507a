"""particle-cli's webhook commands against a real corral (issue 19): ``particle webhook
create|POST|GET|list|delete``; a ``particle publish`` then reaches the webhook's target.
(particle-cli 3.43.1, the version pinned for Node 20, has no ``particle integration``
command; its webhook commands use the legacy ``/v1/webhooks`` routes.)"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from particlecli import ParticleCli

from corral.settings import Settings
from helpers import PASSWORD, bearer, new_user
from hookkit import hook_settings, serve
from sessionkit import live_server

pytestmark = pytest.mark.compat

OWNER = "hooks-cli@example.com"


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return hook_settings(database_url, tmp_path)


@pytest.fixture
async def base(app: Any) -> AsyncIterator[str]:
    app.state.runtime.integrations.start()
    async with live_server(app) as url:
        yield url


@pytest.fixture
def cli(node_tools: Any, base: str, tmp_path: Path) -> ParticleCli:
    return ParticleCli(node_tools.node, tmp_path / "home", base)


async def test_webhook_create_list_publish_delete(client: httpx.AsyncClient,
                                                  cli: ParticleCli) -> None:
    token = await new_user(client, OWNER)
    await cli.login(OWNER, PASSWORD)
    async with serve() as target:
        r = (await cli("webhook", "create", "weather", target.url)).ok()
        assert "Successfully created webhook" in r.text or "created" in r.text.lower(), r.text
        (await cli("webhook", "GET", "lookup", target.url + "/get")).ok()
        r = await client.get("/v1/webhooks", headers=bearer(token))
        hooks = {h["event"]: h for h in r.json()}
        assert hooks["weather"]["requestType"] == "POST"
        assert hooks["lookup"]["requestType"] == "GET"
        r = (await cli("webhook", "list")).ok()
        assert "Found 2 hooks registered" in r.text, r.text
        assert f"Hook ID {hooks['weather']['id']} is watching for \"weather\"" in r.text
        assert target.url in r.text

        (await cli("publish", "weather", "Denver")).ok()
        [seen] = await target.wait(1, within=20)
        assert seen.form["event"] == "weather" and seen.form["data"] == "Denver"

        r = (await cli("webhook", "delete", hooks["weather"]["id"])).ok()
        assert "Successfully deleted webhook" in r.text, r.text
        r = (await cli("webhook", "list")).ok()
        assert re.search(r"Found 1 hooks? registered", r.text), r.text
        bad = await cli("webhook", "delete", "0123456789abcdef01234567")
        assert bad.code != 0 and "not_found" in bad.text, bad.text  # the CLI shows body.error
