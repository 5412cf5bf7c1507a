"""B13: integrations. Two measurements, in one run:

1. **delivery**: webhook deliveries per second from the delivery worker to a local HTTP
   target (a separate uvicorn process answering 200 at once), with 1 and with 50
   integrations matching every event. ``--events`` events are committed through the event
   writer first (the outbox rows with them), then the worker starts and the clock runs until
   every delivery is recorded as a success.
2. **ingest**: events/s through the device-session core (in-process sessions, each awaiting
   its own commit, as bench B10), rounds alternating
   * **off**: no outbox row (the writer as it was before integrations);
   * **outbox**: the outbox row with every batch, no worker running (the ingest path's own
     cost);
   * **on**: the outbox row, one integration matching every event and the worker running in
     the same process, delivering to the local target as fast as it can (what ``corral
     serve`` does on one node: the worker competes for the same CPU).

    .venv/bin/python bench/bench_integrations.py [--events 2000] [--devices 500]
        [--seconds 5] [--rounds 3] [--database-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _server import free_port
from bench_metering import Link, bench_product
from sqlalchemy import delete, func, select

from corral import models
from corral.bus.inprocess import InProcessBus
from corral.db.engine import make_engine, make_sessionmaker
from corral.db.migrate import upgrade
from corral.events import outbox
from corral.events.writer import EventWriter, NewEvent
from corral.integrations import signing
from corral.integrations.models import Attempt, Delivery, Integration, IntegrationOutbox
from corral.integrations.tasks import IntegrationWorker
from corral.sessions.core import SessionHub
from corral.sessions.link import Hello, OpenGate
from corral.settings import Settings

PAYLOAD = '{"t":21.5,"h":40}'
TARGET_APP = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b""})
'''


@contextlib.contextmanager
def target(tmp: Path) -> Any:
    """The webhook target: uvicorn (httptools) in its own process, stopped by PID."""
    (tmp / "hook_target.py").write_text(TARGET_APP)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "hook_target:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--no-access-log", "--http", "httptools"], cwd=tmp)
    url = f"http://127.0.0.1:{port}/hook"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.post(url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the target did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def setup(url: str, n: int) -> tuple[Any, int, list[str]]:
    models.load()
    engine = make_engine(url)
    await upgrade(engine)
    sm = make_sessionmaker(engine)
    ids = [f"{i:024x}" for i in range(1, n + 1)]
    async with sm() as db:
        await db.execute(delete(IntegrationOutbox))
        await db.execute(delete(Attempt))
        await db.execute(delete(Delivery))
        await db.execute(delete(Integration))
        _org_id, product_id = await bench_product(db, "bench-hooks", ids)
        await db.commit()
        return engine, product_id, ids


async def integrations(sm: Any, product_id: int, url: str, k: int) -> None:
    async with sm() as db:
        await db.execute(delete(Integration))
        for i in range(k):
            db.add(Integration(id=f"{i:024x}", product_id=product_id,
                               integration_type="Webhook", name=f"bench {i}", event="bench",
                               settings={"url": url, "requestType": "POST"},
                               signing_secret=signing.new_secret(), consecutive_failures=0))
        await db.commit()


async def delivery(sm: Any, settings: Settings, product_id: int, device: str, url: str,
                   k: int, events: int) -> tuple[float, float]:
    """Deliveries/s and CPU µs per delivery with ``k`` integrations and ``events`` events."""
    await integrations(sm, product_id, url, k)
    writer = EventWriter(sm)
    writer.start()
    futures = [writer.write_nowait(NewEvent(name="bench", data=PAYLOAD, device_id=device,
                                            product_id=product_id)) for _ in range(events)]
    await asyncio.gather(*futures)
    worker = IntegrationWorker(settings, sm, writer)
    total = k * events
    t0, c0 = time.perf_counter(), time.process_time()
    worker.start()
    while True:
        await asyncio.sleep(0.2)
        async with sm() as db:
            done = (await db.execute(select(func.count()).select_from(Delivery).where(
                Delivery.status == "success"))).scalar_one()
        if done >= total:
            break
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await worker.stop()
    await writer.stop()
    async with sm() as db:
        await db.execute(delete(Attempt))
        await db.execute(delete(Delivery))
        await db.commit()
    return total / elapsed, cpu / total * 1e6


async def ingest_round(sm: Any, settings: Settings, ids: list[str], mode: str,
                       seconds: float) -> tuple[float, int]:
    bus = InProcessBus()
    writer = EventWriter(sm)
    writer.start()
    worker = None
    if mode == "on":
        worker = IntegrationWorker(settings, sm, writer)
        writer.after_commit.append(worker.wake)
        worker.start()
    hub = SessionHub(settings, sm, bus, writer, gate=OpenGate(), reset_presence=False)
    sessions = [await hub.open(Hello(d), Link()) for d in ids]
    original = outbox.wanted
    if mode == "off":
        outbox.wanted = lambda rows: False  # type: ignore[assignment]
    stop = asyncio.Event()
    count = 0

    async def device(s: Any) -> None:
        nonlocal count
        while not stop.is_set():
            await s.publish("bench", PAYLOAD)
            count += 1

    tasks = [asyncio.create_task(device(s)) for s in sessions]
    await asyncio.sleep(1.0)
    n0, t0 = count, time.perf_counter()
    await asyncio.sleep(seconds)
    rate = (count - n0) / (time.perf_counter() - t0)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    outbox.wanted = original
    for s in sessions:
        with contextlib.suppress(Exception):
            await s.close("bench over")
    delivered = worker.dispatched if worker else 0
    if worker is not None:
        await worker.stop()
    await writer.stop()
    await bus.close()
    async with sm() as db:  # the next round starts without a backlog
        await db.execute(delete(IntegrationOutbox))
        await db.execute(delete(Attempt))
        await db.execute(delete(Delivery))
        await db.commit()
    return rate, delivered


async def run(url: str, events: int, n: int, seconds: float, rounds: int, tmp: Path) -> None:
    engine, product_id, ids = await setup(url, n)
    sm = make_sessionmaker(engine)
    settings = Settings(database_url=url, integrations_allow_hosts="127.0.0.1",
                        integrations_poll_s=0.05)
    db_name = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    load = os.getloadavg()[0]
    with target(tmp) as hook_url:
        print(f"\n{db_name}; load average at start {load:.1f}\n")
        print("| integrations | events | deliveries | deliveries/s | events/s fully delivered "
              "| CPU µs/delivery |")
        print("|---:|---:|---:|---:|---:|---:|")
        for k in (1, 50):
            count = events if k == 1 else max(1, events // 10)
            rate, cpu = await delivery(sm, settings, product_id, ids[0], hook_url, k, count)
            print(f"| {k} | {count:,} | {k * count:,} | {rate:,.0f} | {rate / k:,.0f} | "
                  f"{cpu:.0f} |")
        await integrations(sm, product_id, hook_url, 1)
        rates: dict[str, list[float]] = {"off": [], "outbox": [], "on": []}
        for _ in range(rounds):
            for mode in ("off", "outbox", "on"):
                if mode == "outbox":
                    await integrations(sm, product_id, hook_url, 1)
                rate, _ = await ingest_round(sm, settings, ids, mode, seconds)
                rates[mode].append(rate)
    await engine.dispose()
    print(f"\ningest: {n} devices in-process, {rounds} rounds of {seconds:.0f} s\n")
    print("| mode | events/s (median) | rounds | drop vs off |")
    print("|---|---:|---|---:|")
    off = statistics.median(rates["off"])
    for mode in ("off", "outbox", "on"):
        med = statistics.median(rates[mode])
        print(f"| {mode} | {med:,.0f} | {', '.join(f'{r:,.0f}' for r in rates[mode])} | "
              f"{100 * (off - med) / off:.1f} % |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        asyncio.run(run(url, args.events, args.devices, args.seconds, args.rounds,
                        Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
