"""A 1,000-event burst to two tenants' integrations: one target dead (it accepts
connections and never answers), one healthy. The healthy one gets every event while the
dead one's lane has tried only a fraction of its share: it was never waiting behind the dead
target. Ingest is not held up either: the burst commits at the writer's pace."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest

from corral.events.writer import NewEvent
from corral.settings import Settings
from helpers import bearer, new_user, user_id
from hookkit import Answer, blackhole, hook_settings, serve
from mqtt_helpers import until

pytestmark = pytest.mark.slow
N = 1000


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return hook_settings(database_url, tmp_path, integrations_retry_base_s=5,
                         integrations_retry_max_s=3600)


async def test_dead_target_does_not_delay_a_healthy_one(client, app: Any) -> None:
    runtime = app.state.runtime
    runtime.integrations.start()
    dead_owner = await new_user(client, "dead@example.com")
    live_owner = await new_user(client, "live@example.com")
    owners = [await user_id(app, "dead@example.com"), await user_id(app, "live@example.com")]
    async with blackhole() as hole, serve() as healthy:
        for token, url in ((dead_owner, hole.url), (live_owner, healthy.url)):
            r = await client.post("/v1/integrations", headers=bearer(token),
                                  json={"event": "burst", "url": url})
            assert r.status_code == 201, r.text
        started = time.monotonic()
        futures = [runtime.writer.write_nowait(NewEvent(
            name="burst", data=str(i), source="cloud", owner_user_id=owners[i % 2]))
            for i in range(2 * N)]
        for f in futures:
            await f
        ingest_s = time.monotonic() - started
        await until(lambda: len(healthy.seen) >= N, 120, "the healthy target's share")
        healthy_s = time.monotonic() - started
        assert {s.form["data"] for s in healthy.seen} == {str(i) for i in range(1, 2 * N, 2)}
        # the dead lane sends at most `integrations_concurrency` requests per timeout (10 s)
        dead_attempts = hole.connections
        print(f"ingest {ingest_s:.2f} s, healthy done in {healthy_s:.2f} s, "
              f"dead target tried {dead_attempts} times meanwhile")
        assert dead_attempts < N / 2


async def test_deliveries_give_way_to_a_busy_ingest(client, app: Any, monkeypatch) -> None:
    """While this node's writer commits more than `integrations_yield_above` events per
    second, deliveries go one at a time (with a pause after each) and the dispatcher takes one
    outbox batch per interval; once ingest calms down, everything left is delivered."""
    from corral.integrations import tasks

    runtime = app.state.runtime
    worker = runtime.integrations
    worker.pressure.above = 50.0  # a low bar, so a test-sized burst is "busy"
    monkeypatch.setattr(tasks, "YIELD_WINDOW_S", 0.05)
    owner = await new_user(client, "busy@example.com")
    oid = await user_id(app, "busy@example.com")
    async with serve() as target:
        target.default = Answer(200, "ok", delay=0.05)  # a slowish target: requests overlap
        inflight = peak = 0
        saw_busy = False
        real = worker._send

        async def counting(info: Any, facts: Any) -> Any:
            # requests started while ingest was busy (those begun before it turned busy may
            # still be finishing: they do not count)
            nonlocal inflight, peak, saw_busy
            busy = worker.pressure._busy
            saw_busy = saw_busy or busy
            inflight += busy
            peak = max(peak, inflight)
            try:
                return await real(info, facts)
            finally:
                inflight -= busy

        monkeypatch.setattr(worker, "_send", counting)
        r = await client.post("/v1/integrations", headers=bearer(owner),
                              json={"event": "busy", "url": target.url})
        assert r.status_code == 201, r.text
        worker.start()
        stop = time.monotonic() + 3.0
        sent = 0
        while time.monotonic() < stop and sent < 600:  # batches of 20, hundreds/s, <= 3 s
            futures = [runtime.writer.write_nowait(NewEvent(
                name="busy", data=str(sent + i), source="cloud", owner_user_id=oid))
                for i in range(20)]
            for f in futures:
                await f
            sent += 20
        during = len(target.seen)
        assert saw_busy, "ingest never counted as busy: the test proves nothing"
        assert peak == 1, f"{peak} requests were in flight while ingest was busy"
        assert during < sent, "every event was delivered at once: nothing gave way"
        expected = {str(i) for i in range(sent)}
        await until(lambda: {s.form.get("data") for s in target.seen} >= expected, 60,
                    "the rest, once ingest calmed")
        odd = [s for s in target.seen if "data" not in s.form]
        assert not odd, f"requests without data: {[(s.method, s.headers, s.body) for s in odd]}"
        repeated = collections.Counter(s.form["data"] for s in target.seen) - \
            collections.Counter(expected)
        assert not repeated, f"sent more than once: {sorted(repeated)}"
        await until(lambda: not worker.pressure.busy(), 10, "ingest no longer busy")
