"""B12: corral scaled out on one machine: 1, 2 and 3 processes (`corral serve --workers N`,
PostgreSQL + NATS, the ports shared with SO_REUSEPORT), side by side with raw Mosquitto in
the same run.

    .venv/bin/python bench/bench_scale.py ingest --procs 1 2 3 [--devices 1000] [--seconds 10]
    .venv/bin/python bench/bench_scale.py api    --procs 1 2 3 [--seconds 8]      (needs wrk)
    .venv/bin/python bench/bench_scale.py calls  [--calls 500]
    .venv/bin/python bench/bench_scale.py sse    --procs 1 3 [--streams 1000] [--events 100]
    (each takes --database-url, default postgresql+asyncpg://postgres@127.0.0.1:5432/corral_bench,
     whose public schema is recreated per run, and --nats-url, default nats://127.0.0.1:4222)

ingest: B7's durable QoS 1 ingest (bench_mqtt_ingest.py: same load generator, window and
        warm-up) against a private Mosquitto, then against N corral processes on one port.
api:    B1's wrk load (`GET /healthz`, `GET /v1/user`) against N processes on one port.
calls:  B8's sequential function calls, the device on node A: through a single node with
        the in-process bus, through node A itself (NATS bus), and through node B (another
        process: the request crosses NATS to A and back).
sse:    B8's SSE lag: S product streams and one publishing device; with N processes the
        kernel spreads the streams (and the device) over them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx
from _corral import Corral, corral_serve, private_mosquitto, provision_fleet
from _server import percentile, signup_and_login
from bench_mqtt_ingest import corral_run, mosquitto_run
from bench_sessions import connect_fleet, sse
from sqlalchemy import text
from sqlalchemy.engine import make_url

from corral.db.engine import make_engine

DEFAULT_DB = "postgresql+asyncpg://postgres@127.0.0.1:5432/corral_bench"
DEFAULT_NATS = "nats://127.0.0.1:4222"


async def _fresh(url: str) -> None:
    """Create the bench's database when it is missing, then recreate its public schema."""
    name = make_url(url).database
    admin = make_engine(make_url(url).set(database="postgres").render_as_string(
        hide_password=False), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            if not (await conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                       {"n": name})).first():
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    finally:
        await engine.dispose()


async def _live_nodes(url: str) -> int:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text(
                "SELECT count(*) FROM nodes WHERE stopped_at IS NULL"))).scalar() or 0)
    finally:
        await engine.dispose()


@contextlib.contextmanager
def scaled(procs: int, db_url: str, nats_url: str, *, role: str = "all",
           fresh: bool = True) -> Iterator[Corral]:
    """``corral serve --workers procs`` on PostgreSQL + NATS (own namespace), free ports;
    ready when every process registered as a node."""
    if fresh:
        asyncio.run(_fresh(db_url))
    with tempfile.TemporaryDirectory() as tmp, corral_serve(
            Path(tmp), database_url=db_url,
            extra_env={"CORRAL_BUS_NAMESPACE": os.environ.get("BENCH_NS", "bench")},
            extra_args=["--particle-port", "0", "--particle-udp-port", "0", "--bus-url", nats_url, "--workers",
                        str(procs), "--role", role], start_timeout_s=180) as srv:
        deadline = time.monotonic() + 180
        while asyncio.run(_live_nodes(db_url)) < procs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{procs} processes did not all start within 180 s")
            time.sleep(0.3)
        yield srv


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ingest(a: argparse.Namespace) -> None:
    rows = []
    with private_mosquitto() as port:
        mosq = asyncio.run(mosquitto_run(port, a.devices, a.seconds, a.window))
    print(f"Mosquitto pub->sub QoS 1: {mosq:,.0f} msg/s (load {load_average()})", flush=True)
    for n in a.procs:
        with scaled(n, a.database_url, a.nats_url) as srv:
            res = asyncio.run(corral_run(srv.base, srv.mqtt_port, srv.pid, srv.database_url,
                                         a.devices, a.seconds, a.window))
        rows.append((n, res, load_average()))
        print(f"{n} process(es): {res['rate']:,.0f} acks/s (load {rows[-1][2]})", flush=True)
    one = rows[0][1]["rate"]
    print(f"\n{a.devices} devices, window {a.window}, {a.seconds:.0f} s measured\n")
    print("| target | QoS 1 msg/s | vs 1 process | vs Mosquitto | ack p50 / p99 | acked = stored | load avg |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| Mosquitto 2.0 pub->sub | {mosq:,.0f} | - | 1.00 | - | - | |")
    for n, res, load in rows:
        print(f"| corral, {n} process{'es' if n > 1 else ''} | {res['rate']:,.0f} | "
              f"{res['rate'] / one:.2f} | {res['rate'] / mosq:.2f} | "
              f"{res['p50_ms']:.0f} / {res['p99_ms']:.0f} ms | "
              f"{res['stored'] >= res['acked']} ({res['acked']:,}) | {load} |")


def _wrk(url: str, token: str, seconds: int, conns: int) -> tuple[float, str, str]:
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "-H",
                          f"Authorization: Bearer {token}", url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"\s50%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"\s99%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    return rps, p50, p99


def api(a: argparse.Namespace) -> None:
    print("| processes | route | req/s | vs 1 process | p50 | p99 | load avg |")
    print("|---:|---|---:|---:|---:|---:|---|")
    first: dict[str, float] = {}
    for n in a.procs:
        with scaled(n, a.database_url, a.nats_url) as srv:
            token = signup_and_login(srv.base, f"wrk{secrets.token_hex(3)}@example.com")
            for path in ("/healthz", "/v1/user"):
                rps, p50, p99 = _wrk(srv.base + path, token, a.seconds, a.connections)
                first.setdefault(path, rps)
                print(f"| {n} | `GET {path}` | {rps:,.0f} | {rps / first[path]:.2f} | {p50} | "
                      f"{p99} | {load_average()} |", flush=True)


async def _timed_calls(base: str, token: str, device_id: str, n: int) -> list[float]:
    lat = []
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        for i in range(n + 50):
            t = time.perf_counter()
            r = await c.post(f"/v1/devices/{device_id}/led", json={"arg": "on"})
            if r.status_code != 200:
                raise RuntimeError(f"call failed: {r.status_code} {r.text}")
            if i >= 50:  # warm-up
                lat.append(time.perf_counter() - t)
    return lat


async def _calls_on(bases: list[str], mqtt_port: int, n: int) -> list[list[float]]:
    tok, _product, creds = await provision_fleet(bases[0], 1)
    conns = await connect_fleet(mqtt_port, creds, answer=True)
    await asyncio.sleep(1.5)
    try:
        return [await _timed_calls(b, tok, creds[0][0], n) for b in bases]
    finally:
        for c in conns:
            await c.close()


def calls(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_fresh(a.database_url))
        with corral_serve(Path(tmp), database_url=a.database_url) as single:
            [alone] = asyncio.run(_calls_on([single.base], single.mqtt_port, a.calls))
    with scaled(1, a.database_url, a.nats_url) as node_a, \
            scaled(1, a.database_url, a.nats_url, role="api", fresh=False) as node_b:
        local, remote = asyncio.run(_calls_on([node_a.base, node_b.base], node_a.mqtt_port,
                                              a.calls))
    print(f"\n{a.calls} sequential calls each, `POST /v1/devices/{{id}}/led`, device over MQTT "
          f"(load {load_average()})\n")
    print("| path | p50 | p99 | p50 vs single node |")
    print("|---|---:|---:|---:|")
    base50 = percentile(alone, 50)
    for name, lat in (("single node, in-process bus", alone),
                      ("node A (holds the device), NATS bus", local),
                      ("node B -> NATS -> node A (cross-node)", remote)):
        print(f"| {name} | {percentile(lat, 50) * 1e3:.2f} ms | {percentile(lat, 99) * 1e3:.2f} ms"
              f" | {(percentile(lat, 50) - base50) * 1e3:+.2f} ms |")


def sse_lag(a: argparse.Namespace) -> None:
    for n in a.procs:
        with scaled(n, a.database_url, a.nats_url) as srv:
            print(f"\n{n} process(es) (load {load_average()}):")
            asyncio.run(sse(srv, 1, a.streams, a.events))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["ingest", "api", "calls", "sse"])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--database-url", default=DEFAULT_DB)
    ap.add_argument("--nats-url", default=DEFAULT_NATS)
    a = ap.parse_args()
    os.environ.setdefault("BENCH_NS", f"bench{secrets.token_hex(4)}")
    print(f"load average before: {load_average()}", flush=True)
    {"ingest": ingest, "api": api, "calls": calls, "sse": sse_lag}[a.what](a)


if __name__ == "__main__":
    main()
