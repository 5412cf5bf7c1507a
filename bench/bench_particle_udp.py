"""B14: the Gen 3 gateway (DTLS 1.2 over UDP): handshakes, sessions held, a 10,000-device
reconnect storm after a restart.

    .venv/bin/python bench/bench_particle_udp.py handshakes [--devices 300] [--concurrency 50]
    .venv/bin/python bench/bench_particle_udp.py held  [--devices 5000]
    .venv/bin/python bench/bench_particle_udp.py storm [--devices 10000] [--concurrency 500]
    (each takes --database-url for PostgreSQL, --no-describe to skip the two describes)

handshakes: the pure crypto of one DTLS handshake in-process (server: ECDHE keygen, ECDSA sign,
       ECDH, ECDSA verify of CertificateVerify; device: verify, keygen, ECDH, sign), then N
       full device connects against `corral serve` (cookie exchange, handshake, Hello,
       admission, describes), one at a time and `concurrency` at a time.
held:  N devices connect and stay; the server's RSS before and after gives memory per session.
storm: N devices connect (full handshakes, at most `concurrency` at a time); then corral
       serve is restarted (SIGTERM: the sessions are stored) and every device resumes its
       session from a new source port with no handshake and no Hello, as Device OS does
       after a ping timeout: the time until all are online again; then every device loses
       its session and does a full handshake again (the worst case: a crash before the
       sessions were stored, or devices that rebooted).

Device keys are P-256 (cheap: made on the spot); all public keys go to the server in one
`POST /v1/products/:product/device_keys`. corral serve and this load generator share the
machine's cores. Every wait is bounded; the server is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_particle
import httpx
from _corral import corral_serve, create_product, device_ids, rss_kib
from _server import free_port, percentile, signup_and_login
from bench_particle import close_all, cpu_s, proc_cpu_s, wait_online
from cryptography.hazmat.primitives.asymmetric import ec

from corral.transports.particle import dtls
from corral.transports.particle.device import DeviceClosed
from corral.transports.particle.keys import load_or_create_udp_server_key, public_pem
from corral.transports.particle.udp_device import ParticleUdpDevice

CONNECT_WITHIN_S = 60.0
PHASE_LIMIT_S = 300.0
SETTLE_S = 3.0


async def provision(base: str, n: int, salt: str
                    ) -> tuple[int, list[tuple[str, ec.EllipticCurvePrivateKey]]]:
    """A product (no quarantine) with ``n`` devices and their P-256 keys registered."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(n)]
    ids = device_ids(n, salt)
    token = await asyncio.to_thread(signup_and_login, base)
    async with httpx.AsyncClient(base_url=base, timeout=300,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        product = await create_product(c, f"Bench {salt}", n, {"quarantine": False})
        r = await c.post(f"/v1/products/{product['slug']}/devices", json={"ids": ids})
        r.raise_for_status()
        r = await c.post(f"/v1/products/{product['slug']}/device_keys", json={"keys": [
            {"device_id": did, "public_key": public_pem(k.public_key())}
            for did, k in zip(ids, keys, strict=True)]})
        r.raise_for_status()
    return int(product["id"]), list(zip(ids, keys, strict=True))


class Connector(bench_particle.Connector):
    """Connects (or resumes) Gen 3 devices, at most ``concurrency`` at a time, a few retries
    (bench_particle's connector, with UDP devices)."""

    def make(self, did: str, key: ec.EllipticCurvePrivateKey) -> ParticleUdpDevice:
        return ParticleUdpDevice(did, key, self.server, product_id=self.product_id,
                                 functions={"led": lambda a: 1},
                                 variables={"t": ("double", lambda: 21.5)},
                                 describe_on_connect=self.describe)

    async def connect(self, dev: ParticleUdpDevice, *,  # type: ignore[override]
                      resume: bool = False) -> ParticleUdpDevice | None:
        last = ""
        for _attempt in range(5):
            async with self.limit:
                t = time.perf_counter()
                try:
                    if resume and dev.dtls is not None:
                        await dev.resume("127.0.0.1", self.port, within=CONNECT_WITHIN_S)
                    else:
                        await dev.connect("127.0.0.1", self.port, within=CONNECT_WITHIN_S)
                except (OSError, TimeoutError, DeviceClosed, dtls.DtlsError) as exc:
                    await dev.close()
                    self.retries += 1
                    last = repr(exc)
                    self.retry_reasons[type(exc).__name__ + ": " + str(exc)[:60]] += 1
                    await asyncio.sleep(0.2)
                    continue
                self.latencies.append(time.perf_counter() - t)
                return dev
        self.failures.append(f"{dev.device_id}: {last}")
        return None

    async def run(self, devices: list[ParticleUdpDevice], *, resume: bool = False
                  ) -> list[ParticleUdpDevice]:
        async with asyncio.timeout(PHASE_LIMIT_S):
            got = await asyncio.gather(*(self.connect(d, resume=resume) for d in devices))
        return [d for d in got if d is not None]


def crypto_reference(rounds: int = 300) -> None:
    """The pure crypto of one DTLS handshake, server side and device side, in-process."""
    server_key = ec.generate_private_key(ec.SECP256R1())
    device_key = ec.generate_private_key(ec.SECP256R1())
    server_t: list[float] = []
    device_t: list[float] = []
    for _ in range(rounds):
        client = dtls.ClientHandshake(device_key, server_key.public_key())
        t0 = time.perf_counter()
        hello = client.start()
        t1 = time.perf_counter()
        server = dtls.ServerHandshake(server_key, *dtls.first_client_hello(hello))
        t2 = time.perf_counter()
        flight = client.receive(server.flight)[0]
        t3 = time.perf_counter()
        finished = server.receive(flight)[0]
        t4 = time.perf_counter()
        client.receive(finished)
        t5 = time.perf_counter()
        server_t.append((t2 - t1) + (t4 - t3))
        device_t.append((t1 - t0) + (t3 - t2) + (t5 - t4))
    print("\n| side | median | p99 | per core |")
    print("|---|---:|---:|---:|")
    for side, ts in (("server (keygen, sign, ECDH, verify, PRF, CCM)", server_t),
                     ("device (verify, keygen, ECDH, sign, PRF, CCM)", device_t)):
        med = percentile(ts, 50)
        print(f"| {side} | {med * 1000:.2f} ms | {percentile(ts, 99) * 1000:.2f} ms | "
              f"{1 / med:,.0f}/s |")


def table(rows: list[tuple[Any, ...]], n: int) -> None:
    print("\n| phase | devices | time | per s | latency p50 | p99 | server CPU | client CPU "
          "| retries | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase, ok, wall, conn, client_cpu, server_cpu in rows:
        print(f"| {phase} | {ok:,} of {n:,} | **{wall:.1f} s** | {ok / wall:,.0f} | "
              f"{percentile(conn.latencies, 50) * 1000:.0f} ms | "
              f"{percentile(conn.latencies, 99) * 1000:.0f} ms | {server_cpu:.1f} s | "
              f"{client_cpu:.1f} s | {conn.retries} | {len(conn.failures)} |")
    for phase, _ok, _wall, conn, *_ in rows:
        if conn.retry_reasons:
            print(f"retries in '{phase}':", dict(conn.retry_reasons.most_common(5)))


async def handshakes(start: Any, n: int, concurrency: int, describe: bool) -> None:
    async with start() as (srv, port, server):
        product_id, fleet = await provision(srv.base, n, "udp-handshakes")
        rows = []
        for label, conc in (("sequential", 1), (f"{concurrency} at a time", concurrency)):
            conn = Connector(port, server, product_id, concurrency=conc, describe=describe)
            devices = [conn.make(did, key) for did, key in fleet]
            c0, s0 = cpu_s(), proc_cpu_s(srv.pid)
            t = time.perf_counter()
            if conc == 1:
                for dev in devices:
                    if await conn.connect(dev) is not None:
                        await dev.goodbye()
                up: list[ParticleUdpDevice] = []
            else:
                up = await conn.run(devices)
            wall = time.perf_counter() - t
            rows.append((label, len(conn.latencies), wall, conn, cpu_s() - c0,
                         proc_cpu_s(srv.pid) - s0))
            await close_all(up)  # type: ignore[arg-type]
            await asyncio.sleep(SETTLE_S)
        table(rows, n)


async def held(start: Any, n: int, concurrency: int, describe: bool) -> None:
    async with start() as (srv, port, server):
        product_id, fleet = await provision(srv.base, n, "udp-held")
        await asyncio.sleep(1)
        rss0 = rss_kib(srv.pid)
        conn = Connector(port, server, product_id, concurrency=concurrency, describe=describe)
        t = time.perf_counter()
        devices = await conn.run([conn.make(did, key) for did, key in fleet])
        dt = time.perf_counter() - t
        await asyncio.sleep(SETTLE_S)
        rss1 = rss_kib(srv.pid)
        print("\n| devices held | connect time | connects/s | server RSS before | after | "
              "per session | failed |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {len(devices):,} | {dt:.1f} s | {len(devices) / dt:,.0f} | "
              f"{rss0 / 1024:.0f} MiB | {rss1 / 1024:.0f} MiB | "
              f"{(rss1 - rss0) / max(len(devices), 1):.1f} KiB | {len(conn.failures)} |")
        await close_all(devices)  # type: ignore[arg-type]


async def storm(start: Any, n: int, concurrency: int, describe: bool) -> None:
    rows = []
    async with start() as (srv, port, server):
        product_id, fleet = await provision(srv.base, n, "udp-storm")
        conn = Connector(port, server, product_id, concurrency=concurrency, describe=describe)
        devices = [conn.make(did, key) for did, key in fleet]
        c0, s0 = cpu_s(), proc_cpu_s(srv.pid)
        t = time.perf_counter()
        up = await conn.run(devices)
        rows.append(("first connect (full handshakes)", len(up), time.perf_counter() - t, conn,
                     cpu_s() - c0, proc_cpu_s(srv.pid) - s0))
        print(f"first connect: devices resent {sum(d.resent for d in up)} CoAP message(s) "
              f"and {sum(d.handshake_resent for d in up)} handshake flight(s)")
        for dev in up:  # the devices stop reading; their sessions stay
            await dev._stop_reading()
    for phase, resume in (("resume after a restart (no handshake)", True),
                          ("full handshakes again (sessions lost)", False)):
        async with start() as (srv, port, server):
            token = await asyncio.to_thread(signup_and_login, srv.base)
            if not resume:
                for dev in up:
                    await dev.close()
                    dev.dtls = None
            conn = Connector(port, server, product_id, concurrency=concurrency,
                             describe=describe)
            c0, s0 = cpu_s(), proc_cpu_s(srv.pid)
            t = time.perf_counter()
            again = await conn.run(up, resume=resume)
            await wait_online(srv.base, token, product_id, lambda k, w=len(again): k >= w, 120)
            rows.append((phase, len(again), time.perf_counter() - t, conn, cpu_s() - c0,
                         proc_cpu_s(srv.pid) - s0))
            if resume:
                handshook = sum(d.full_handshakes > 1 for d in again)
                print(f"{phase}: {handshook} device(s) needed a handshake")
            print(f"{phase}: devices resent {sum(d.resent for d in up)} CoAP message(s) and "
                  f"{sum(d.handshake_resent for d in up)} handshake flight(s) in all so far")
            for dev in again:
                await dev._stop_reading()
    table(rows, n)
    for dev in up:
        await dev.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["handshakes", "held", "storm"])
    ap.add_argument("--devices", type=int)
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--no-describe", action="store_true")
    ap.add_argument("--database-url")
    a = ap.parse_args()
    defaults = {"handshakes": (300, 50), "held": (5000, 200), "storm": (10_000, 500)}
    n = a.devices or defaults[a.what][0]
    concurrency = a.concurrency or defaults[a.what][1]
    describe = not a.no_describe
    if a.what == "handshakes":
        crypto_reference()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per device
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = load_or_create_udp_server_key(Path(tmp)).public_key()

        class Start:
            """corral serve on the same data directory and UDP port, as often as asked."""

            def __init__(self) -> None:
                self.cm: Any = None

            async def __aenter__(self) -> tuple[Any, int, ec.EllipticCurvePublicKey]:
                self.cm = corral_serve(Path(tmp), database_url=a.database_url, extra_env={
                    "CORRAL_PARTICLE_PORT": "0", "CORRAL_PARTICLE_UDP_PORT": str(port),
                    # every simulated device comes from 127.0.0.1: lift the per-address cap
                    "CORRAL_PARTICLE_UDP_MAX_HANDSHAKES_PER_ADDRESS": "4096"})
                srv = await asyncio.to_thread(self.cm.__enter__)
                return srv, port, server

            async def __aexit__(self, *exc: object) -> None:
                await asyncio.to_thread(self.cm.__exit__, None, None, None)

        run = {"handshakes": handshakes, "held": held, "storm": storm}[a.what]
        asyncio.run(run(Start, n, concurrency, describe))
    print(f"(database: {'PostgreSQL' if a.database_url else 'SQLite'}; "
          f"describes: {'yes' if describe else 'no'}; {os.cpu_count()} cores shared by "
          "server and load generator)")


if __name__ == "__main__":
    main()
