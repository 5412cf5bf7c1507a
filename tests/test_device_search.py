"""Name and serial-number substring search through the search index (corral.devices.search):
the same answers as a scan, on SQLite (FTS5 trigram table kept by triggers) and PostgreSQL
(pg_trgm GIN indexes), following inserts, renames and removals."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import delete, update

from corral.devices.models import Device
from helpers import add_device, bearer, owner_and_product

NAMES = {
    "0000000000000000000000a1": ("Sensor-Kitchen", "SN-1001-AB"),
    "0000000000000000000000a2": ("sensor-garage", "SN-1002-CD"),
    "0000000000000000000000a3": ("pump 100%_done", "XY\"9"),
    "0000000000000000000000a4": ("Gateway", None),
    "0000000000000000000000a5": (None, "SN-1005-AB"),
}


async def _ids(client: httpx.AsyncClient, token: str, product: dict[str, Any],
               **params: str) -> set[str]:
    r = await client.get(f"/v1/products/{product['id']}/devices", headers=bearer(token),
                         params={"perPage": 100, **params})
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["total"] == len(r.json()["devices"])
    return {d["id"] for d in r.json()["devices"]}


async def test_substrings_of_names_and_serials(client: httpx.AsyncClient, app: Any) -> None:
    ada, product = await owner_and_product(client)
    _, other = await owner_and_product(client, "bob@example.com")
    for did, (name, serial) in NAMES.items():
        await add_device(app, did, product["id"], name=name, serial_number=serial)
    await add_device(app, "0000000000000000000000b1", other["id"], name="sensor-elsewhere")
    a1, a2, a3, a5 = (f"0000000000000000000000a{i}" for i in (1, 2, 3, 5))
    assert await _ids(client, ada, product, deviceName="sensor") == {a1, a2}
    assert await _ids(client, ada, product, deviceName="SENSOR-G") == {a2}
    assert await _ids(client, ada, product, deviceName="itche") == {a1}
    assert await _ids(client, ada, product, deviceName="se") == {a1, a2}  # too short to index
    assert await _ids(client, ada, product, deviceName="100%_") == {a3}  # no wildcards
    assert await _ids(client, ada, product, deviceName="0%d") == set()
    assert await _ids(client, ada, product, deviceName="nothing like it") == set()
    assert await _ids(client, ada, product, serialNumber="-ab") == {a1, a5}
    assert await _ids(client, ada, product, serialNumber='Y"9') == {a3}
    assert await _ids(client, ada, product, serialNumber="1002", deviceName="garage") == {a2}


async def test_the_index_follows_renames_and_removals(client: httpx.AsyncClient,
                                                      app: Any) -> None:
    ada, product = await owner_and_product(client)
    for did, (name, serial) in NAMES.items():
        await add_device(app, did, product["id"], name=name, serial_number=serial)
    a1, a2 = "0000000000000000000000a1", "0000000000000000000000a2"
    r = await client.put(f"/v1/products/{product['id']}/devices/{a1}", headers=bearer(ada),
                         json={"name": "boiler-room"})
    assert r.status_code == 200, r.text
    assert await _ids(client, ada, product, deviceName="kitchen") == set()
    assert await _ids(client, ada, product, deviceName="boiler") == {a1}
    async with app.state.sessionmaker() as db:  # bulk statements too (the triggers see all)
        await db.execute(update(Device).where(Device.id == a2).values(serial_number="ZZ-77"))
        await db.execute(delete(Device).where(Device.id == "0000000000000000000000a5"))
        await db.commit()
    assert await _ids(client, ada, product, serialNumber="ZZ-7") == {a2}
    assert await _ids(client, ada, product, serialNumber="SN-100") == {a1}
