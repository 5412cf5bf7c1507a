"""B1: foundation API throughput and latency on one uvicorn worker.

    .venv/bin/python bench/bench_api.py [--seconds 10] [--concurrency 32]

Starts corral (SQLite in a temp dir) in a subprocess, then drives it from this process with
httpx over loopback: GET /v1/user, GET /v1/products/{p}, GET /v1/products/{p}/team, and the
password grant (argon2 at the production cost, measured separately since it is CPU-bound by
design). Each load loop is bounded by time and by count.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from _server import corral_server, percentile, signup_and_login


async def load(base: str, path: str, token: str, seconds: float, conc: int,
               max_requests: int = 200_000) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        async def worker() -> None:
            nonlocal errors, sent
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                t = time.perf_counter()
                r = await c.get(path)
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(conc)))
    return len(latencies), latencies, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, corral_server(Path(tmp)) as base:
        token = signup_and_login(base)
        h = {"Authorization": f"Bearer {token}"}
        org = httpx.post(f"{base}/v1/orgs", json={"name": "Bench Org"}, headers=h).json()
        slug = org["organization"]["slug"]
        httpx.post(f"{base}/v1/orgs/{slug}/products", json={"product": {"name": "Bench"}},
                   headers=h).raise_for_status()
        print(f"{'route':40} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for path in ("/v1/user", "/v1/products/bench", "/v1/products/bench/team"):
            n, lat, errors = asyncio.run(load(base, path, token, args.seconds, args.concurrency))
            print(f"GET {path:36} {n / args.seconds:8.0f} {percentile(lat, 50) * 1e3:8.2f} "
                  f"{percentile(lat, 99) * 1e3:8.2f} {errors:7d}")
    # the password grant with production argon2 cost (time_cost=3, 64 MiB), one at a time
    with tempfile.TemporaryDirectory() as tmp:
        from corral.kit.passwords import hash_password, verify_password

        stored = hash_password("bench-password")
        t = time.perf_counter()
        for _ in range(10):
            verify_password(stored, "bench-password")
        print(f"argon2id verify (t=3, m=64MiB): {(time.perf_counter() - t) / 10 * 1e3:.1f} ms each")


if __name__ == "__main__":
    main()
