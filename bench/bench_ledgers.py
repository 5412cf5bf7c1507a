"""B17: a cloud-to-device ledger reaching a fleet of MQTT devices (issue 21).

    CORRAL_API_RATE_LIMIT=0 .venv/bin/python bench/bench_ledgers.py [--devices 2000] \
        [--rounds 5] [--database-url URL]

One `corral serve` (SQLite unless --database-url); N SDK devices (corral.device.Device) in
this process, at most 100 connecting at once.

1. connect, yardstick first: the N devices connect without taking ledgers, disconnect, then
   connect again taking ledgers (subscription + sync) while a product-level document
   exists: the second round includes each device's first sync and acknowledgement.
2. fan-out: R writes of the product-level instance through the API; for each, the time until
   every device has applied the new version (device side) and until the API lists no device
   behind (`GET /v1/ledgers/config/devices?behind=true`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx
from _corral import corral_serve, provision_fleet

from corral.device import Device

LIMIT = 100  # devices connecting at the same moment


async def connect_all(devices: list[Device]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(d.connect() for d in devices))
    return time.perf_counter() - started


async def close_all(devices: list[Device]) -> None:
    await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)


async def all_applied(devices: list[Device], version: int, within: float = 300.0) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(within):
        await asyncio.gather(*(d.ledger("config").wait(version=version, within=within)
                               for d in devices))
    return time.perf_counter() - started


async def none_behind(c: httpx.AsyncClient, path: str, within: float = 300.0) -> float:
    started = time.perf_counter()
    deadline = started + within
    while True:
        r = await c.get(path, params={"behind": "true", "per_page": 1})
        r.raise_for_status()
        if r.json()["meta"]["total"] == 0:
            return time.perf_counter() - started
        if time.perf_counter() > deadline:
            raise TimeoutError("devices still behind")
        await asyncio.sleep(0.05)


async def run(base: str, mqtt_port: int, n: int, rounds: int) -> None:
    token, product, creds = await provision_fleet(base, n, salt="ledgers")
    limit = asyncio.Semaphore(LIMIT)

    def fleet() -> list[Device]:
        return [Device(did, secret, "127.0.0.1", mqtt_port, connect_limit=limit,
                       reconnect_initial=0.2) for did, secret in creds]

    async with httpx.AsyncClient(base_url=base, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        got = (await c.get(f"/v1/products/{product}")).json()["product"]
        pid = got["id"]
        org = got["organization"]
        # the product lives in the sandbox (up to 100 devices) or an organization of its own
        ledgers = f"/v1/orgs/{org}/ledgers" if n > 100 else "/v1/ledgers"
        r = await c.post(ledgers, json={"ledger": {
            "name": "config", "scope": "Product", "direction": "CloudToDevice"}})
        if r.status_code != 201:
            raise RuntimeError(f"create ledger: {r.status_code} {r.text}")

        async def write(version: int) -> float:
            t = time.perf_counter()
            r = await c.put(f"{ledgers}/config/instances/{pid}",
                            json={"instance": {"data": {"interval": 60 + version,
                                                        "note": "x" * 200}}})
            if r.status_code != 200:
                raise RuntimeError(f"PUT instance: {r.status_code} {r.text}")
            return time.perf_counter() - t

        plain = fleet()
        yard = await connect_all(plain)
        await close_all(plain)
        await asyncio.sleep(2)
        await write(1)
        taking = fleet()
        for d in taking:
            d.ledger("config")
        with_ledgers = await connect_all(taking)
        first = with_ledgers + await all_applied(taking, 1)
        first_api = await none_behind(c, f"{ledgers}/config/devices")
        print(f"\n{n:,} devices; connect without ledgers {yard:.2f} s "
              f"({n / yard:,.0f}/s); with ledgers {with_ledgers:.2f} s ({n / with_ledgers:,.0f}/s, "
              f"ratio {with_ledgers / yard:.2f}); first document applied by all "
              f"{first:.2f} s after the connects began; API shows none behind "
              f"{first_api:.2f} s later")
        fan: list[float] = []
        api: list[float] = []
        for v in range(2, rounds + 2):
            w = await write(v)
            fan.append(w + await all_applied(taking, v))
            api.append(await none_behind(c, f"{ledgers}/config/devices"))
        print("\n| devices | writes | applied by all: median | max | per device | API none behind (after) |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {n:,} | {rounds} | {statistics.median(fan):.2f} s | {max(fan):.2f} s | "
              f"{statistics.median(fan) / n * 1000:.2f} ms | {statistics.median(api):.2f} s |")
        await close_all(taking)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--database-url")
    a = ap.parse_args()
    if not (1 <= a.devices <= 20_000 and 1 <= a.rounds <= 50):
        ap.error("--devices is 1 to 20,000 and --rounds 1 to 50")
    with tempfile.TemporaryDirectory() as tmp, corral_serve(
            Path(tmp), database_url=a.database_url,
            extra_env={"CORRAL_API_RATE_LIMIT": "0"}) as srv:
        asyncio.run(run(srv.base, srv.mqtt_port, a.devices, a.rounds))


if __name__ == "__main__":
    main()
