"""A device list's total: exact up to a threshold, an estimate (said so in meta) beyond it.

The threshold (10,000) and the estimate's age (30 s) are lowered here so a handful of
devices cross it; the rules are the same.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from corral.devices import service
from helpers import add_devices, bearer, owner_and_product


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "EXACT_COUNT_UP_TO", 5)


async def _meta(client: httpx.AsyncClient, token: str, product: dict[str, Any],
                **params: Any) -> dict[str, Any]:
    r = await client.get(f"/v1/products/{product['id']}/devices", headers=bearer(token),
                         params={"perPage": 2, **params})
    assert r.status_code == 200, r.text
    meta: dict[str, Any] = r.json()["meta"]
    return meta


async def test_small_totals_are_exact_and_unmarked(client: httpx.AsyncClient, app: Any,
                                                   small_threshold: None) -> None:
    ada, product = await owner_and_product(client)
    await add_devices(app, product["id"], *[f"{i:024x}" for i in range(1, 5)])
    meta = await _meta(client, ada, product)
    assert meta["total"] == 4 and meta["total_pages"] == 2
    assert "total_is_estimate" not in meta  # Particle's shape, unchanged


async def test_large_totals_are_estimates_of_a_recent_count(
        client: httpx.AsyncClient, app: Any, small_threshold: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ada, product = await owner_and_product(client)
    await add_devices(app, product["id"], *[f"{i:024x}" for i in range(1, 9)])
    meta = await _meta(client, ada, product)
    assert (meta["total"], meta["total_pages"], meta["total_is_estimate"]) == (8, 4, True)
    await add_devices(app, product["id"], *[f"{i:024x}" for i in range(9, 11)])
    meta = await _meta(client, ada, product)  # within the estimate's age: the last count
    assert (meta["total"], meta["total_is_estimate"]) == (8, True)
    # a filter has its own count (and below the threshold it is exact)
    meta = await _meta(client, ada, product, deviceId="00000000000000000000000a")
    assert meta["total"] == 1 and "total_is_estimate" not in meta
    monkeypatch.setattr(service, "ESTIMATE_TTL_S", 0.0)  # the estimate has aged out
    meta = await _meta(client, ada, product)
    assert (meta["total"], meta["total_is_estimate"]) == (10, True)
    # the pages themselves are exact whatever the total says
    r = await client.get(f"/v1/products/{product['id']}/devices", headers=bearer(ada),
                         params={"perPage": 5, "page": 2, "sortAttr": "deviceId",
                                 "sortDir": "asc"})
    assert [d["id"] for d in r.json()["devices"]] == [f"{i:024x}" for i in range(6, 11)]
