"""B10: metering overhead on ingest: events/s through the device-session core with metering
on vs off, in the same run.

N devices (in-process sessions on the real hub, event writer and database; no transport,
whose cost is the same either way) publish events as fast as their commits allow, each
awaiting its own commit (the QoS 1 acknowledgement path). Rounds alternate:

* **on**: what ``corral serve`` runs. Every publish asks the :class:`UsageGate` (the
  organization is on a pausing Free plan, so each one also takes from its budget) and
  is counted: the writer records its usage in the same transaction as the event rows
  (PostgreSQL: one ``usage_publish_batches`` row per batch; SQLite: one ``usage_deltas``
  row per publish), and the pending usage is folded into ``usage_counters`` every
  ``metering_refresh_s`` (5 s), as the metering tick does.
* **off**: the hub has the allow-everything ``OpenGate`` and publishes carry no usage
  increment (the bench treats every event name as unmetered, the switch the core uses for
  the cloud's ``spark/*`` events).

    .venv/bin/python bench/bench_metering.py [--devices 500] [--seconds 5] [--rounds 3]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/corral_bench]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, text

from corral import models
from corral.bus.inprocess import InProcessBus
from corral.db.engine import make_engine, make_sessionmaker
from corral.db.migrate import upgrade
from corral.devices.models import Device
from corral.events.models import Event
from corral.events.writer import EventWriter
from corral.metering import ledger
from corral.metering.gate import Snapshot, UsageGate
from corral.metering.models import UsageCounter
from corral.orgs.models import Organization
from corral.products.models import Product
from corral.sessions import session as core  # DeviceSession: what it counts
from corral.sessions.core import SessionHub
from corral.sessions.link import Hello, OpenGate
from corral.settings import Settings

PAYLOAD = '{"t":21.5,"h":40}'


class Link:
    """A device that only publishes (nothing is ever sent to it)."""

    transport = "bench"

    async def call_function(self, name: str, arg: str) -> int:
        return 0

    async def read_variable(self, name: str) -> Any:
        return 0

    async def deliver_event(self, name: str, data: str | None, **kw: Any) -> None:
        return None

    async def request_describe(self) -> None:
        return None

    async def disconnect(self, reason: str) -> None:
        return None


async def setup(url: str, n: int) -> tuple[Any, int, list[str]]:
    models.load()
    engine = make_engine(url)
    await upgrade(engine)
    sm = make_sessionmaker(engine)
    ids = [f"{i:024x}" for i in range(1, n + 1)]  # the bench's own rows only are replaced
    async with sm() as db:  # what an earlier run left unfolded goes to the counters first
        await ledger.fold_pending(db)
        await db.commit()
    async with sm() as db:
        await db.execute(delete(UsageCounter).where(UsageCounter.device_id.in_(ids)))
        org_id, _product_id = await bench_product(db, "bench-metering", ids)
        await db.commit()
    return engine, org_id, ids


async def bench_product(db: Any, slug: str, ids: list[str]) -> tuple[int, int]:
    """A fresh organization and product ``slug`` holding the devices ``ids`` (what an earlier
    run left under that slug, and those devices' events, go first); no rate limit on events.
    Returns (organization id, product id); the caller commits."""
    await db.execute(delete(Event).where(Event.device_id.in_(ids)))
    await db.execute(delete(Device).where(Device.id.in_(ids)))
    await db.execute(text("DELETE FROM products WHERE slug = :s"), {"s": slug})
    await db.execute(text("DELETE FROM organizations WHERE slug = :s"), {"s": slug})
    org = Organization(name="Bench", slug=slug)
    db.add(org)
    await db.flush()
    product = Product(org_id=org.id, name="Bench", name_key="bench", slug=slug,
                      platform_id=12, settings={"event_rate_per_s": 1e9,
                                                "event_rate_burst": 10**9})
    db.add(product)
    await db.flush()
    db.add_all([Device(id=d, product_id=product.id, platform_id=12) for d in ids])
    return org.id, product.id


FOLDS: list[float] = []  # seconds each fold took


async def folder(sm: Any, every: float, stop: asyncio.Event) -> None:
    """What the metering tick does first, at its cadence: fold the usage deltas."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()
        t0 = time.perf_counter()
        async with sm() as db:
            await ledger.fold_pending(db)
            await db.commit()
        FOLDS.append(time.perf_counter() - t0)


async def round_(sm: Any, settings: Settings, ids: list[str], metered: bool, org_id: int,
                 seconds: float) -> tuple[float, float, int]:
    bus = InProcessBus()
    writer = EventWriter(sm)
    writer.start()
    gate: Any = OpenGate()
    if metered:
        gate = UsageGate()
        gate.apply(Snapshot(user_org={}, known={org_id}, paused={},
                            remaining={org_id: 10**12}, limit_reason={org_id: "used up"},
                            max_devices={org_id: 10**6}, devices={org_id: 0},
                            free_budget=100_000, free_reason="used up",
                            free_max_devices=100))
    hub = SessionHub(settings, sm, bus, writer, gate=gate, reset_presence=False)
    sessions = [await hub.open(Hello(d), Link()) for d in ids]
    extra = (lambda stop: folder(sm, settings.metering_refresh_s, stop)) if metered else None
    rate, cpu_us, count = await publish_flat_out(sessions, seconds, metered=metered,
                                                 beside=extra)
    await writer.stop()
    await bus.close()
    return rate, cpu_us, count


async def publish_flat_out(sessions: list[Any], seconds: float, *, metered: bool,
                           beside: Callable[[asyncio.Event], Awaitable[None]] | None = None
                           ) -> tuple[float, float, int]:
    """Every session publishes as fast as its own commits allow; after a 1 s warm-up,
    ``seconds`` are timed. Returns (events/s, process CPU µs per event, events in all) and
    closes the sessions. ``metered=False`` makes every event name uncounted (metering off);
    ``beside(stop)`` runs alongside until the end (e.g. the metering fold)."""
    original = core.uncounted_name
    if not metered:
        core.uncounted_name = lambda name: True  # type: ignore[assignment]
    stop = asyncio.Event()
    count = 0

    async def device(s: Any) -> None:
        nonlocal count
        while not stop.is_set():
            await s.publish("bench", PAYLOAD)
            count += 1

    tasks = [asyncio.create_task(device(s)) for s in sessions]
    if beside is not None:
        tasks.append(asyncio.create_task(beside(stop)))
    try:
        await asyncio.sleep(1.0)  # warm-up
        n0, t0, c0 = count, time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        n = count - n0
        rate = n / (time.perf_counter() - t0)
        cpu_us = (time.process_time() - c0) / max(1, n) * 1e6
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        core.uncounted_name = original
        for s in sessions:
            with contextlib.suppress(Exception):
                await s.close("bench over")
    return rate, cpu_us, count


async def run(url: str, n: int, seconds: float, rounds: int) -> None:
    engine, org_id, ids = await setup(url, n)
    sm = make_sessionmaker(engine)
    settings = Settings(database_url=url)
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    published = 0
    for _ in range(rounds):
        for metered in (False, True):
            rate, cpu_us, made = await round_(sm, settings, ids, metered, org_id, seconds)
            rates[metered].append(rate)
            cpu[metered].append(cpu_us)
            published += made if metered else 0
    async with sm() as db:
        await ledger.fold_pending(db)
        await db.commit()
        counted = (await db.execute(text(
            "SELECT coalesce(sum(events_published), 0) FROM usage_counters "
            "WHERE org_id = :org"), {"org": org_id})).scalar_one()
    await engine.dispose()
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    coff, con = statistics.median(cpu[False]), statistics.median(cpu[True])
    db_name = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    print(f"\n{n} devices in-process, {rounds} rounds of {seconds:.0f} s each, {db_name}\n")
    print("| metering | events/s (median) | CPU µs/event (median) | rounds (events/s) |")
    print("|---|---:|---:|---|")
    print(f"| off | {off:,.0f} | {coff:.1f} | {', '.join(f'{r:,.0f}' for r in rates[False])} |")
    print(f"| on | {on:,.0f} | {con:.1f} | {', '.join(f'{r:,.0f}' for r in rates[True])} |")
    # each round's on against the off right before it (the load of a shared machine drifts)
    pairs = statistics.median(100 * (f - n) / f for f, n in zip(rates[False], rates[True],
                                                                  strict=True))
    print(f"\nthroughput overhead {100 * (off - on) / off:.1f} % (median of the rounds' "
          f"own: {pairs:.1f} %), CPU per event "
          f"{100 * (con - coff) / coff:+.1f} % (goal: within 10 %); "
          f"{int(counted):,} publishes counted in usage_counters of {published:,} made with "
          f"metering on; deltas folded every {settings.metering_refresh_s:g} s "
          f"({len(FOLDS)} folds, median {statistics.median(FOLDS or [0]) * 1e3:.0f} ms)")
    if counted != published:
        raise SystemExit("usage counters disagree with the publishes made")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        asyncio.run(run(url, args.devices, args.seconds, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
