"""At least once across a crash: ``corral serve`` is SIGKILLed while webhook deliveries are
in flight (and freshly published events may not be dispatched yet), restarted on the same
database, and every event acknowledged to its publisher reaches the target; an event sent
twice carries the same ``webhook-id`` both times."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import httpx
import pytest

from hookkit import Answer, serve
from mqtt_helpers import until
from test_metering_crash import Server

pytestmark = pytest.mark.slow

PASSWORD = "crash-test-password"
ENV = {"CORRAL_INTEGRATIONS_ALLOW_HOSTS": "127.0.0.1", "CORRAL_INTEGRATIONS_RETRY_BASE_S": "0.1",
       "CORRAL_INTEGRATIONS_RETRY_MAX_S": "1", "CORRAL_INTEGRATIONS_POLL_S": "0.1"}


async def login(c: httpx.AsyncClient) -> None:
    await c.post("/v1/users", json={"username": "hook@example.com", "password": PASSWORD})
    r = await c.post("/oauth/token", data={
        "grant_type": "password", "username": "hook@example.com", "password": PASSWORD,
        "client_id": "crash", "client_secret": "crash"})
    c.headers["Authorization"] = f"Bearer {r.json()['access_token']}"


async def publish(c: httpx.AsyncClient, names: range) -> list[str]:
    """Publish ``e<i>`` events, 10 at a time; the data of those acknowledged."""
    acked: list[str] = []

    async def one(i: int) -> None:
        try:
            r = await c.post("/v1/devices/events", json={"name": "crash", "data": f"e{i}"})
        except httpx.HTTPError:
            return
        if r.status_code == 200:
            acked.append(f"e{i}")

    for start in range(names.start, names.stop, 10):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 10, names.stop))))
    return acked


async def test_deliveries_survive_sigkill(tmp_path: Path) -> None:
    async with asyncio.timeout(170), serve() as target:
        target.default = Answer(200, "ok", delay=0.2)  # requests stay in flight a while
        first = await asyncio.to_thread(Server, tmp_path, ENV)
        try:
            async with httpx.AsyncClient(base_url=first.base, timeout=30) as c:
                await login(c)
                r = await c.post("/v1/integrations", json={"event": "crash",
                                                            "url": target.url})
                assert r.status_code == 201, r.text
                acked = await publish(c, range(200))
                await until(lambda: len(target.seen) >= 50, 30, "deliveries under way")
                # a second burst, killed right after it is acknowledged: its outbox rows
                # may not be dispatched yet
                acked += await publish(c, range(200, 260))
            first.kill()
        finally:
            if first.proc.poll() is None:
                first.kill()
        assert len(acked) == 260
        seen_before = len(target.seen)
        assert seen_before < 260, "everything was delivered before the kill: no test"

        second = await asyncio.to_thread(Server, tmp_path, ENV)
        try:
            def delivered() -> bool:
                return {s.form["data"] for s in target.seen} >= set(acked)

            await until(delivered, 90, "every acknowledged event delivered")
        finally:
            await asyncio.to_thread(second.stop)
    ids: dict[str, set[str]] = collections.defaultdict(set)
    for s in target.seen:
        ids[s.form["data"]].add(s.headers["webhook-id"])
    assert all(len(v) == 1 for v in ids.values()), "a duplicate changed its webhook-id"
    assert len({next(iter(v)) for v in ids.values()}) == len(ids)  # one id per event
    sent = collections.Counter(s.form["data"] for s in target.seen)
    # the requests in flight at the kill were sent again after the restart
    assert any(n > 1 for n in sent.values())
