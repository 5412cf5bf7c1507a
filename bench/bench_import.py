"""B2: bulk device import — N new device IDs in one request (issue target: 100,000 in < 5 s).

    .venv/bin/python bench/bench_import.py [--count 100000] [--database-url URL]

Starts corral in a subprocess (SQLite in a temp dir unless --database-url), creates a product,
and times `POST /v1/products/{p}/devices` with a multipart `file` of N IDs (one per line,
CRLF), as particle-cli sends it. Then repeats the same request (all IDs existing: the
idempotent path) and checks the counts.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path

import httpx
from _server import corral_server, signup_and_login


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()
    ids = [secrets.token_hex(12) for _ in range(args.count)]
    payload = ("\r\n".join(ids) + "\r\n").encode()
    with tempfile.TemporaryDirectory() as tmp, \
            corral_server(Path(tmp), database_url=args.database_url) as base:
        token = signup_and_login(base)
        h = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/v1/user/products", json={"product": {"name": "Import Bench"}},
                       headers=h, timeout=30)
        r.raise_for_status()
        slug = r.json()["product"]["slug"]
        rows = []
        for label in ("new IDs", "same IDs again (idempotent)"):
            t = time.perf_counter()
            r = httpx.post(f"{base}/v1/products/{slug}/devices", headers=h, timeout=300,
                           files={"file": ("file", payload, "text/plain")})
            dt = time.perf_counter() - t
            r.raise_for_status()
            body = r.json()
            rows.append((label, dt, body["updated"], len(body["existingDeviceIds"])))
        print(f"{'request':32} {'seconds':>8} {'IDs/s':>9} {'updated':>8} {'existing':>9}")
        for label, dt, updated, existing in rows:
            print(f"{label:32} {dt:8.2f} {args.count / dt:9.0f} {updated:8d} {existing:9d}")
        assert rows[0][2] == args.count and rows[1][3] == args.count


if __name__ == "__main__":
    main()
