"""B1a: per-request cost inside the process (ASGI called directly: no HTTP, no client).

    .venv/bin/python bench/bench_asgi.py [--profile | --profile-call | --profile-path PATH]
        [--sort cumulative] [--top 25] [--statements] [--n 1000] [--database-url URL]
        [--loop PATH [--seconds 20 | --count N]]

Separates the middleware stack and routing (``/openapi.json``: no database, no FastAPI
dependencies, the document's bytes made once) from
database round trips, counted exactly per route (statements sent to the database, COMMIT
and ROLLBACK included, from SQLAlchemy's cursor events; ``/healthz``: one). ``--n``
sequential requests per route after 100 warm-up requests; wall time per request (mean and
p99) and process CPU time (all threads) per request; on SQLite, the jobs handed to aiosqlite's thread per request
(``hops``: each a queue put, a thread wake-up and a future resolved from that thread); on
PostgreSQL, the writes to the server's socket (``hops``: each a request the server answers,
the pool's pre-ping, BEGIN and asyncpg's own included; ``--no-pre-ping`` turns the
pre-ping off to weigh it).
``--profile``: cProfile of
``/v1/products/{p}`` (the heaviest guarded read); ``--profile-call`` of a function call
(the in-process device below answers at once); ``--profile-path`` of any GET.
``--loop PATH`` repeats one route (alone: no table) for ``--seconds``, for a sampling
profiler attached to the process (``py-spy record --pid``), or ``--count`` times: under
``valgrind --tool=callgrind``, the instruction totals of two counts, their difference divided
by the counts' difference, are one request's instructions (start-up cancels out).
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite
import httpx
from sqlalchemy import event

from corral.sessions.link import Hello
from corral.settings import Settings
from corral.web.app import Runtime, create_app


class Device:
    """A device link answering at once (no transport): the server's own call path alone."""

    transport = "bench"

    async def call_function(self, name: str, arg: str) -> int:
        return 1

    async def read_variable(self, name: str) -> Any:
        return 21.5

    async def deliver_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def request_describe(self) -> None:
        return None

    async def disconnect(self, reason: str) -> None:
        return None


def count_jobs(on_job: Callable[[], None]) -> None:
    """Call ``on_job`` for every job handed to an aiosqlite connection's thread from now on."""
    queue_job = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        on_job()
        return await queue_job(self, fn, *args, **kwargs)

    aiosqlite.Connection._execute = counted  # type: ignore[method-assign]


async def call(app: Any, path: str, token: str | None = None, body: bytes = b"") -> int:
    headers = [(b"host", b"bench")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if body:
        headers.append((b"content-type", b"application/json"))
    method = "POST" if body else "GET"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("bench", 80)}
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return int(messages[0]["status"])


def _arg(name: str, default: str | None = None) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


async def main() -> None:
    # no rate limit (as bench_api_wrk.sh): its default budget (10,000 requests per address
    # every 5 minutes) is what a --seconds loop runs through, and every request after that
    # would be a 429 that never reaches the route
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), argon2_time_cost=1,
                        argon2_memory_kib=8, log_level="WARNING", api_rate_limit=0,
                        database_url=_arg("--database-url"))
    n = int(_arg("--n", "1000") or 1000)
    runtime = Runtime(settings)
    app = create_app(settings, runtime=runtime)
    await runtime.start(app, background=False)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:
        await c.post("/v1/users", json={"username": "p@example.com", "password": "password123"})
        r = await c.post("/oauth/token", data={
            "grant_type": "password", "username": "p@example.com", "password": "password123",
            "client_id": "bench", "client_secret": "bench"})
        token = r.json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        r = await c.post("/v1/user/products", headers=auth, json={"name": "Bench"})
        product = r.json()["product"]["slug"]
        r = await c.post("/v1/user/products", headers=auth, json={"name": "Empty"})
        empty = r.json()["product"]["slug"]  # B1's device list: a product with no devices
        await c.post(f"/v1/products/{product}/devices", headers=auth,
                     json={"ids": [f"{i:024x}" for i in range(1, 26)]})
    statements = 0
    hops = 0  # jobs handed to aiosqlite's thread (SQLite only)
    shown: list[str] | None = None

    def one_hop() -> None:
        nonlocal hops
        hops += 1

    count_jobs(one_hop)
    db_port = runtime.engine.url.port or 5432  # type: ignore[union-attr]
    transport_write = asyncio.selector_events._SelectorSocketTransport.write

    def counted_write(self: Any, data: Any) -> None:  # PostgreSQL: a request to the server
        nonlocal hops
        peer = self.get_extra_info("peername")
        if peer and peer[1] == db_port:
            hops += 1
        transport_write(self, data)

    asyncio.selector_events._SelectorSocketTransport.write = counted_write  # type: ignore[method-assign]
    if "--no-pre-ping" in sys.argv:  # what the pool's pre-ping costs (PostgreSQL)
        runtime.engine.sync_engine.pool._pre_ping = False  # type: ignore[union-attr]

    def counted(*args: Any) -> None:
        nonlocal statements
        statements += 1
        if shown is not None:
            sql = args[2] if len(args) > 2 and isinstance(args[2], str) else "COMMIT/ROLLBACK"
            shown.append(" ".join(sql.split())[:150])

    sync_engine = runtime.engine.sync_engine  # type: ignore[union-attr]
    event.listen(sync_engine, "before_cursor_execute", counted)
    event.listen(sync_engine, "commit", counted)
    event.listen(sync_engine, "rollback", counted)
    device = f"{1:024x}"
    session = await runtime.hub.open(Hello(device), Device())  # type: ignore[union-attr]
    await session.describe(functions=["led"], variables={"temp": "double"})
    routes = (("/openapi.json", None, b""), ("/healthz", None, b""), ("/v1/user", token, b""),
              (f"/v1/products/{product}", token, b""),
              (f"/v1/products/{product}/team", token, b""),
              (f"/v1/products/{empty}/devices", token, b""),
              (f"/v1/products/{product}/devices", token, b""),
              (f"/v1/products/{product}/devices/{device}", token, b""),
              (f"/v1/devices/{device}", token, b""),
              (f"/v1/devices/{device}/led", token, b'{"arg": "on"}'),
              (f"/v1/devices/{device}/temp", token, b""))
    print(f"{'route':44} {'ms/request':>10} {'p99 ms':>7} {'CPU ms':>7} {'round trips':>12} "
          f"{'hops':>5}")
    for path, tok, body in routes if "--loop" not in sys.argv else ():
        for _ in range(100):
            assert await call(app, path, tok, body) == 200, path
        statements = hops = 0
        walls: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        failed = 0
        for _ in range(n):
            t = time.perf_counter()
            failed += await call(app, path, tok, body) != 200
            walls.append(time.perf_counter() - t)
        assert not failed, f"{path}: {failed} of {n} requests did not answer 200"
        ms = (time.perf_counter() - t0) / n * 1e3
        p99 = sorted(walls)[min(n - 1, int(n * 0.99))] * 1e3
        cpu = (time.process_time() - c0) / n * 1e3  # every thread: aiosqlite's included
        print(f"{path:44} {ms:10.3f} {p99:7.2f} {cpu:7.3f} {statements / n:12.1f} {hops / n:5.1f}")
        if "--statements" in sys.argv:  # what one request sends
            shown = []
            await call(app, path, tok, body)
            for sql in shown:
                print(f"    {sql}")
            shown = None
    if "--loop" in sys.argv:  # one route for --seconds, for a sampling profiler attached
        path = _arg("--loop", "/v1/user") or "/v1/user"
        body = b'{"arg": "on"}' if path.endswith("/led") else b""
        until = time.perf_counter() + float(_arg("--seconds", "20") or 20)
        limit = int(_arg("--count", "0") or 0)  # a fixed count (instruction counts) instead
        for _ in range(100):
            assert await call(app, path, token, body) == 200, path
        count = 0
        c0 = time.process_time()
        failed = 0
        while (count < limit) if limit else (time.perf_counter() < until):
            failed += await call(app, path, token, body) != 200
            count += 1
        assert not failed, f"{path}: {failed} of {count} requests did not answer 200"
        print(f"loop {path}: {count} requests, {(time.process_time() - c0) / count * 1e3:.3f} ms CPU each")
    if "--profile" in sys.argv or "--profile-call" in sys.argv or "--profile-path" in sys.argv:
        path, body = ((f"/v1/devices/{device}/led", b'{"arg": "on"}')
                      if "--profile-call" in sys.argv else (f"/v1/products/{product}", b""))
        path = _arg("--profile-path", path) or path
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            await call(app, path, token, body)
        prof.disable()
        pstats.Stats(prof).sort_stats(_arg("--sort", "tottime") or "tottime").print_stats(int(_arg("--top", "25") or 25))
    await runtime.stop()


if __name__ == "__main__":
    asyncio.run(main())
