"""Test harness: every test gets a migrated, empty database and an in-process client.

SQLite by default; set ``CORRAL_TEST_DATABASE_URL`` (e.g.
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``) to run the same suite on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from corral import models
from corral.db.engine import make_engine
from corral.db.migrate import upgrade
from corral.kit import clock
from corral.mail.backends import LogBackend
from corral.settings import Settings
from corral.web.app import Runtime, create_app
from dbreset import truncate_all

models.load()
PG_URL = os.environ.get("CORRAL_TEST_DATABASE_URL")


def worker_database_url(url: str) -> str:
    """Under pytest-xdist each worker gets a PostgreSQL database of its own
    (``<database>_<worker>``, created on first use), because the suite drops and recreates
    the ``public`` schema; SQLite databases are per worker already (temporary paths)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or url.startswith("sqlite"):
        return url
    base = make_url(url)
    name = f"{base.database}_{worker}"

    async def create() -> None:
        engine = make_engine(url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                exists = (await conn.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})).first()
                if not exists:
                    await conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            await engine.dispose()

    asyncio.run(create())
    return base.set(database=name).render_as_string(hide_password=False)


def _fresh_schema(url: str) -> None:
    async def go() -> None:
        engine = make_engine(url)
        if not url.startswith("sqlite"):
            async with engine.begin() as conn:
                await conn.execute(text("DROP SCHEMA public CASCADE"))
                await conn.execute(text("CREATE SCHEMA public"))
        await upgrade(engine)
        await engine.dispose()

    asyncio.run(go())


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    if PG_URL:
        url = worker_database_url(PG_URL)
    else:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'corral-test.db'}"
    _fresh_schema(url)
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", database_url=database_url,
        argon2_time_cost=1, argon2_memory_kib=8, log_format="text",
        particle_udp_port=0,  # the fixed 5684 would collide between parallel tests
    )


@pytest.fixture
def manual_clock() -> AsyncIterator[clock.ManualClock]:
    import datetime as dt

    mc = clock.ManualClock(dt.datetime.now(dt.UTC).replace(microsecond=0))
    previous = clock.install(mc)
    yield mc  # type: ignore[misc]
    clock.install(previous)


@pytest.fixture
async def app(settings: Settings, database_url: str) -> AsyncIterator[Any]:
    await truncate_all(database_url)
    runtime = Runtime(settings, mail_backend=LogBackend())
    application = create_app(settings, runtime=runtime)
    await runtime.start(application, migrate_db=False, background=False)
    try:
        yield application
    finally:
        await runtime.stop()


class FirstChunkOfStreams:
    """httpx's ASGITransport buffers a whole response, so an endless SSE stream would hang
    the in-process client: a ``text/event-stream`` response ends after its first body chunk
    (``:ok``), and the app then sees the client disconnect. Real streaming is tested over
    real sockets (tests/test_sse.py)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = ended = False

        async def first_chunk_only(message: Any) -> None:
            nonlocal streaming, ended
            if ended:
                return
            if message["type"] == "http.response.start":
                streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and streaming:
                message, ended = {**message, "more_body": False}, True
            await send(message)

        await self.app(scope, receive, first_chunk_only)


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=FirstChunkOfStreams(app), client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://corral.test") as c:
        yield c


@pytest.fixture
def mailbox(app: Any) -> LogBackend:
    """Messages the log backend delivered (call ``await app.state.runtime.mailer.deliver_due()``)."""
    return app.state.runtime.mail_backend


# --- the second pass: only what the database can change ----------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database-bound-only", action="store_true",
        help="run only the tests that use the test database (the `database_url` fixture) or "
             "are marked `database_pass`: the Makefile's second pass, on PostgreSQL. The rest "
             "(parsers, subprocess servers on their own SQLite, the console's browser tests "
             "against `corral serve --demo`) do not touch CORRAL_TEST_DATABASE_URL and ran "
             "in the first pass.")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--database-bound-only"):
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        bound = ("database_url" in getattr(item, "fixturenames", ())
                 or item.get_closest_marker("database_pass") is not None)
        (keep if bound else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
