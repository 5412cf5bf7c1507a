"""B8: device sessions held per process, function-call round trips, SSE delivery lag.

    .venv/bin/python bench/bench_sessions.py held  [--devices 10000]
    .venv/bin/python bench/bench_sessions.py calls [--devices 1000] [--calls 2000] [--concurrency 8]
    .venv/bin/python bench/bench_sessions.py sse   [--devices 1000] [--streams 1000] [--events 100]
    (each takes --database-url for PostgreSQL)

held:  N idle MQTT devices connect to one `corral serve`; the server's RSS before and after
       gives the memory per session; connect rate is reported too.
calls: N devices online (each answers requests at once); `POST /v1/devices/{id}/led` on
       random devices through the REST API, `concurrency` at a time; client-side latency.
sse:   S product event streams (raw sockets, Particle SSE framing); one device publishes
       events carrying their send time; lag = receive time - send time, per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx
from _corral import corral_serve, proc_cpu_s, provision_fleet, rss_kib
from _mqttload import Conn, open_many, reply_to_requests
from _server import percentile


async def connect_fleet(mqtt_port: int, creds: list[tuple[str, str]], *, answer: bool = False,
                        concurrency: int = 100) -> list[Conn]:
    async def one(i: int) -> Conn:
        did, secret = creds[i]
        c = await Conn.open("127.0.0.1", mqtt_port, did, username=did, password=secret)
        if answer:
            c.on_publish = reply_to_requests
            await c.subscribe(f"devices/{did}/requests/+", qos=0)
            await c.publish(f"devices/{did}/describe", json.dumps(
                {"functions": ["led"], "variables": {"t": "double"}}).encode(), qos=1)
        return c

    return await open_many(len(creds), one, concurrency=concurrency)


async def held(srv, n: int) -> None:  # type: ignore[no-untyped-def]
    _tok, _p, creds = await provision_fleet(srv.base, n)
    await asyncio.sleep(1)
    rss0 = rss_kib(srv.pid)
    t = time.perf_counter()
    conns = await connect_fleet(srv.mqtt_port, creds, concurrency=200)
    dt = time.perf_counter() - t
    await asyncio.sleep(3)  # let presence flushes and the online events settle
    rss1 = rss_kib(srv.pid)
    async with httpx.AsyncClient(base_url=srv.base, timeout=30) as c:
        r = await c.get("/healthz")
        assert r.status_code == 200
    print("\n| devices held | connect time | connects/s | server RSS before | after | per session |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {n:,} | {dt:.1f} s | {n / dt:,.0f} | {rss0 / 1024:.0f} MiB | "
          f"{rss1 / 1024:.0f} MiB | {(rss1 - rss0) / n:.1f} KiB |")
    for c in conns:
        await c.close()


async def calls(srv, n: int, total: int, concurrency: int) -> None:  # type: ignore[no-untyped-def]
    tok, product, creds = await provision_fleet(srv.base, n)
    conns = await connect_fleet(srv.mqtt_port, creds, answer=True)
    await asyncio.sleep(1)
    lat: list[float] = []
    errors = 0
    ids = [d for d, _ in creds]
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=srv.base, timeout=30, limits=limits,
                                 headers={"Authorization": f"Bearer {tok}"}) as c:
        async def one() -> None:
            nonlocal errors
            async with sem:
                did = random.choice(ids)
                t = time.perf_counter()
                r = await c.post(f"/v1/devices/{did}/led", json={"arg": "on"})
                if r.status_code == 200 and r.json().get("return_value") == 1:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

        await asyncio.gather(*(one() for _ in range(min(200, total))))  # warm-up
        lat.clear()
        t0, s0 = time.perf_counter(), proc_cpu_s(srv.pid)
        await asyncio.gather(*(one() for _ in range(total)))
        wall, server_cpu = time.perf_counter() - t0, proc_cpu_s(srv.pid) - s0
    print("\n| devices online | calls | concurrency | calls/s | p50 | p99 | server CPU | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {n:,} | {total:,} | {concurrency} | {total / wall:,.0f} | "
          f"{percentile(lat, 50) * 1000:.1f} ms | {percentile(lat, 99) * 1000:.1f} ms | "
          f"{server_cpu / total * 1000:.2f} ms | {errors} |")
    for conn in conns:
        await conn.close()


async def _stream(host: str, port: int, path: str, token: str, lags: list[float],
                  ready: asyncio.Event, counter: list[int], expected: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    got = 0
    name = None
    while got < expected:
        line = await reader.readline()
        if not line:
            break
        if line.startswith(b":ok"):
            counter[0] += 1
            if counter[0] >= counter[1]:
                ready.set()
        elif line.startswith(b"event: "):
            name = line[7:].strip()
        elif line.startswith(b"data: ") and name:
            body = json.loads(line[6:])
            lags.append(time.time() - float(body["data"]))
            got += 1
            name = None
    writer.close()


async def sse(srv, n: int, streams: int, events: int) -> None:  # type: ignore[no-untyped-def]
    tok, product, creds = await provision_fleet(
        srv.base, max(1, n), settings={"event_rate_per_s": 1000, "event_rate_burst": 1000})
    conns = await connect_fleet(srv.mqtt_port, creds)
    host, port = srv.base.removeprefix("http://").split(":")
    lags: list[float] = []
    ready = asyncio.Event()
    counter = [0, streams]
    tasks = [asyncio.create_task(_stream(host, int(port), f"/v1/products/{product}/events/lag",
                                         tok, lags, ready, counter, events))
             for _ in range(streams)]
    await asyncio.wait_for(ready.wait(), 120)
    await asyncio.sleep(0.5)
    device = conns[0]
    did = creds[0][0]
    for _ in range(events):
        await device.publish(f"devices/{did}/events/lag", f"{time.time():.6f}".encode(), qos=1)
        await asyncio.sleep(0.05)
    await asyncio.wait(tasks, timeout=60)
    for t in tasks:
        t.cancel()
    print("\n| streams | events | deliveries | lag p50 | p99 | max |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {streams:,} | {events} | {len(lags):,} of {streams * events:,} | "
          f"{percentile(lags, 50) * 1000:.1f} ms | {percentile(lags, 99) * 1000:.1f} ms | "
          f"{max(lags) * 1000:.1f} ms |")
    for c in conns:
        await c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["held", "calls", "sse"])
    ap.add_argument("--devices", type=int)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--database-url")
    ap.add_argument("--shared", action="store_true",
                    help="server and load generator share every core (runs before "
                         "2026-12-06 09:30 UTC); default: the server on CPU 0, the rest on the "
                         "others, as bench_api_wrk.sh and bench_particle.py")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    pinned = not a.shared and cores >= 2 and shutil.which("taskset") is not None
    if pinned:
        os.sched_setaffinity(0, set(range(1, cores)))
    with tempfile.TemporaryDirectory() as tmp, corral_serve(
            Path(tmp), database_url=a.database_url,
            prefix=["taskset", "-c", "0"] if pinned else None) as srv:
        if a.what == "held":
            asyncio.run(held(srv, a.devices or 10_000))
        elif a.what == "calls":
            asyncio.run(calls(srv, a.devices or 1000, a.calls, a.concurrency))
        else:
            asyncio.run(sse(srv, a.devices or 1000, a.streams, a.events))
    where = ("the server on CPU 0, the load generator on the others" if pinned
             else f"{cores} cores shared by server and load generator")
    print(f"(database: {'PostgreSQL' if a.database_url else 'SQLite'}; {where})")


if __name__ == "__main__":
    main()
