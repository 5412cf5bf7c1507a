"""A device list's total: exact up to a threshold, an estimate (said so in meta) beyond it.

The threshold (10,000) and the estimate's age (30 s) are lowered here so a handful of
devices cross it; the rules are the same.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from corral.devices import estimates, service
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
    monkeypatch.setattr(estimates, "ESTIMATE_TTL_S", 0.0)  # the estimate has aged out
    meta = await _meta(client, ada, product)
    assert (meta["total"], meta["total_is_estimate"]) == (10, True)
    # the pages themselves are exact whatever the total says
    r = await client.get(f"/v1/products/{product['id']}/devices", headers=bearer(ada),
                         params={"perPage": 5, "page": 2, "sortAttr": "deviceId",
                                 "sortDir": "asc"})
    assert [d["id"] for d in r.json()["devices"]] == [f"{i:024x}" for i in range(6, 11)]


async def test_a_broad_filter_in_a_large_product_is_estimated_from_a_sample(
        client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a product of SAMPLE_FROM devices or more, a filter whose matches among SAMPLE
    devices (in ID order) scale to more than SAMPLED_ABOVE is not counted: the scaled
    sample is the total, said to be an estimate; a narrow filter is counted exactly."""
    from sqlalchemy import func, select

    from corral.devices.models import Device

    monkeypatch.setattr(estimates, "SAMPLE", 60)
    monkeypatch.setattr(estimates, "SAMPLE_FROM", 300)
    monkeypatch.setattr(estimates, "SAMPLED_ABOVE", 100)
    ada, product = await owner_and_product(client)
    ids = [f"{i:024x}" for i in range(1, 601)]
    await add_devices(app, product["id"], *ids)
    async with app.state.sessionmaker() as db:
        for n, did in enumerate(ids):  # two devices in three on firmware 3, then 1 in 50 on 9
            (await db.get(Device, did)).firmware_version = 9 if n % 50 == 0 else (
                3 if n % 3 else 1)
        await db.commit()
        exact = (await db.execute(select(func.count()).where(
            Device.product_id == product["id"], Device.firmware_version == 3))).scalar_one()
    seen: list[str] = []
    real = service._count

    async def counting(*args: Any, **kwargs: Any) -> int:
        seen.append("count")
        return await real(*args, **kwargs)

    monkeypatch.setattr(service, "_count", counting)
    meta = await _meta(client, ada, product, firmwareVersion=3)
    assert meta["total_is_estimate"] is True
    assert abs(meta["total"] - exact) <= exact // 4, (meta["total"], exact)
    assert meta["total_pages"] == -(-meta["total"] // 2)
    assert seen == [], "a broad filter was counted"
    meta = await _meta(client, ada, product, firmwareVersion=9)  # 12 devices: exact
    assert meta["total"] == 12 and "total_is_estimate" not in meta
    assert seen, "a narrow filter was not counted"
    # the console's bounded count: above its cap by the sample, without counting
    from corral.products.models import Product

    seen.clear()
    async with app.state.sessionmaker() as db:
        p = await db.get(Product, product["id"])
        broad = await service.count_product_devices(
            db, p, service.DeviceQuery(firmware_version=3), cap=50)
        narrow = await service.count_product_devices(
            db, p, service.DeviceQuery(firmware_version=9), cap=50)
    assert (broad, narrow) == (51, 12)
    assert len(seen) == 1, seen  # the narrow one only


async def test_a_remembered_count_over_the_threshold_is_not_counted_again(
        client: httpx.AsyncClient, app: Any, small_threshold: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A total counted above the threshold is answered, as an estimate, without even the
    capped count while it is younger than ESTIMATE_TTL_S; once it has aged out the devices
    are counted again."""
    ada, product = await owner_and_product(client)
    await add_devices(app, product["id"], *[f"{i:024x}" for i in range(1, 13)])
    seen: list[int | None] = []
    real = service._count

    async def counting(db: Any, conds: Any, cap: int | None = None, members: Any = None,
                       **kwargs: Any) -> int:
        seen.append(cap)
        return await real(db, conds, cap, members, **kwargs)

    monkeypatch.setattr(service, "_count", counting)
    by_id = {"sortAttr": "deviceId"}  # (by last heard, never-heard devices are counted too)
    meta = await _meta(client, ada, product, **by_id)
    assert (meta["total"], meta["total_is_estimate"], seen) == (12, True, [5, None])
    seen.clear()
    meta = await _meta(client, ada, product, **by_id)
    assert (meta["total"], meta["total_is_estimate"], seen) == (12, True, [])
    monkeypatch.setattr(estimates, "ESTIMATE_TTL_S", 0.0)
    meta = await _meta(client, ada, product, **by_id)
    assert (meta["total"], seen) == (12, [5, None])


async def test_a_sample_is_taken_once_per_estimate_age_and_the_listing_counts_for_the_console(
        client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A narrow filter's sample (it only chooses to count) is taken once per
    ESTIMATE_TTL_S; the console's bounded count takes the count the listing already made
    (``DevicePage.counted``), and it equals what counting says."""
    from corral.devices.models import Device
    from corral.products.models import Product

    monkeypatch.setattr(estimates, "SAMPLE", 60)
    monkeypatch.setattr(estimates, "SAMPLE_FROM", 300)
    ada, product = await owner_and_product(client)
    ids = [f"{i:024x}" for i in range(1, 401)]
    await add_devices(app, product["id"], *ids)
    async with app.state.sessionmaker() as db:
        for n, did in enumerate(ids):
            (await db.get(Device, did)).firmware_version = 9 if n % 40 == 0 else 1
        await db.commit()
    samples: list[int] = []
    real = estimates.sampled_total

    async def sampling(*args: Any) -> int | None:
        samples.append(1)
        return await real(*args)

    monkeypatch.setattr(estimates, "sampled_total", sampling)
    for _ in range(3):
        meta = await _meta(client, ada, product, firmwareVersion=9)
        assert meta["total"] == 10 and "total_is_estimate" not in meta
    assert samples == [1]
    async with app.state.sessionmaker() as db:
        p = await db.get(Product, product["id"])
        for page in (1, 2, 3, 4):  # 10 matches, 4 per page: pages 1-3, then none
            q = service.DeviceQuery(firmware_version=9, per_page=4, page=page, count=False)
            listed = await service.list_product_devices(db, p, q)
            assert listed.counted in (None, 10), (page, listed.counted)
            assert await service.count_product_devices(db, p, q, cap=50) == 10
        q = service.DeviceQuery(firmware_version=9, per_page=4, page=1, count=False)
        assert (await service.list_product_devices(db, p, q)).counted == 10
        q = service.DeviceQuery(firmware_version=1, per_page=4, page=100, count=False)
        assert (await service.list_product_devices(db, p, q)).counted in (None, 390)
