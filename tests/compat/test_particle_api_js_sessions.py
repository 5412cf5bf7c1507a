"""particle-api-js 12 against corral's event streams, publish, functions and variables.

The module serves its own app with uvicorn on a free 127.0.0.1 port, in the test's event
loop, because the "device" lives in this process: a ``sessionkit.ScriptedDevice`` connected
to the app's real session hub (the MQTT transport is tested with real MQTT clients
elsewhere). The owner, org, product and devices are created over HTTP; then
``driver_sessions.mjs`` runs once and drives the library: ``getEventStream`` (mine with a
name, a device with a name, a product, a product device, an org; the error cases),
``publishEvent``, ``callFunction`` (its ``{"args": ...}`` body) and ``getVariable``, and a
short client idle timeout to check the server's keep-alives. Each test checks one part.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from corral.mail.backends import LogBackend
from corral.settings import Settings
from corral.web.app import Runtime, create_app
from dbreset import truncate_all
from sessionkit import ScriptedDevice, connect, live_server, wait_for

pytestmark = pytest.mark.compat

COMPAT_DIR = Path(__file__).resolve().parent
OWNER = "sessions-owner@example.com"
PASSWORD = "compat correct horse 42"
ONLINE = "0123456789abcdef0000ca01"
OFFLINE = "0123456789abcdef0000ca02"
IDLE_MS = 1000  # the client's idle timeout in the keep-alive step ...
KEEPALIVE_S = 0.25  # ... and the server's keep-alive interval
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
DRIVER_TIMEOUT_S = 90


async def _seed(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=15, trust_env=False) as http:
        r = await http.post("/v1/users", json={"username": OWNER, "password": PASSWORD})
        assert r.status_code == 200, r.text
        r = await http.post("/oauth/token", data={
            "grant_type": "password", "username": OWNER, "password": PASSWORD,
            "client_id": "particle-cli", "client_secret": "particle-cli"})
        assert r.status_code == 200, r.text
        http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        org = (await http.post("/v1/orgs", json={"name": "Compat Sessions Org"})).json()
        org = org["organization"]
        r = await http.post(f"/v1/orgs/{org['slug']}/products", json={
            "product": {"name": "Compat Sessions", "platform_id": 12}})
        assert r.status_code in (200, 201), r.text
        product = r.json().get("product", r.json())
        r = await http.post(f"/v1/products/{product['slug']}/devices",
                            json={"ids": [ONLINE, OFFLINE]})
        assert r.status_code == 200 and sorted(r.json()["updatedDeviceIds"]) == [ONLINE, OFFLINE]
        return {"org": org, "product": product}


async def _run_driver(node: str, base: str, plan: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"CORRAL_COMPAT_BASE_URL": base, "CORRAL_COMPAT_USERNAME": OWNER,
                "CORRAL_COMPAT_PASSWORD": PASSWORD, "CORRAL_COMPAT_PLAN": json.dumps(plan),
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    # asynchronously: the server answering the driver runs in this event loop
    proc = await asyncio.create_subprocess_exec(
        node, str(COMPAT_DIR / "driver_sessions.mjs"), cwd=COMPAT_DIR, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DRIVER_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"driver_sessions.mjs did not finish in {DRIVER_TIMEOUT_S} s", pytrace=False)
    lines = [ln for ln in out.decode().splitlines() if ln.strip()]
    try:
        doc: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"driver_sessions.mjs printed no JSON (exit {proc.returncode})\n"
                    f"stdout:\n{out.decode()[-2000:]}\nstderr:\n{err.decode()[-2000:]}",
                    pytrace=False)
    doc["_exit_code"] = proc.returncode
    doc["_stderr"] = err.decode()[-2000:]
    return doc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def results(node_tools: Any, database_url: str,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Serve, seed, connect the device, run the driver once; the driver's JSON document plus
    what the server saw (``_calls``, ``_subscriptions_after``)."""
    await truncate_all(database_url)
    settings = Settings(data_dir=tmp_path_factory.mktemp("compat-sessions"),
                        database_url=database_url, argon2_time_cost=1, argon2_memory_kib=8,
                        log_format="text", sse_keepalive_s=KEEPALIVE_S)
    runtime = Runtime(settings, mail_backend=LogBackend())
    app = create_app(settings, runtime=runtime)
    await runtime.start(app, migrate_db=False, background=False)
    sessions: list[Any] = []

    async def emit(arg: str) -> int:
        await sessions[0].publish("temp", arg)
        return 1

    device = ScriptedDevice(functions={"led": lambda arg: 1 if arg == "on" else 0, "emit": emit},
                            variables={"count": ("int32", 42), "greeting": ("string", "hello")})
    try:
        async with live_server(app) as base:
            seeded = await _seed(base)
            sessions.append(await connect(app, ONLINE, device))
            baseline = runtime.bus.subscription_count
            doc = await _run_driver(node_tools.node, base, {
                "product": seeded["product"]["slug"], "org": seeded["org"]["slug"],
                "online": ONLINE, "offline": OFFLINE, "idleMs": IDLE_MS})
            try:  # the driver aborted its streams: the server must drop their subscriptions
                await wait_for(lambda: runtime.bus.subscription_count == baseline)
            except TimeoutError:
                pass
            doc["_subscriptions_after"] = runtime.bus.subscription_count - baseline
            doc["_calls"] = list(device.calls)
            doc["_product"] = seeded["product"]
            await sessions[0].close("test over")
    finally:
        await runtime.stop()
    return doc


def _step(results: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in results["steps"], f"step {name} missing; unexpected: {results['unexpected']}"
    return results["steps"][name]  # type: ignore[no-any-return]


def _ok(results: dict[str, Any], name: str) -> Any:
    rec = _step(results, name)
    assert rec["ok"] is True and rec["statusCode"] == 200, rec
    return rec["body"]


def _error(results: dict[str, Any], name: str, status: int) -> dict[str, Any]:
    rec = _step(results, name)
    assert rec["ok"] is False and rec["statusCode"] == status, rec
    assert rec["bodyIsJson"] is True, rec  # the library parses every error body as JSON
    return rec  # type: ignore[no-any-return]


def _events(results: dict[str, Any], label: str) -> list[dict[str, Any]]:
    rec = results["streams"][label]
    assert rec["opened"] is True, rec
    return rec["events"]  # type: ignore[no-any-return]


def test_driver_ran_cleanly(results: dict[str, Any]) -> None:
    assert results["unexpected"] == [], results["unexpected"]
    assert results["_exit_code"] == 0, results["_stderr"]


def test_stream_mine_with_a_name_gets_my_publish(results: dict[str, Any]) -> None:
    assert _ok(results, "publishMine") == {"ok": True}
    [event] = _events(results, "mine")
    assert event["name"] == "compat/hello" and event["data"] == "hi"
    assert event["ttl"] == 60 and event["coreid"] == "api"
    assert ISO_MS.match(event["published_at"]), event


def test_product_and_org_streams(results: dict[str, Any]) -> None:
    assert _ok(results, "publishProduct") == {"ok": True}
    product = [(e["name"], e["data"]) for e in _events(results, "product")]
    assert product == [("compat-product", "p"), ("temp", "21.5")]
    org = [(e["name"], e["coreid"]) for e in _events(results, "org")]
    assert org == [("compat-product", "api"), ("temp", ONLINE)]


def test_device_streams_get_the_device_event(results: dict[str, Any]) -> None:
    for label in ("device", "productDevice"):
        [event] = _events(results, label)
        assert (event["name"], event["data"], event["coreid"]) == ("temp", "21.5", ONLINE)


def test_stream_errors_are_json(results: dict[str, Any]) -> None:
    no_prefix = results["streams"]["noPrefix"]["rejection"]
    assert no_prefix["statusCode"] == 400
    assert no_prefix["body"]["error"] == "event prefix filter is required"
    bad = results["streams"]["badToken"]["rejection"]
    assert bad["statusCode"] == 401 and bad["body"]["error"] == "invalid_token"
    other = results["streams"]["otherProduct"]["rejection"]
    assert other["statusCode"] == 404
    assert other["errorDescription"].endswith(" - Product not found"), other


def test_reserved_names_are_refused(results: dict[str, Any]) -> None:
    rec = _error(results, "publishReserved", 400)
    assert "reserved" in rec["shortErrorDescription"]


def test_call_function(results: dict[str, Any]) -> None:
    body = _ok(results, "callLed")
    assert body == {"id": ONLINE, "name": None, "connected": True, "return_value": 1}
    assert _ok(results, "callEmitProduct")["return_value"] == 1
    # the library sends {"args": argument}; the device got exactly the argument
    assert results["_calls"] == [("led", "on"), ("emit", "21.5")]


def test_call_function_errors(results: dict[str, Any]) -> None:
    rec = _error(results, "callMissing", 404)
    assert rec["body"]["error"] == "Function nope not found"
    rec = _error(results, "callOffline", 404)
    assert rec["body"]["error"] == "Device is not connected"
    assert rec["shortErrorDescription"] == "Device is not connected"


def test_get_variable(results: dict[str, Any]) -> None:
    body = _ok(results, "getCount")
    assert (body["name"], body["result"]) == ("count", 42)
    info = body["coreInfo"]
    assert info["deviceID"] == ONLINE and info["connected"] is True
    assert info["product_id"] == results["_product"]["id"]
    assert _ok(results, "getGreetingProduct")["result"] == "hello"
    rec = _error(results, "getMissing", 404)
    assert rec["body"]["error"] == "Variable not found"


def test_keepalive_holds_a_stream_open(results: dict[str, Any]) -> None:
    keep = results["keepalive"]
    assert keep == {"idleMs": IDLE_MS, "disconnects": 0}, keep
    assert KEEPALIVE_S * 1000 < IDLE_MS


def test_aborted_streams_release_their_subscriptions(results: dict[str, Any]) -> None:
    assert results["_subscriptions_after"] == 0
