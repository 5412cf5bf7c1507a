"""The server is checked against its own OpenAPI document: schemathesis over every operation.

A real corral (uvicorn, in a subprocess, on a fresh SQLite database) serves ``/openapi.json``;
the permission matrix's world (tests/test_permissions_matrix.py ``build_world``: an org with a
product and devices, a caller per role, another tenant) is written into its database; then
schemathesis generates requests for every operation from the document, as the Owner and as
callers with less (a product View-only member, an API user with one scope, another tenant's
Owner), with ``{org}``, ``{product}`` and ``{device_id}`` pointing at the world's objects so
requests reach the rules behind the guards. Each answer must:

* not be a 5xx (``not_a_server_error``);
* have a status the document lists for the operation (``status_code_conformance``);
* have a content type and a body that match what the document says for that status
  (``content_type_conformance``, ``response_schema_conformance``).

Bounded for CI: ``CORRAL_CONTRACT_EXAMPLES`` examples per operation and caller (default 3,
a few minutes in all). The longer run (README, "The API contract")::

    CORRAL_CONTRACT_EXAMPLES=200 .venv/bin/pytest -n 2 tests/test_api_contract.py

Exclusions (the only ones): the Server-Sent Events streams (``text/event-stream`` answers
never end; tests/test_sse.py covers them) are not called.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from corral.settings import Settings
from test_permissions_matrix import DEVICE_ID, build_world

EXAMPLES = int(os.environ.get("CORRAL_CONTRACT_EXAMPLES", "3"))
CALLERS = ["org:Owner", "product:View-only", "api:products:get", "outsider"]
START_TIMEOUT_S = 90.0  # the machine may be busy; the server imports everything first
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _world(url: str, data_dir: Path) -> dict[str, Any]:
    from corral import models
    from corral.db.engine import make_engine, make_sessionmaker

    models.load()
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as db:
            w = await build_world(db, Settings(data_dir=data_dir, database_url=url),
                                  client="contract")
            return {"org": w.org.slug, "product": w.product.slug, "tokens": w.tokens}
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def corral_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("contract")
    url = f"sqlite+aiosqlite:///{data}/corral.db"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_DATA_DIR=str(data), CORRAL_DATABASE_URL=url, CORRAL_MQTT_PORT="0",
               CORRAL_MQTT_TLS_PORT="0", CORRAL_PARTICLE_PORT="0", CORRAL_PARTICLE_UDP_PORT="0",
               CORRAL_LOG_FORMAT="text",
               CORRAL_LOG_LEVEL="WARNING", CORRAL_ARGON2_TIME_COST="1",
               CORRAL_ARGON2_MEMORY_KIB="8", CORRAL_DEVICE_CALL_TIMEOUT_S="1",
               CORRAL_API_RATE_LIMIT="0")  # the fuzzer sends more than 10,000 in 5 min
    log = (data / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "corral.web.app:asgi_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"corral did not start:\n{(data / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        world = asyncio.run(_world(url, data))
        yield {"base": base, "log": data / "server.log", **world}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _document() -> dict[str, Any]:
    """The document the server serves (built here, at collection, so each operation is a
    test of its own; test_served_document_is_this_one checks it is the served one)."""
    from corral.web.app import create_app

    return create_app(Settings(data_dir=Path("contract-unused"))).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_served_document_is_this_one(corral_api: dict[str, Any]) -> None:
    served = httpx.get(f"{corral_api['base']}/openapi.json", timeout=10).json()
    assert served == DOCUMENT


def _streams(case: Any) -> bool:
    ok = case.operation.definition.raw.get("responses", {}).get("200", {})
    return "text/event-stream" in ok.get("content", {})


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_the_contract(case: Any, corral_api: dict[str, Any]) -> None:
    if _streams(case):
        pytest.skip("an event stream never ends (tests/test_sse.py)")
    params = case.path_parameters or {}
    for name, value in (("org", corral_api["org"]), ("product", corral_api["product"]),
                        ("device_id", DEVICE_ID)):
        if name in params:
            params[name] = value
    for caller in CALLERS:  # each generated request, as each caller
        headers = {"Authorization": f"Bearer {corral_api['tokens'][caller]}"}
        case.call_and_validate(base_url=corral_api["base"], headers=headers, checks=CHECKS,
                               timeout=15)
