"""B7: durable QoS 1 ingest with 1,000 devices, corral vs Mosquitto, in the same run.

Mosquitto (a private instance, queues lifted so nothing is dropped): 1,000 publishers send
QoS 1 messages and one QoS 1 subscriber receives them; the figure is messages received by
the subscriber per second (pub->sub). corral: 1,000 devices publish QoS 1 events; the
figure is PUBACKs per second, and corral sends a PUBACK only after the event row (and its
usage increment) is committed. Both use the same load generator (bench/_mqttload.py) with
the same window of in-flight messages per connection.

The product's rate limit is lifted for the run (its setting ``event_rate_per_s``): the
default (1 event/s per device) would cap 1,000 devices at 1,000 events/s.

    .venv/bin/python bench/bench_mqtt_ingest.py [--devices 1000] [--seconds 10] [--window 4]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/corral_bench]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _corral import corral_serve, private_mosquitto, provision_fleet, rss_kib
from _mqttload import MQTT_311, Conn, open_many
from _server import percentile
from sqlalchemy import text

from corral.db.engine import make_engine

PAYLOAD = b'{"t":21.5,"h":40}'


async def drive(conns: list[Conn], topics: list[str], seconds: float, warmup: float,
                counter: callable) -> tuple[float, int]:  # type: ignore[valid-type]
    """Publish QoS 1 on every connection for warmup+seconds; the counter's rate in the
    measured window."""
    stop = asyncio.Event()

    async def loop(c: Conn, topic: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not stop.is_set():
                await c.publish(topic, PAYLOAD, qos=1)

    tasks = [asyncio.create_task(loop(c, t)) for c, t in zip(conns, topics, strict=True)]
    await asyncio.sleep(warmup)
    n0, t0 = counter(), time.perf_counter()
    await asyncio.sleep(seconds)
    n1, t1 = counter(), time.perf_counter()
    stop.set()
    for c in conns:  # unblock publishers waiting for window slots
        for _ in range(64):
            c.window.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    return (n1 - n0) / (t1 - t0), n1


async def mosquitto_run(port: int, n: int, seconds: float, window: int) -> float:
    sub = await Conn.open("127.0.0.1", port, "bench-sub", version=MQTT_311)
    await sub.subscribe("bench/#", qos=1)
    await asyncio.sleep(0.2)
    pubs = await open_many(n, lambda i: Conn.open("127.0.0.1", port, f"bench-pub-{i}"))
    for c in pubs:
        c.set_window(window)
    rate, _ = await drive(pubs, [f"bench/{i}" for i in range(n)], seconds, 2.0,
                          lambda: sub.received)
    for c in [*pubs, sub]:
        await c.close()
    return rate


async def corral_run(base: str, mqtt_port: int, pid: int, url: str, n: int, seconds: float,
                     window: int) -> dict[str, float]:
    _tok, _product, creds = await provision_fleet(
        base, n, settings={"event_rate_per_s": 1000, "event_rate_burst": 1000})
    rss0 = rss_kib(pid)
    t = time.perf_counter()
    conns = await open_many(n, lambda i: Conn.open(
        "127.0.0.1", mqtt_port, creds[i][0], username=creds[i][0], password=creds[i][1]),
        concurrency=50)
    connect_s = time.perf_counter() - t
    rss1 = rss_kib(pid)
    for c in conns:
        c.set_window(window)
    rate, _ = await drive(conns, [f"devices/{d}/events/bench" for d, _s in creds], seconds,
                          2.0, lambda: sum(c.acked for c in conns))
    await asyncio.sleep(0.5)
    acked = sum(c.acked for c in conns)
    refused = sum(c.refused for c in conns)
    lat = [x for c in conns for x in c.latencies[-2000:]]
    for c in conns:
        await c.close()
    engine = make_engine(url)
    async with engine.connect() as db:
        stored = (await db.execute(text("SELECT count(*) FROM events WHERE name='bench'"))).scalar()
    await engine.dispose()
    return {"rate": rate, "acked": acked, "refused": refused, "stored": stored,
            "connect_s": connect_s, "rss_per_conn_kib": (rss1 - rss0) / n,
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--database-url")
    args = ap.parse_args()

    with private_mosquitto() as port:
        mosq = asyncio.run(mosquitto_run(port, args.devices, args.seconds, args.window))
    with tempfile.TemporaryDirectory() as tmp, corral_serve(
            Path(tmp), database_url=args.database_url) as srv:
        res = asyncio.run(corral_run(srv.base, srv.mqtt_port, srv.pid, srv.database_url,
                                     args.devices, args.seconds, args.window))
    db = "PostgreSQL" if args.database_url else "SQLite"
    print(f"\n{args.devices} connections, window {args.window}, {args.seconds:.0f} s measured\n")
    print("| target | QoS 1 msg/s | notes |")
    print("|---|---:|---|")
    print(f"| Mosquitto 2.0 pub->sub | {mosq:,.0f} | private instance, 1 subscriber |")
    print(f"| corral ({db}) durable ingest | {res['rate']:,.0f} | PUBACK after commit; "
          f"ack p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms |")
    print(f"\ncorral/Mosquitto = {res['rate'] / mosq:.2f}; acked {res['acked']:,}, "
          f"refused {res['refused']:,}, stored {res['stored']:,} (stored >= acked: "
          f"{res['stored'] >= res['acked']}); {args.devices} devices connected in "
          f"{res['connect_s']:.1f} s, server RSS +{res['rss_per_conn_kib']:.1f} KiB/device")


if __name__ == "__main__":
    main()
