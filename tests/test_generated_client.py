"""A client generated from corral's ``/openapi.json`` works against corral.

openapi-python-client (PyPI, pinned in the dev extras) generates a Python client from the
document a live corral serves (uvicorn on 127.0.0.1, a fresh SQLite database); the test
imports the generated package and makes calls through it: typed answers come back parsed
into the generated models, request bodies go out from the generated request models, and an
error comes back as the generated ``Error`` model with Particle's fields.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.settings import Settings
from test_api_contract import _world
from test_cli import serving
from test_permissions_matrix import DEVICE_ID

PACKAGE = "corral_generated_client"


def _generator() -> str:
    found = shutil.which("openapi-python-client") or str(
        Path(sys.executable).parent / "openapi-python-client")
    if not Path(found).exists():
        pytest.fail("openapi-python-client is not installed (dev extras)")
    return found


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("generated")
    settings = Settings(data_dir=data, database_url=f"sqlite+aiosqlite:///{data}/corral.db",
                        argon2_time_cost=1, argon2_memory_kib=8, log_format="text",
                        mqtt_port=0, mqtt_tls_port=0, particle_port=0)
    with serving(settings) as base:
        assert settings.database_url is not None
        world = asyncio.run(_world(settings.database_url, data))
        out = data / "gen"
        out.mkdir()
        # the server builds its document on the first request (seconds on a busy machine);
        # the generator gives up fetching after 5 s, so the document is built first
        assert httpx.get(f"{base}/openapi.json", timeout=120).status_code == 200
        done = subprocess.run(
            [_generator(), "generate", "--url", f"{base}/openapi.json", "--meta", "none",
             "--output-path", str(out / PACKAGE), "--fail-on-warning"],
            capture_output=True, text=True, timeout=300,  # its post-hooks run ruff
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        sys.path.insert(0, str(out))
        try:
            pkg = importlib.import_module(PACKAGE)
            yield {"base": base, "pkg": pkg, **world}
        finally:
            sys.path.remove(str(out))
            for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
                del sys.modules[name]


def _client(g: dict[str, Any], caller: str = "org:Owner") -> Any:
    return g["pkg"].AuthenticatedClient(base_url=g["base"], token=g["tokens"][caller],
                                        raise_on_unexpected_status=True)


def _op(g: dict[str, Any], tag: str, prefix: str) -> Any:
    """The generated module of the operation in ``tag`` whose name starts with ``prefix``."""
    folder = Path(g["pkg"].__file__).parent / "api" / tag
    names = sorted(p.stem for p in folder.glob(f"{prefix}*.py"))
    assert len(names) == 1, (tag, prefix, names)
    return importlib.import_module(f"{PACKAGE}.api.{tag}.{names[0]}")


def test_typed_answers_through_the_generated_client(generated: dict[str, Any]) -> None:
    g = generated
    models = importlib.import_module(f"{PACKAGE}.models")
    with _client(g) as client:
        me = _op(g, "accounts", "get_user_v1_user_get").sync(client=client)
        assert isinstance(me, models.UserAnswer), me
        assert me.username == "owner@matrix.test"
        assert [o.slug for o in me.orgs] == [g["org"]]

        page = _op(g, "devices", "list_product_devices").sync(g["product"], client=client)
        assert isinstance(page, models.DevicePageAnswer), page
        assert DEVICE_ID in [d.id for d in page.devices]
        assert page.meta.total >= 1

        device = _op(g, "devices", "get_product_device").sync(g["product"], DEVICE_ID,
                                                               client=client)
        assert device.id == DEVICE_ID and device.name == "matrix-device"


def test_request_models_go_out_as_bodies(generated: dict[str, Any]) -> None:
    g = generated
    models = importlib.import_module(f"{PACKAGE}.models")
    with _client(g) as client:
        made = _op(g, "products", "create_org_product").sync(
            g["org"], client=client, body=models.ProductCreate(name="Generated Product"))
        assert isinstance(made, models.ProductAnswer), made
        assert made.product.name == "Generated Product"

        group = _op(g, "devices", "create_group").sync(
            g["product"], client=client,
            body=models.GroupCreate(name="from-client", description="made by the client"))
        assert isinstance(group, models.GroupAnswer), group
        listed = _op(g, "devices", "list_groups").sync(g["product"], client=client)
        assert "from-client" in [x.name for x in listed.groups]

        sent = _op(g, "events", "publish_product_event").sync(
            g["product"], client=client, body=models.EventPublish(name="generated/hello",
                                                                  data="hi"))
        assert isinstance(sent, models.OkAnswer) and sent.ok is True
        log = _op(g, "events", "product_event_log").sync(g["product"], client=client)
        assert "generated/hello" in [e.name for e in log.events]


def test_errors_come_back_as_the_error_model(generated: dict[str, Any]) -> None:
    g = generated
    models = importlib.import_module(f"{PACKAGE}.models")
    with _client(g) as client:
        missing = _op(g, "products", "get_product").sync("no-such-product", client=client)
        assert isinstance(missing, models.Error), missing
        assert missing.ok is False and missing.error
    with _client(g, "product:View-only") as viewer:
        refused = _op(g, "devices", "create_group").sync(
            g["product"], client=viewer, body=models.GroupCreate(name="nope"))
        assert isinstance(refused, models.Error), refused
        detailed = _op(g, "devices", "create_group").sync_detailed(
            g["product"], client=viewer, body=models.GroupCreate(name="nope"))
        assert detailed.status_code == 403
