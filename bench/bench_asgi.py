"""B1a: per-request cost inside the process (ASGI called directly: no HTTP, no client).

    .venv/bin/python bench/bench_asgi.py [--profile]

Separates the framework and middleware overhead (``/openapi.json``: no database) from
database round trips (``/healthz``: one; ``/v1/user``: token with its user, then the user's
organizations). 1,000 sequential requests per route after 100 warm-up requests.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from corral.settings import Settings
from corral.web.app import Runtime, create_app


async def call(app: Any, path: str, token: str | None = None) -> int:
    headers = [(b"host", b"bench")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("bench", 80)}
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return int(messages[0]["status"])


async def main() -> None:
    settings = Settings(data_dir=Path(tempfile.mkdtemp()), argon2_time_cost=1,
                        argon2_memory_kib=8, log_level="WARNING")
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
    for path, tok in (("/openapi.json", None), ("/healthz", None), ("/v1/user", token)):
        for _ in range(100):
            assert await call(app, path, tok) == 200
        n = 1000
        t0 = time.perf_counter()
        for _ in range(n):
            await call(app, path, tok)
        print(f"{path:16} {(time.perf_counter() - t0) / n * 1e3:.3f} ms/request")
    if "--profile" in sys.argv:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            await call(app, "/v1/user", token)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    await runtime.stop()


if __name__ == "__main__":
    asyncio.run(main())
