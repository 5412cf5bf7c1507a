"""Event group-commit writer throughput: N events from C concurrent writers, each awaiting
its own commit (the QoS 1 ack path).

    .venv/bin/python bench/bench_event_writer.py [--events 100000] [--writers 1000]
        [--max-batch 2000] [--max-delay 0.005] [--database-url URL]

SQLite file in a temp dir unless --database-url (that database is migrated and its events
table emptied first). Prints rows/s, batches committed and p50/p99 write latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import delete

from corral import models
from corral.db.engine import make_engine, make_sessionmaker
from corral.db.migrate import upgrade
from corral.events.models import Event
from corral.events.writer import EventWriter, NewEvent


async def run(url: str, events: int, writers: int, max_batch: int, max_delay: float) -> None:
    models.load()
    engine = make_engine(url)
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(delete(Event))
    writer = EventWriter(make_sessionmaker(engine), max_batch=max_batch, max_delay=max_delay)
    writer.start()
    latencies: list[float] = []
    per_writer = events // writers

    async def device(n: int) -> None:
        for i in range(per_writer):
            row = NewEvent(name="temp", data=f"{n}:{i}", device_id=f"{n:024x}", product_id=1)
            t = time.perf_counter()
            await writer.write(row)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(device(n) for n in range(writers)))
    elapsed = time.perf_counter() - t0
    await writer.stop()
    await engine.dispose()
    total = per_writer * writers
    q = statistics.quantiles(latencies, n=100)
    print(f"database     {url.split('://')[0]}")
    print(f"events       {total} from {writers} concurrent writers")
    print(f"elapsed      {elapsed:.2f} s")
    print(f"rows/s       {total / elapsed:,.0f}")
    print(f"batches      {writer.batches_committed} committed, {writer.batches_failed} failed"
          f" (avg {total / max(1, writer.batches_committed):.0f} rows/batch)")
    print(f"latency      p50 {q[49] * 1000:.1f} ms  p99 {q[98] * 1000:.1f} ms")
    assert writer.rows_committed == total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--writers", type=int, default=1000)
    ap.add_argument("--max-batch", type=int, default=2000)
    ap.add_argument("--max-delay", type=float, default=0.005)
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        asyncio.run(run(url, args.events, args.writers, args.max_batch, args.max_delay))


if __name__ == "__main__":
    main()
