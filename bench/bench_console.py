"""B15: console pages of a product with 1,000,000 devices — p50/p99 of the device list (several
query shapes), the device page and the product overview (issue 17: p99 under 100 ms).

    .venv/bin/python bench/bench_console.py [--devices 1000000] [--requests 200]
        [--database fleet.db]   (keep the seeded fleet there; reused when it exists)

Seeds the product with B3's generator (bench_inventory.seed: bulk inserts into a fresh SQLite
database migrated by corral's own migrations), starts corral on it, signs in through the
console's own form (cookie session, CSRF token) and times the HTML pages with sequential,
bounded requests over 127.0.0.1 (the time includes the loopback round trip: an upper bound
of the server's time). Each page's answer is checked (200, HTML, the page's heading).
"""

from __future__ import annotations

import argparse
import random
import re
import sqlite3
import tempfile
import time
from pathlib import Path

import httpx
from _server import corral_server, fleet_database, report
from bench_inventory import seed

USER, PASSWORD = "bench@example.com", "bench-password"
# (label, path under the product, query) for the device list: the shapes the console offers
LIST_SHAPES = [
    ("devices: default (last heard)", {}),
    ("devices: page 300", {"page": "300"}),
    ("devices: sort by name", {"sort": "deviceName:asc"}),
    ("devices: search id prefix", {"q": "{prefix}"}),
    ("devices: search name", {"q": "sensor-12"}),
    ("devices: group beta", {"group": "beta"}),
    ("devices: firmware 7", {"fw": "7"}),
    ("devices: quarantined", {"flag": "quarantined"}),
]


def console_login(c: httpx.Client) -> None:
    """Sign in through the console's form, as a browser does."""
    r = c.get("/console/login")
    r.raise_for_status()
    token = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
    assert token, "no CSRF token on the sign-in page"
    r = c.post("/console/login", data={"username": USER, "password": PASSWORD,
                                       "csrf_token": token.group(1), "next": "/console/"})
    assert r.status_code == 303 and "corral_session" in c.cookies, r.text[:300]


def timed(c: httpx.Client, path: str, params: dict[str, str], expect: str) -> float:
    t = time.perf_counter()
    r = c.get(path, params=params)
    elapsed = time.perf_counter() - t
    assert r.status_code == 200 and expect in r.text, f"{path} {params}: {r.status_code}"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--database", type=Path, default=None,
                    help="a SQLite file to keep the seeded fleet in; when it exists, it is "
                         "reused (migrated by the server's start) instead of seeding again")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_file = args.database or Path(tmp) / "corral.db"
        url = f"sqlite+aiosqlite:///{db_file}"
        slug = fleet_database(Path(tmp), db_file, args.devices, seed, user=USER,
                              password=PASSWORD)
        with sqlite3.connect(db_file) as conn:  # device pages to open: a spread of the fleet
            ids = [row[0] for row in conn.execute(
                "SELECT id FROM devices ORDER BY id LIMIT 1000 OFFSET ?",
                (max(0, args.devices // 2 - 500),))]
        rnd = random.Random(1)
        product = f"/console/products/{slug}"
        with corral_server(Path(tmp), database_url=url) as base, \
                httpx.Client(base_url=base, timeout=60) as c:
            console_login(c)
            print(f"{'page':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
            report("product overview", [timed(c, product, {}, "<h1>Fleet</h1>")
                                        for _ in range(args.requests)])
            for label, shape in LIST_SHAPES:
                lat = []
                for _ in range(args.requests):
                    q = {k: (f"{rnd.getrandbits(12):03x}" if v == "{prefix}" else v)
                         for k, v in shape.items()}
                    lat.append(timed(c, f"{product}/devices", q, "<h1>Devices"))
                report(label, lat)
            lat = []
            for _ in range(args.requests):
                did = rnd.choice(ids)
                lat.append(timed(c, f"{product}/devices/{did}", {}, f"<code>{did}</code>"))
            report("device page", lat)


if __name__ == "__main__":
    main()
