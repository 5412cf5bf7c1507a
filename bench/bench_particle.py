"""B9: the Particle TCP gateway: handshakes, sessions held, a 10,000-device reconnect storm.

    .venv/bin/python bench/bench_particle.py handshakes [--devices 300] [--concurrency 50]
    .venv/bin/python bench/bench_particle.py held  [--devices 5000]
    .venv/bin/python bench/bench_particle.py storm [--devices 10000] [--concurrency 500]
    .venv/bin/python bench/bench_particle.py calls [--devices 20] [--calls 1000]
    (each takes --database-url for PostgreSQL, --no-describe to skip the two describes)

handshakes: the pure crypto of one handshake in-process (server side: RSA-2048 decrypt of
       the device's blob, RSA-1024 encrypt of the session key, RSA-2048 sign; device side:
       RSA-2048 encrypt, RSA-1024 decrypt, verify), then N full device connects against
       `corral serve` (TCP, handshake, Hello, admission, describes), one at a time and
       `concurrency` at a time.
held:  N devices connect and stay; the server's RSS before and after gives memory per session.
calls: N devices online (each answers at once); `POST /v1/devices/{id}/led` and
       `GET /v1/devices/{id}/t` on random devices through the REST API, one at a time, then 8
       and 32 in flight, from keep-alive HTTP/1.1 connections on raw sockets (a client of
       a few µs per request, so the latency is the server's); server CPU per call from
       /proc.
storm: N devices connect as fast as the gateway takes them (at most `concurrency`
       handshakes in flight); then every connection is cut at once and all reconnect: the
       time until all are online again is the reconnect storm.

Device keys (RSA-1024, ~10 ms of CPU each) are made in a process pool once and cached in
/tmp/corral-bench-particle-keys.json for the next runs; all public keys go to the server in
one `POST /v1/products/:product/device_keys`. corral serve and this load generator share
the machine's cores. Every wait is bounded; the server is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import httpx
from _corral import corral_serve, create_product, device_ids, proc_cpu_s, rss_kib
from _server import free_port, percentile, signup_and_login
from cryptography.hazmat.primitives.asymmetric import rsa

from corral.device.particle_fleet import generate_keys, load_device_key, public_pem
from corral.transports.particle import crypto
from corral.transports.particle.device import DeviceClosed, ParticleDevice
from corral.transports.particle.keys import load_or_create_server_key

KEY_CACHE = Path(tempfile.gettempdir()) / "corral-bench-particle-keys.json"
CONNECT_WITHIN_S = 60.0  # one device's connect (queued behind the others included)
PHASE_LIMIT_S = 300.0  # one phase of a benchmark, at most
SETTLE_S = 3.0


def device_keys(n: int) -> list[rsa.RSAPrivateKey]:
    """``n`` RSA-1024 keys, from the cache file (made and added there if missing)."""
    pems: list[str] = []
    if KEY_CACHE.exists():
        pems = json.loads(KEY_CACHE.read_text())
    if len(pems) < n:
        t = time.perf_counter()
        new = generate_keys(n - len(pems))
        print(f"made {len(new):,} RSA-1024 keys in {time.perf_counter() - t:.1f} s "
              f"({os.cpu_count()} processes); cached in {KEY_CACHE}")
        pems += [p.decode() for p in new]
        tmp = KEY_CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(pems))
        tmp.replace(KEY_CACHE)
    return [load_device_key(p) for p in pems[:n]]


async def provision(base: str, n: int, salt: str
                    ) -> tuple[int, list[tuple[str, rsa.RSAPrivateKey]]]:
    """A product (no quarantine, no rate limit in the way) with ``n`` devices and their keys."""
    keys = await asyncio.to_thread(device_keys, n)
    ids = device_ids(n, salt)
    token = await asyncio.to_thread(signup_and_login, base)
    async with httpx.AsyncClient(base_url=base, timeout=300,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        product = await create_product(c, f"Bench {salt}", n, {"quarantine": False})
        r = await c.post(f"/v1/products/{product['slug']}/devices", json={"ids": ids})
        r.raise_for_status()
        t = time.perf_counter()
        r = await c.post(f"/v1/products/{product['slug']}/device_keys", json={"keys": [
            {"device_id": did, "public_key": public_pem(k)} for did, k in zip(ids, keys,
                                                                               strict=True)]})
        r.raise_for_status()
        print(f"registered {n:,} public keys in one request: {time.perf_counter() - t:.1f} s")
    return int(product["id"]), list(zip(ids, keys, strict=True))


def make_device(did: str, key: rsa.RSAPrivateKey, server: rsa.RSAPublicKey, product_id: int,
                describe: bool) -> ParticleDevice:
    return ParticleDevice(did, key, server, product_id=product_id, platform_id=12,
                          functions={"led": lambda a: 1},
                          variables={"t": ("double", lambda: 21.5)},
                          describe_on_connect=describe)


class Connector:
    """Connects devices, at most ``concurrency`` at a time, with a bounded number of retries
    (a connect refused by a full accept queue is retried after a short pause)."""

    def __init__(self, port: int, server: rsa.RSAPublicKey, product_id: int, *,
                 concurrency: int, describe: bool) -> None:
        self.port = port
        self.server = server
        self.product_id = product_id
        self.limit = asyncio.Semaphore(concurrency)
        self.describe = describe
        self.latencies: list[float] = []
        self.retries = 0
        self.retry_reasons: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    async def connect(self, did: str, key: rsa.RSAPrivateKey) -> ParticleDevice | None:
        for _attempt in range(5):
            dev = make_device(did, key, self.server, self.product_id, self.describe)
            async with self.limit:
                t = time.perf_counter()
                try:
                    await dev.connect("127.0.0.1", self.port, within=CONNECT_WITHIN_S)
                except (OSError, EOFError, TimeoutError, DeviceClosed) as exc:
                    await dev.close()
                    self.retries += 1
                    last = repr(exc)
                    self.retry_reasons[type(exc).__name__ + ": " + str(exc)[:60]] += 1
                    await asyncio.sleep(0.2)
                    continue
                self.latencies.append(time.perf_counter() - t)
                return dev
        self.failures.append(f"{did}: {last}")
        return None

    async def connect_all(self, fleet: list[tuple[str, rsa.RSAPrivateKey]]
                          ) -> list[ParticleDevice]:
        async with asyncio.timeout(PHASE_LIMIT_S):
            got = await asyncio.gather(*(self.connect(d, k) for d, k in fleet))
        return [d for d in got if d is not None]


async def close_all(devices: list[ParticleDevice], *, goodbye: bool = True) -> None:
    async with asyncio.timeout(60):
        await asyncio.gather(*((d.goodbye() if goodbye else d.close()) for d in devices),
                             return_exceptions=True)


async def online_count(base: str, token: str, product_id: int) -> int:
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        r = await c.get(f"/v1/products/{product_id}/devices",
                        params={"per_page": 1, "online": "true"})
        r.raise_for_status()
        return int(r.json()["meta"]["total"])


async def wait_online(base: str, token: str, product_id: int, done: Callable[[int], bool],
                      within: float) -> int:
    """Poll the online count until ``done(count)`` (at most ``within`` seconds)."""
    count = -1
    for _ in range(int(within / 0.25)):
        count = await online_count(base, token, product_id)
        if done(count):
            return count
        await asyncio.sleep(0.25)
    raise TimeoutError(f"online count stuck at {count}")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RawHTTP:
    """One keep-alive HTTP/1.1 connection: a request, its answer (Content-Length bodies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 head: bytes) -> None:
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def open(cls, base: str, token: str) -> RawHTTP:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"Host: {host}\r\nAuthorization: Bearer {token}\r\n"
                   .encode())

    async def send(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        extra = (b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
                 if body else b"")
        self.writer.write(f"{method} {path} HTTP/1.1\r\n".encode() + self.head + extra
                          + b"\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def timed(client: RawHTTP, count: int, method: str, paths: list[str], body: bytes,
                lat: list[float], errors: list[int], rnd: random.Random) -> None:
    """``count`` requests to random ``paths``; latencies of the 200s, the other statuses."""
    for _ in range(count):
        t = time.perf_counter()
        status, answer = await client.send(method, rnd.choice(paths), body)
        if status == 200 and answer:
            lat.append(time.perf_counter() - t)
        else:
            errors.append(status)


async def calls(srv: Any, port: int, server: rsa.RSAPublicKey, n: int, concurrency: int,
                describe: bool, total: int = 1000) -> None:
    product_id, fleet = await provision(srv.base, n, "calls")
    token = await asyncio.to_thread(signup_and_login, srv.base)
    conn = Connector(port, server, product_id, concurrency=50, describe=True)
    devices = await conn.connect_all(fleet)
    await asyncio.sleep(SETTLE_S)
    ids = [d.device_id for d in devices]
    rows = []
    rnd = random.Random(1)
    for what, method, suffix, body in (("function call", "POST", "led", b'{"arg":"on"}'),
                                       ("variable read", "GET", "t", b"")):
        for conc in (1, 8, 32):
            clients = [await RawHTTP.open(srv.base, token) for _ in range(conc)]
            lat: list[float] = []
            errors: list[int] = []
            paths = [f"/v1/devices/{d}/{suffix}" for d in ids]

            async with asyncio.timeout(PHASE_LIMIT_S):
                await asyncio.gather(*(timed(c, 100 // conc + 1, method, paths, body, lat,
                                             errors, rnd) for c in clients))  # warm-up
                lat.clear()
                errors.clear()
                s0 = proc_cpu_s(srv.pid)
                t = time.perf_counter()
                await asyncio.gather(*(timed(c, total // conc, method, paths, body, lat, errors,
                                             rnd) for c in clients))
                wall = time.perf_counter() - t
            server_cpu = proc_cpu_s(srv.pid) - s0
            for c in clients:
                c.close()
            rows.append((what, conc, len(lat), wall, lat, server_cpu, len(errors)))
    print("\n| request | in flight | requests | req/s | p50 | p99 | server CPU | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for what, conc, ok, wall, lat, server_cpu, errors in rows:
        print(f"| {what} | {conc} | {ok:,} | {ok / wall:,.0f} | "
              f"{percentile(lat, 50) * 1000:.1f} ms | {percentile(lat, 99) * 1000:.1f} ms | "
              f"{server_cpu / max(ok, 1) * 1000:.2f} ms | {errors} |")
    await close_all(devices)


# --- the benchmarks -------------------------------------------------------------------------

def crypto_reference(rounds: int = 300) -> None:
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_pub = server_key.public_key()
    [dev_key] = device_keys(1)
    did = "0123456789abcdef01234567"
    server_t: list[float] = []
    device_t: list[float] = []
    for _ in range(rounds):
        nonce = crypto.new_nonce()
        t0 = time.perf_counter()
        blob = crypto.device_blob(server_pub, nonce, did, dev_key)
        t1 = time.perf_counter()
        _id, der = crypto.open_device_blob(server_key, nonce, blob)
        sent = crypto.load_device_public_key(der)
        creds = crypto.new_session_creds()
        reply = crypto.server_reply(server_key, sent, creds)
        t2 = time.perf_counter()
        crypto.open_server_reply(dev_key, server_pub, reply)
        t3 = time.perf_counter()
        server_t.append(t2 - t1)
        device_t.append((t1 - t0) + (t3 - t2))
    print("\n| in-process crypto, per handshake | median | p99 | per core |")
    print("|---|---:|---:|---:|")
    for name, ts in (("server (decrypt 2048, encrypt 1024, sign 2048)", server_t),
                     ("device (encrypt 2048, decrypt 1024, verify 2048)", device_t)):
        med = percentile(ts, 50)
        print(f"| {name} | {med * 1000:.2f} ms | {percentile(ts, 99) * 1000:.2f} ms | "
              f"{1 / med:,.0f}/s |")


async def handshakes(srv: Any, port: int, server: rsa.RSAPublicKey, n: int, concurrency: int,
                     describe: bool) -> None:
    product_id, fleet = await provision(srv.base, n, "handshakes")
    rows = []
    for label, conc in (("sequential", 1), (f"{concurrency} at a time", concurrency)):
        conn = Connector(port, server, product_id, concurrency=conc, describe=describe)
        c0, s0 = cpu_s(), proc_cpu_s(srv.pid)
        t = time.perf_counter()
        if conc == 1:  # each connects, then says goodbye, before the next one
            async with asyncio.timeout(PHASE_LIMIT_S):
                for did, key in fleet:
                    dev = await conn.connect(did, key)
                    if dev is not None:
                        await dev.goodbye()
            devices: list[ParticleDevice] = []
        else:
            devices = await conn.connect_all(fleet)
        wall = time.perf_counter() - t
        rows.append((label, len(conn.latencies), wall, conn, cpu_s() - c0,
                     proc_cpu_s(srv.pid) - s0))
        await close_all(devices)
        await asyncio.sleep(SETTLE_S)
    print("\n| connects | devices | wall | connects/s | latency p50 | p99 | server CPU | "
          "client CPU | retries |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, ok, wall, conn, client_cpu, server_cpu in rows:
        print(f"| {label} | {ok:,} | {wall:.1f} s | {ok / wall:,.0f} | "
              f"{percentile(conn.latencies, 50) * 1000:.1f} ms | "
              f"{percentile(conn.latencies, 99) * 1000:.1f} ms | "
              f"{server_cpu / max(ok, 1) * 1000:.2f} ms/conn | "
              f"{client_cpu / max(ok, 1) * 1000:.2f} ms/conn | {conn.retries} |")


async def held(srv: Any, port: int, server: rsa.RSAPublicKey, n: int, concurrency: int,
               describe: bool) -> None:
    product_id, fleet = await provision(srv.base, n, "held")
    await asyncio.sleep(1)
    rss0 = rss_kib(srv.pid)
    conn = Connector(port, server, product_id, concurrency=concurrency, describe=describe)
    t = time.perf_counter()
    devices = await conn.connect_all(fleet)
    dt = time.perf_counter() - t
    await asyncio.sleep(SETTLE_S)
    rss1 = rss_kib(srv.pid)
    print("\n| devices held | connect time | connects/s | server RSS before | after | "
          "per session | failed |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(devices):,} | {dt:.1f} s | {len(devices) / dt:,.0f} | {rss0 / 1024:.0f} MiB | "
          f"{rss1 / 1024:.0f} MiB | {(rss1 - rss0) / max(len(devices), 1):.1f} KiB | "
          f"{len(conn.failures)} |")
    await close_all(devices)


async def storm(srv: Any, port: int, server: rsa.RSAPublicKey, n: int, concurrency: int,
                describe: bool) -> None:
    product_id, fleet = await provision(srv.base, n, "storm")
    token = await asyncio.to_thread(signup_and_login, srv.base)  # the same user: logs in again
    rows = []
    devices: list[ParticleDevice] = []
    for phase in ("first connect", "reconnect after a cut"):
        if devices:  # cut every connection at once (no Goodbye), as a network outage would
            await close_all(devices, goodbye=False)
            await wait_online(srv.base, token, product_id, lambda k: k == 0, 120)
        conn = Connector(port, server, product_id, concurrency=concurrency, describe=describe)
        c0, s0 = cpu_s(), proc_cpu_s(srv.pid)
        t = time.perf_counter()
        devices = await conn.connect_all(fleet)
        wall = time.perf_counter() - t
        client_cpu, server_cpu = cpu_s() - c0, proc_cpu_s(srv.pid) - s0
        want = len(devices)  # the presence batches have landed
        online = await wait_online(srv.base, token, product_id, lambda k, w=want: k >= w, 60)
        rows.append((phase, len(devices), wall, conn, client_cpu, server_cpu, online))
        await asyncio.sleep(SETTLE_S)
    print("\n| phase | devices connected | time | connects/s | latency p50 | p99 | "
          "server CPU | client CPU | retries | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase, ok, wall, conn, client_cpu, server_cpu, _online in rows:
        print(f"| {phase} | {ok:,} of {n:,} | **{wall:.1f} s** | {ok / wall:,.0f} | "
              f"{percentile(conn.latencies, 50) * 1000:.0f} ms | "
              f"{percentile(conn.latencies, 99) * 1000:.0f} ms | {server_cpu:.1f} s | "
              f"{client_cpu:.1f} s | {conn.retries} | {len(conn.failures)} |")
    for phase, _ok, _wall, conn, *_ in rows:
        if conn.retry_reasons:
            print(f"retries in '{phase}':", dict(conn.retry_reasons.most_common(5)))
    await close_all(devices)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["handshakes", "held", "storm", "calls"])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--devices", type=int)
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--no-describe", action="store_true")
    ap.add_argument("--database-url")
    ap.add_argument("--max-handshakes", type=int, help="the server's particle_max_handshakes")
    ap.add_argument("--shared", action="store_true",
                    help="server and load generator share every core (the way before "
                         "2026-12-06 07:00 UTC); by default the server has CPU 0 to itself "
                         "and the devices and clients run on the others")
    a = ap.parse_args()
    defaults = {"handshakes": (300, 50), "held": (5000, 200), "storm": (10_000, 500),
                "calls": (20, 1)}
    n = a.devices or defaults[a.what][0]
    concurrency = a.concurrency or defaults[a.what][1]
    describe = not a.no_describe
    if a.what == "handshakes":
        crypto_reference()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10k sockets need >10k files
    port = free_port()
    cores = os.cpu_count() or 1
    pinned = not a.shared and cores >= 2 and shutil.which("taskset") is not None
    if pinned:  # one server process on a core of its own, as bench_api_wrk.sh
        os.sched_setaffinity(0, set(range(1, cores)))
    with tempfile.TemporaryDirectory() as tmp:
        server = load_or_create_server_key(Path(tmp)).public_key()
        with corral_serve(Path(tmp), database_url=a.database_url,
                          prefix=["taskset", "-c", "0"] if pinned else None, extra_env={
                "CORRAL_PARTICLE_PORT": str(port), "CORRAL_PARTICLE_UDP_PORT": "0",
                **({"CORRAL_PARTICLE_MAX_HANDSHAKES": str(a.max_handshakes)}
                   if a.max_handshakes else {})}) as srv:
            if a.what == "calls":
                asyncio.run(calls(srv, port, server, n, concurrency, describe, a.calls))
            else:
                run = {"handshakes": handshakes, "held": held, "storm": storm}[a.what]
                asyncio.run(run(srv, port, server, n, concurrency, describe))
    where = ("the server on CPU 0, the load generator on the others" if pinned
             else f"{cores} cores shared by server and load generator")
    print(f"(database: {'PostgreSQL' if a.database_url else 'SQLite'}; "
          f"describes: {'yes' if describe else 'no'}; {where})")


if __name__ == "__main__":
    main()
