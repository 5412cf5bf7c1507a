"""Start a real corral server (uvicorn subprocess) for a benchmark and stop it by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

# This checkout's code, for the benchmark and for the servers it starts. The shared venv's
# editable install may point at another checkout: a "before" run in an old worktree then
# measured main's code (its server subprocess imported the install's). A benchmark that
# imported corral before this module from elsewhere stops here and says so.
SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
_loaded = sys.modules.get("corral")
if _loaded is not None and not Path(str(_loaded.__file__)).resolve().is_relative_to(SRC):
    raise SystemExit(f"this benchmark imported corral from {_loaded.__file__}, not from this "
                     f"checkout: run it with PYTHONPATH={SRC}")


def server_env() -> dict[str, str]:
    """The environment of a server subprocess: this one without CORRAL_* settings, importing
    this checkout's code first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


# the page cache a seeding connection takes on SQLite (KiB): a million devices inserted at
# random ids into a dozen indexes (and the name/serial search table) touch pages all over
# the file; with SQLite's default 2 MB cache most inserts spill and re-read pages
SEED_CACHE_KIB = 1_048_576


async def seeding(conn: Any) -> None:
    """Make ``conn`` (an AsyncConnection about to bulk-insert a fleet) fast at it."""
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql(f"PRAGMA cache_size = -{SEED_CACHE_KIB}")



async def insert_rows(conn: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` (a model). On SQLite through a temporary table and one
    ``INSERT ... SELECT``: the device search index (FTS5, kept by a trigger) flushes its
    pending terms at the end of every statement, so a statement per row costs ~6x (100,000
    devices: 16 s against 2.6 s; corral's importer inserts with one ``INSERT ... SELECT`` for
    the same reason)."""
    from sqlalchemy import MetaData, Table, insert, select

    if not rows:
        return
    if conn.dialect.name != "sqlite":
        await conn.execute(insert(table), rows)
        return
    real = table.__table__
    cols = [c for c in real.columns if c.name in rows[0]]
    tmp = Table(f"seed_{real.name}", MetaData(), *[c._copy() for c in cols],
                prefixes=["TEMPORARY"])
    await conn.run_sync(lambda sync: tmp.create(sync, checkfirst=True))
    await conn.execute(insert(tmp), rows)
    await conn.execute(insert(real).from_select([c.name for c in cols], select(*tmp.c)))
    await conn.execute(tmp.delete())

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def corral_server(data_dir: Path, *, database_url: str | None = None) -> Iterator[str]:
    port = free_port()
    env = server_env()
    env.update({
        "CORRAL_DATA_DIR": str(data_dir), "CORRAL_HTTP_PORT": str(port),
        "CORRAL_LOG_LEVEL": "WARNING", "CORRAL_ARGON2_TIME_COST": "1",
        "CORRAL_ARGON2_MEMORY_KIB": "8",
        # a benchmark is one client address far over Particle's 10,000 requests / 5 min
        "CORRAL_API_RATE_LIMIT": "0",
    })
    if database_url:
        env["CORRAL_DATABASE_URL"] = database_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "corral.web.app:asgi_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
         "--no-proxy-headers"],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("corral did not start within 30 s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def signup_and_login(base: str, username: str = "bench@example.com",
                     password: str = "bench-password") -> str:
    httpx.post(f"{base}/v1/users", json={"username": username, "password": password}, timeout=30)
    r = httpx.post(f"{base}/oauth/token", data={
        "grant_type": "password", "username": username, "password": password,
        "client_id": "bench", "client_secret": "bench"}, timeout=30)
    r.raise_for_status()
    return str(r.json()["access_token"])


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def report(label: str, lat: list[float], width: int = 34) -> None:
    """One row of a latency table: p50, p99 and max in milliseconds."""
    print(f"{label:{width}} {percentile(lat, 50) * 1e3:8.1f} {percentile(lat, 99) * 1e3:8.1f} "
          f"{max(lat) * 1e3:8.1f}")


def fleet_database(tmp: Path, db_file: Path, devices: int,
                   seed: Callable[[str, str, int], Awaitable[None]], *, user: str,
                   password: str, analyze: bool = False) -> str:
    """The product slug of a seeded SQLite fleet in ``db_file``: reused when the file exists
    (a server start migrates it; ``analyze`` refreshes its statistics), otherwise a server
    makes a user and a product and ``seed(url, slug, devices)`` fills it."""
    url = f"sqlite+aiosqlite:///{db_file}"
    if db_file.exists():
        with corral_server(tmp, database_url=url):
            pass  # the start migrates it
        with sqlite3.connect(db_file) as conn:
            slug = str(conn.execute("SELECT slug FROM products ORDER BY id LIMIT 1").fetchone()[0])
            if analyze:
                conn.execute("ANALYZE")
        print(f"reusing the fleet in {db_file}")
        return slug
    return new_fleet(tmp, url, devices, seed, user=user, password=password)


def new_fleet(tmp: Path, url: str, devices: int,
              seed: Callable[[str, str, int], Awaitable[None]], *, user: str,
              password: str) -> str:
    """The slug of a new product in the database at ``url``: a server makes a user and the
    product, then ``seed(url, slug, devices)`` fills it."""
    with corral_server(tmp, database_url=url) as base:
        token = signup_and_login(base, user, password)
        r = httpx.post(f"{base}/v1/user/products", json={"product": {"name": "Fleet"}},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
        r.raise_for_status()
        slug = str(r.json()["product"]["slug"])
    t = time.perf_counter()
    asyncio.run(seed(url, slug, devices))
    print(f"seeded {devices} devices in {time.perf_counter() - t:.1f} s")
    return slug
