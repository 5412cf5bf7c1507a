"""B18c: the device half of a function call, in-process (no HTTP, no transport).

    .venv/bin/python bench/bench_call_path.py [--n 2000] [--database-url URL]

What a function call costs after the REST route has authorized it, measured on one
``corral serve`` runtime (``Runtime.start``, SQLite in a temporary directory unless
``--database-url``) with one device's session whose link answers at once (``bench_asgi.Device``):

* ``count``: the call's usage count alone (``EventWriter.count(..., now=True)``: the batch,
  its INSERT and COMMIT, durable before it returns);
* ``bus``: ``device.<id>.request`` over the bus to the session and back (the session's
  checks, the device's answer, the count, the reply) — what ``device_request`` waits for.

``--n`` of each after 200 warm-up rounds; process CPU (all threads: the database's
included) and wall time per round, and the jobs handed to aiosqlite's thread (``hops``,
SQLite). CPU is the figure to compare; wall time moves with the machine's load.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench_asgi import Device, count_jobs

from corral.devices.models import Device as DeviceRow
from corral.metering.ledger import Usage
from corral.sessions import contract
from corral.sessions.link import Hello
from corral.settings import Settings
from corral.web.app import Runtime, create_app


def _arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


async def main() -> None:
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), argon2_time_cost=1,
                        argon2_memory_kib=8, log_level="WARNING",
                        database_url=_arg("--database-url", "") or None)
    n = int(_arg("--n", "2000"))
    runtime = Runtime(settings)
    app = create_app(settings, runtime=runtime)
    await runtime.start(app, background=False)
    hub, writer, bus = runtime.hub, runtime.writer, runtime.bus
    assert hub is not None and writer is not None
    device = f"{1:024x}"
    async with runtime.sessionmaker() as db:  # a device of no product (a developer's)
        db.add(DeviceRow(id=device))
        await db.commit()
    session = await hub.open(Hello(device), Device())  # type: ignore[arg-type]
    await session.describe(functions=["led"], variables={"temp": "double"})
    hops = 0

    def one_hop() -> None:
        nonlocal hops
        hops += 1

    count_jobs(one_hop)
    subject = contract.request_subject(device)
    call = {"kind": "function", "name": "led", "arg": "on", "timeout": 10.0}
    read = {"kind": "variable", "name": "temp", "timeout": 10.0}

    async def count() -> None:
        await writer.count(Usage(device, "function", product_id=None), now=True)

    async def function() -> None:
        reply = (await bus.request(subject, call, timeout=11)).json()
        assert reply == {"ok": True, "return_value": 1}, reply

    async def variable() -> None:
        reply = (await bus.request(subject, read, timeout=11)).json()
        assert reply["ok"] is True, reply

    print(f"{'what':28} {'wall µs':>8} {'CPU µs':>8} {'hops':>5}")
    for name, step in (("count (writer, now=True)", count), ("bus: function call", function),
                       ("bus: variable read", variable)):
        for _ in range(200):
            await step()
        hops = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            await step()
        wall = (time.perf_counter() - t0) / n * 1e6
        cpu = (time.process_time() - c0) / n * 1e6
        print(f"{name:28} {wall:8.1f} {cpu:8.1f} {hops / n:5.1f}")
    await runtime.stop()


if __name__ == "__main__":
    asyncio.run(main())
