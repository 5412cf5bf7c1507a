"""B11: firmware delivery: one image to a fleet of simulated devices over each transport.

    .venv/bin/python bench/bench_firmware.py mqtt [--devices 1000] [--size 1048576]
    .venv/bin/python bench/bench_firmware.py particle [--devices 200] [--size 1048576]
    (each takes --database-url for PostgreSQL)

mqtt:     N `corral simulate`-style devices (corral.device.simulator.Fleet, one event loop)
          connect to `corral serve`; an image of --size bytes is uploaded and released as
          the product default with intelligent delivery: every online device gets an offer,
          downloads the image over HTTP in streamed Range requests (1 MiB, --chunk), checks SHA-256 (and the
          signature, when the product signs), reports applied and reconnects on the new
          version. Timed from the release request until the server lists every device on the
          new version (goal: 1 MiB to 1,000 devices in < 60 s).
particle: N simulated Particle devices (corral.device.particle_fleet.ParticleFleet) get the
          image as a Particle module over OTA (512-byte chunks, legacy OTA: one round trip
          per chunk), restart and reconnect on its product version.

At most CORRAL_FIRMWARE_MAX_TRANSFERS (default 50) transfers run at once on the server;
--transfers changes it. corral serve and the load generator share the machine's cores.
Every wait is bounded; the server is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx
from _corral import corral_serve, provision_fleet
from _server import free_port, signup_and_login
from bench_particle import cpu_s, proc_cpu_s, provision, wait_online

from corral.device.particle_fleet import ParticleFleet
from corral.device.simulator import Fleet
from corral.firmware.module import build_module
from corral.transports.particle.keys import load_or_create_server_key

PHASE_LIMIT_S = 600.0


async def wait_version(c: httpx.AsyncClient, product: str | int, version: int, n: int,
                       t0: float, within: float) -> float:
    """Seconds from ``t0`` until ``n`` devices of the product report ``version`` (polled
    twice a second)."""
    count = -1
    for _ in range(int(within / 0.5)):
        try:
            r = await c.get(f"/v1/products/{product}/firmware/{version}")
            r.raise_for_status()
        except httpx.TransportError:  # a kept-alive connection the busy server dropped
            await asyncio.sleep(0.5)
            continue
        count = int(r.json().get("device_count") or 0)
        if count >= n:
            return time.perf_counter() - t0
        await asyncio.sleep(0.5)
    raise TimeoutError(f"only {count} of {n} devices run version {version}")


async def upload_release(c: httpx.AsyncClient, product: str | int, version: int,
                         data: bytes) -> float:
    r = await c.post(f"/v1/products/{product}/firmware",
                     data={"version": str(version), "title": f"bench v{version}"},
                     files={"file": ("fw.bin", data, "application/octet-stream")})
    r.raise_for_status()
    t0 = time.perf_counter()
    r = await c.put(f"/v1/products/{product}/firmware/release",
                    json={"version": version, "product_default": True, "intelligent": True})
    r.raise_for_status()
    print(f"  the release request took {time.perf_counter() - t0:.1f} s")
    return t0


async def bench_mqtt(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, corral_serve(
            Path(tmp), database_url=a.database_url, extra_env={
                "CORRAL_FIRMWARE_MAX_TRANSFERS": str(a.transfers),
                "CORRAL_FIRMWARE_DOWNLOAD_CHUNK_BYTES": str(a.chunk),
                "CORRAL_EVENT_RATE_BURST": "100"}) as srv:
        token, product, creds = await provision_fleet(srv.base, a.devices, salt="fw-mqtt")
        fleet = Fleet(creds, "127.0.0.1", srv.mqtt_port, interval=3600.0,
                      connect_concurrency=100, seed=1)
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=srv.base, headers=auth, timeout=120) as c:
            await fleet.start()
            try:
                t = time.perf_counter()
                async with asyncio.timeout(PHASE_LIMIT_S):
                    await fleet.wait_connected()
                print(f"{a.devices:,} MQTT devices connected in {time.perf_counter() - t:.1f} s")
                data = os.urandom(a.size)
                server0, self0 = proc_cpu_s(srv.pid), cpu_s()
                t0 = await upload_release(c, product, 2, data)
                took = await wait_version(c, product, 2, a.devices, t0, PHASE_LIMIT_S)
                print(f"B11 mqtt: {a.size:,} bytes to {a.devices:,} devices: {took:.1f} s "
                      f"from the release ({a.size * a.devices / took / 1e6:.1f} MB/s); "
                      f"applied by the simulators: {fleet.stats.updates_applied:,}; CPU: "
                      f"server {proc_cpu_s(srv.pid) - server0:.1f} s, devices "
                      f"{cpu_s() - self0:.1f} s")
            finally:
                await fleet.stop()


async def bench_particle(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = load_or_create_server_key(Path(tmp)).public_key()
        with corral_serve(Path(tmp), database_url=a.database_url, extra_env={
                "CORRAL_PARTICLE_PORT": str(port), "CORRAL_PARTICLE_UDP_PORT": "0",
                "CORRAL_FIRMWARE_MAX_TRANSFERS": str(a.transfers)}) as srv:
            product_id, devices = await provision(srv.base, a.devices, "fw-particle")
            token = await asyncio.to_thread(signup_and_login, srv.base)
            fleet = ParticleFleet(devices, server, "127.0.0.1", port, interval=3600.0,
                                  product_id=product_id, platform_id=12,
                                  connect_concurrency=50, seed=1)
            auth = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=srv.base, headers=auth, timeout=120) as c:
                await fleet.start()
                try:
                    t = time.perf_counter()
                    async with asyncio.timeout(PHASE_LIMIT_S):
                        await fleet.wait_connected()
                    print(f"{a.devices:,} Particle devices connected in "
                          f"{time.perf_counter() - t:.1f} s")
                    await wait_online(srv.base, token, product_id, lambda n: n >= a.devices,
                                      60)
                    # as Device OS 4+ builds it: the platform ID in the product ID field
                    data = build_module(os.urandom(a.size), platform_id=12,
                                        product_id=12, product_version=2)
                    server0, self0 = proc_cpu_s(srv.pid), cpu_s()
                    t0 = await upload_release(c, product_id, 2, data)
                    took = await wait_version(c, product_id, 2, a.devices, t0,
                                              PHASE_LIMIT_S)
                    print(f"B11 particle: {len(data):,} bytes to {a.devices:,} devices: "
                          f"{took:.1f} s from the release "
                          f"({len(data) * a.devices / took / 1e6:.2f} MB/s); restarted "
                          f"on the new version: {fleet.stats.updates_applied:,}; CPU: "
                          f"server {proc_cpu_s(srv.pid) - server0:.1f} s, devices "
                          f"{cpu_s() - self0:.1f} s")
                finally:
                    await fleet.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=["mqtt", "particle"])
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--size", type=int, default=1_048_576)
    p.add_argument("--transfers", type=int, default=50)
    p.add_argument("--chunk", type=int, default=1_048_576, help="MQTT: Range request size")
    p.add_argument("--database-url", default=None)
    a = p.parse_args()
    if a.which == "mqtt":
        a.devices = a.devices or 1000
        asyncio.run(bench_mqtt(a))
    else:
        a.devices = a.devices or 200
        asyncio.run(bench_particle(a))


if __name__ == "__main__":
    main()
