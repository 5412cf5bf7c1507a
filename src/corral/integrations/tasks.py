"""The delivery worker: outbox -> deliveries -> requests, with retries, throttling and a log.

One :class:`IntegrationWorker` runs per cluster (a singleton: :meth:`IntegrationWorker.run`
is the body a cluster lease runs; in the embedded mode it simply runs). It has three parts:

* the **dispatcher** turns outbox rows (one per event-writer batch) into delivery rows,
  one per (integration, matching event), and deletes the outbox rows, in one transaction;
* a **lane** per integration sends that integration's due deliveries, at most
  ``integrations_concurrency`` at once (one at a time while the target is throttled), and
  never more than ``integrations_target_concurrency`` to one host and port across lanes.
  A slow or dead target fills only its own lane: the dispatcher, other lanes and the event
  writer never wait for it;
* the **recorder** writes the lanes' outcomes (delivery status, a delivery-log row, the
  integration's health) in batches, and disables an integration whose target has kept
  failing (an e-mail and an audit entry go with it).

At least once: a delivery is only marked done after its request was answered; a crash in
between sends it again, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge
from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.db.session import commit
from corral.devices.models import Device
from corral.events.models import Event
from corral.events.outbox import may_trigger
from corral.events.writer import EventWriter, NewEvent, WriterStopped
from corral.integrations import schemas, service, templates
from corral.integrations.guard import Policy
from corral.integrations.models import Attempt, Delivery, Integration, IntegrationOutbox
from corral.integrations.mqtt import MqttPublisher
from corral.integrations.sender import Outcome, WebhookSender
from corral.kit import clock
from corral.settings import Settings

log = logging.getLogger("corral.integrations")

DELIVERED = Counter("corral_integration_deliveries_total",
                    "Integration delivery attempts by outcome", ["outcome"])
PENDING_LANES = Gauge("corral_integration_lanes", "Integrations with a delivery lane running")

OUTBOX_BATCH = 200  # outbox rows per dispatcher pass
FETCH = 200  # deliveries a lane takes from the database at once
FLUSH_S = 0.1  # the recorder gathers results this long before it writes them
FLUSH_MAX = 500  # ... or as soon as it holds this many
FILL_RETRY_S = 1.0  # a lane whose read of due deliveries failed tries again after this
LANE_IDLE_S = 30.0  # a lane with nothing to do for this long ends
RESCAN_S = 30.0  # how often the worker looks for pending deliveries without a lane
PRUNE_S = 3600.0  # how often old deliveries and log rows are deleted
YIELD_WINDOW_S = 0.5  # ingest pressure is judged over this window
YIELD_IDLE = 4.0  # under pressure, after a request taking d, the next waits YIELD_IDLE * d
YIELD_DISPATCH_S = 1.0  # under pressure, the dispatcher takes one batch per this interval


class IngestPressure:
    """Whether this node's device ingest is busy: the event writer committed more than
    ``above`` events per second over the last window. Deliveries on such a node give way
    (DESIGN: ingest first; the durable outbox and delivery rows wait without loss)."""

    def __init__(self, writer: EventWriter, above: float,
                 own: Callable[[], int] = lambda: 0) -> None:
        self.writer = writer
        self.above = above
        self.own = own  # events the worker itself wrote (hook-response/...): not ingest
        self._at = time.monotonic()
        self._rows = writer.rows_committed - own()
        self._busy = False

    def busy(self) -> bool:
        if self.above <= 0:
            return False
        now = time.monotonic()
        if now - self._at >= YIELD_WINDOW_S:
            rows = self.writer.rows_committed - self.own()
            self._busy = (rows - self._rows) / (now - self._at) > self.above
            self._at, self._rows = now, rows
        return self._busy


@dataclasses.dataclass(frozen=True, slots=True)
class Info:
    """An integration as the worker sees it (a snapshot of its row)."""

    id: str
    integration_type: str
    owner_user_id: int | None
    product_id: int | None
    org_id: int | None
    event: str
    device_id: str | None
    settings: dict[str, Any]
    signing_secret: str
    disabled: bool
    disabled_reason: str | None
    name: str | None
    consecutive_failures: int
    failing_since: dt.datetime | None

    @classmethod
    def of(cls, row: Integration) -> Info:
        return cls(row.id, row.integration_type, row.owner_user_id, row.product_id,
                   row.org_id, row.event, row.device_id, dict(row.settings),
                   row.signing_secret, row.disabled, row.disabled_reason, row.name,
                   row.consecutive_failures, row.failing_since)

    @property
    def target(self) -> tuple[str, int]:
        parts = urlsplit(str(self.settings.get("url", "")))
        default = {"https": 443, "mqtts": 8883, "mqtt": 1883}.get(parts.scheme, 80)
        try:
            port = parts.port or default
        except ValueError:
            port = default
        return (parts.hostname or "", port)


@dataclasses.dataclass(slots=True)
class Result:
    """One attempt's outcome, waiting for the recorder, with the integration's health as
    this outcome left it. The recorder writes that health, and disables the integration,
    from the outcomes it records, never from the lane's state when it writes: the lane may
    be further on by then (the failure that disables it sent and not yet recorded), and a
    disable written before its failure let a user re-enable and redeliver in between; the
    late failure then overwrote the redelivery (never sent again) and disabled the
    integration a second time."""

    lane: Lane
    delivery_id: int
    event_id: int
    status: str  # pending (retry later) | success | failed
    attempts: int
    next_attempt_at: dt.datetime
    # the delivery's next_attempt_at when the lane took it: the recorder writes the outcome
    # only over that same row state. A redelivery made while the request was in flight set
    # a new due time (and attempts 0); the outcome must not overwrite it, so the lane takes
    # the delivery again once this outcome is recorded
    taken_due: dt.datetime
    outcome: Outcome
    at: dt.datetime
    failures: int = 0  # the integration's consecutive failures after this outcome
    failing_since: dt.datetime | None = None
    # this outcome disables the integration (the lane's decision; not the outcomes of
    # requests still in flight then, which may be recorded after a user enabled it again)
    disable: bool = False


class IntegrationWorker:
    """See the module docstring. ``wake`` is what the event writer's after-commit hook and
    the integration routes call."""

    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                 writer: EventWriter) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.writer = writer
        self.policy = Policy(settings.integrations_allow_hosts)
        self.webhooks = WebhookSender(self.policy, timeout_s=settings.integrations_timeout_s)
        self.mqtt = MqttPublisher(self.policy, timeout_s=settings.integrations_timeout_s)
        self.public_url = settings.resolved_public_url()
        self.snapshot: dict[str, Info] = {}
        self._signature: tuple[Any, ...] | None = None
        self.lanes: dict[str, Lane] = {}
        self.targets: dict[tuple[str, int], asyncio.Semaphore] = {}
        self.recorder = Recorder(self)
        self.published = 0  # response events handed to the writer
        self.pressure = IngestPressure(writer, settings.integrations_yield_above,
                                       lambda: self.published)
        self._giving_way = asyncio.Lock()
        self._wake = asyncio.Event()
        self._rescan = True
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.dispatched = 0  # deliveries created (tests, bench)

    # -- lifecycle -----------------------------------------------------------------------------

    def wake(self, *_: Any) -> None:
        """New outbox rows or changed integrations (safe to call from any callback)."""
        self._wake.set()

    def changed(self) -> None:
        """Integrations changed or deliveries were queued again: rescan, then dispatch."""
        self._rescan = True
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self.run(),
                                                                name="integrations")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop taking work, let the lanes' requests in flight end (bounded by the request
        timeout), record their outcomes, close connections."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_lanes()
        await self.webhooks.aclose()
        await self.mqtt.aclose()

    async def _stop_lanes(self) -> None:
        lanes = list(self.lanes.values())
        for lane in lanes:
            lane.stop()
        await asyncio.gather(*(lane.join() for lane in lanes), return_exceptions=True)
        await self.recorder.flush()
        self.lanes.clear()
        PENDING_LANES.set(0)

    async def run_while(self, held: Callable[[], bool], *, check_s: float = 1.0) -> None:
        """Run :meth:`run` only while ``held()`` (this node holds the cluster's lease for
        the integrations): started when it becomes true, stopped (requests in flight
        finished and recorded) when it turns false, started again when it is back. A node
        that loses the lease mid-delivery may send an event its successor sends again:
        at least once, with the same ``webhook-id``."""
        body: asyncio.Task[None] | None = None
        try:
            while True:
                if held() and (body is None or body.done()):
                    self._rescan = True
                    body = asyncio.get_running_loop().create_task(self.run(),
                                                                  name="integrations")
                elif not held() and body is not None:
                    body.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await body
                    body = None
                    await self._stop_lanes()
                await asyncio.sleep(check_s)
        finally:
            if body is not None:
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await body

    async def run(self) -> None:
        """The worker's body: dispatch, keep lanes for integrations with pending work,
        prune. Runs until cancelled (a lease lost or the server stopping)."""
        self.recorder.start()
        last_rescan = last_prune = 0.0
        try:
            while True:
                self._wake.clear()
                try:
                    now = time.monotonic()
                    if self._rescan or now - last_rescan > RESCAN_S:
                        self._rescan = False
                        last_rescan = now
                        await self._refresh_snapshot(force=True)
                        await self._resume_lanes()
                    while await self.dispatch(limit=1 if self.pressure.busy() else
                                              OUTBOX_BATCH):
                        if self.pressure.busy():
                            await asyncio.sleep(YIELD_DISPATCH_S)
                    if now - last_prune > PRUNE_S:
                        last_prune = now
                        await self.prune()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("integration dispatch failed")
                    await asyncio.sleep(1.0)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.integrations_poll_s):
                        await self._wake.wait()
        finally:
            await self.recorder.stop()

    # -- the integrations snapshot ---------------------------------------------------------------

    async def _refresh_snapshot(self, db: AsyncSession | None = None, *,
                                force: bool = False) -> None:
        """Reload the integrations when any changed (one cheap aggregate query decides)."""
        async with contextlib.AsyncExitStack() as stack:
            if db is None:
                db = await stack.enter_async_context(self.sessionmaker())
            sig = tuple((await db.execute(select(
                func.count(), func.max(Integration.updated_at)))).one())
            if not force and sig == self._signature:
                return
            rows = (await db.execute(select(Integration))).scalars().all()
            old = self.snapshot
            self.snapshot = {r.id: Info.of(r) for r in rows}
            self._signature = sig
        for iid, info in old.items():
            new = self.snapshot.get(iid)
            if new is None or new.settings != info.settings:
                await self.mqtt.forget(iid)
            lane = self.lanes.get(iid)
            if lane is not None:
                lane.refresh(new)

    async def _resume_lanes(self) -> None:
        async with self.sessionmaker() as db:
            ids = (await db.execute(select(Delivery.integration_id).where(
                Delivery.status == "pending").distinct())).scalars().all()
        for iid in ids:
            self.lane(iid).wake()

    def lane(self, integration_id: str) -> Lane:
        lane = self.lanes.get(integration_id)
        if lane is None or lane.done:
            before = lane
            lane = self.lanes[integration_id] = Lane(self, integration_id)
            if before is not None:
                # deliveries the ended lane sent whose outcomes the recorder has not written
                # yet are still ``pending`` in the database: the successor must not send them
                # again. The sets are shared, so the recorder's ``settled`` reaches both.
                lane.busy, lane.settled = before.busy, before.settled
            lane.start()
            PENDING_LANES.set(len(self.lanes))
        return lane

    def target_slot(self, target: tuple[str, int]) -> asyncio.Semaphore:
        sem = self.targets.get(target)
        if sem is None:
            sem = self.targets[target] = asyncio.Semaphore(
                self.settings.integrations_target_concurrency)
        return sem

    # -- dispatch ----------------------------------------------------------------------------------

    async def dispatch(self, limit: int = OUTBOX_BATCH) -> int:
        """Turn up to ``limit`` outbox rows into deliveries; how many rows it took."""
        now = clock.now()
        touched: set[str] = set()
        async with self.sessionmaker() as db:
            batches = (await db.execute(
                select(IntegrationOutbox.id, IntegrationOutbox.first_event_id,
                       IntegrationOutbox.last_event_id)
                .order_by(IntegrationOutbox.id).limit(limit)
                # several nodes may dispatch (a lease handing over): each row goes to one
                .with_for_update(skip_locked=True))).all()
            if not batches:
                return 0
            await self._refresh_snapshot(db)
            by_product: dict[int, list[Info]] = collections.defaultdict(list)
            by_org: dict[int, list[Info]] = collections.defaultdict(list)
            by_owner: dict[int, list[Info]] = collections.defaultdict(list)
            for info in self.snapshot.values():
                if info.disabled and info.disabled_reason is None:
                    continue  # disabled by the user: its events are not kept
                if info.product_id is not None:
                    by_product[info.product_id].append(info)
                elif info.org_id is not None:
                    by_org[info.org_id].append(info)
                elif info.owner_user_id is not None:
                    by_owner[info.owner_user_id].append(info)
            rows: list[dict[str, Any]] = []
            if by_product or by_org or by_owner:
                ranges = or_(*(Event.id.between(b.first_event_id, b.last_event_id)
                               for b in batches))
                events = (await db.execute(select(
                    Event.id, Event.name, Event.device_id, Event.product_id, Event.org_id,
                    Event.owner_user_id).where(ranges))).all()
                for ev in events:
                    if not may_trigger(ev.name):
                        continue
                    candidates = (by_product.get(ev.product_id, [])
                                  + by_org.get(ev.org_id, [])
                                  + by_owner.get(ev.owner_user_id, []))
                    for info in candidates:
                        if not service.matches(info, ev):
                            continue
                        skipped = info.disabled  # disabled by corral: kept, not sent
                        rows.append({
                            "integration_id": info.id, "event_id": ev.id,
                            "product_id": ev.product_id, "device_id": ev.device_id,
                            "status": "skipped" if skipped else "pending", "attempts": 0,
                            "next_attempt_at": now, "created_at": now,
                            "finished_at": now if skipped else None,
                            "last_error": info.disabled_reason if skipped else None})
                        if not skipped:
                            touched.add(info.id)
            if rows:
                await db.execute(_insert_ignore(db), rows)
            await db.execute(delete(IntegrationOutbox).where(
                IntegrationOutbox.id.in_([b.id for b in batches])))
            await db.commit()
        self.dispatched += len(rows)
        for iid in touched:
            self.lane(iid).wake()
        return len(batches)

    # -- housekeeping -------------------------------------------------------------------------------

    async def prune(self) -> None:
        """Deliveries and log rows older than the event retention go."""
        cutoff = clock.now() - dt.timedelta(days=self.settings.event_retention_days)
        async with self.sessionmaker() as db:
            await db.execute(delete(Delivery).where(
                Delivery.status != "pending", Delivery.created_at < cutoff))
            await db.execute(delete(Attempt).where(Attempt.at < cutoff))
            await db.commit()

    async def test(self, row: Integration, *, data: str, device_id: str | None
                   ) -> tuple[Outcome, Attempt]:
        """``POST .../integrations/:id/test``: send a test event now (through the same
        guard and signing); the attempt is logged (``outcome: test``) in the caller's
        transaction by the route."""
        info = Info.of(row)
        facts = templates.EventFacts(
            event_id=None, name=row.event, data=data, published_at=clock.iso(clock.now()) or "",
            device_id=device_id, product_id=row.product_id, owner_user_id=row.owner_user_id)
        outcome = await self.send(info, facts)
        attempt = Attempt(integration_id=row.id, delivery_id=None, event_id=None,
                          at=clock.now(), outcome="test", status_code=outcome.status_code,
                          latency_ms=outcome.latency_ms, request=outcome.request,
                          response=outcome.response, error=outcome.error)
        return outcome, attempt

    async def send(self, info: Info, facts: templates.EventFacts) -> Outcome:
        if not self.pressure.busy():
            return await self._send(info, facts)
        # the node's ingest is busy: one request at a time across every lane, then a pause
        # several times as long as it took, so deliveries take a bounded share of the loop
        async with self._giving_way:
            started = time.monotonic()
            try:
                return await self._send(info, facts)
            finally:
                await asyncio.sleep(min(1.0, YIELD_IDLE * (time.monotonic() - started)))

    async def _send(self, info: Info, facts: templates.EventFacts) -> Outcome:
        if info.integration_type == schemas.MQTT:
            return await self.mqtt.send(info.id, info.settings, facts)
        async with self.target_slot(info.target):
            return await self.webhooks.send(info.settings, facts, integration_id=info.id,
                                            secret=info.signing_secret)

    def publish(self, rows: list[NewEvent]) -> None:
        """Hand response events to the event writer without waiting for them."""
        self.published += len(rows)
        for row in rows:
            try:
                fut = self.writer.write_nowait(row)
                fut.add_done_callback(_quiet)
            except WriterStopped:
                return
            except asyncio.QueueFull:
                task = asyncio.get_running_loop().create_task(self.writer.write(row))
                task.add_done_callback(_quiet)


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("a webhook response event was not stored: %r", fut.exception())


def _insert_ignore(db: AsyncSession) -> Any:
    if db.bind is not None and db.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(Delivery).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(Delivery).on_conflict_do_nothing()


# --- lanes -----------------------------------------------------------------------------------

_DUE = (
    select(Delivery.id, Delivery.event_id, Delivery.attempts, Delivery.next_attempt_at,
           Event.name, Event.data,
           Event.published_at, Event.device_id, Event.product_id, Event.org_id,
           Event.owner_user_id, Event.customer_id, Device.firmware_version)
    .outerjoin(Event, Event.id == Delivery.event_id)
    .outerjoin(Device, Device.id == Event.device_id)
)


class Lane:
    """One integration's queue: its due deliveries, sent with bounded concurrency."""

    def __init__(self, worker: IntegrationWorker, integration_id: str) -> None:
        self.worker = worker
        self.id = integration_id
        self.info: Info | None = worker.snapshot.get(integration_id)
        self.queue: collections.deque[Any] = collections.deque()
        self.busy: set[int] = set()  # deliveries queued, in flight, or not recorded yet
        # recorded (committed) since the last fill; leave ``busy`` when the next fill starts,
        # so a fill whose query began before that commit cannot take them again
        self.settled: set[int] = set()
        self.inflight = 0
        self.failures = self.info.consecutive_failures if self.info else 0
        self.failing_since = self.info.failing_since if self.info else None
        self.pause_until = 0.0  # monotonic: a 429's Retry-After, or the throttle's cooldown
        self.disabling = False
        self._wake = asyncio.Event()
        self._stop = False
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(),
                                                            name=f"integration-{self.id}")

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    async def join(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def refresh(self, info: Info | None) -> None:
        """The integration changed (or was deleted, or re-enabled)."""
        if info is not None and self.info is not None and self.info.disabled \
                and not info.disabled:
            self.failures, self.failing_since, self.disabling = 0, None, False
            self.pause_until = 0.0
        self.info = info
        for r in self.queue:  # re-read with the new settings
            self.busy.discard(r.id)
        self.queue.clear()
        self._wake.set()

    @property
    def throttled(self) -> bool:
        return self.failures >= self.worker.settings.integrations_throttle_after

    def _limit(self) -> int:
        return 1 if self.throttled else self.worker.settings.integrations_concurrency

    async def run(self) -> None:
        idle_since = time.monotonic()
        try:
            while not self._stop:
                info = self.info
                if info is None or info.disabled or self.disabling:
                    break
                self._wake.clear()
                now = time.monotonic()
                wait: float | None = None
                if now < self.pause_until:
                    wait = self.pause_until - now
                elif self.inflight < self._limit():
                    if not self.queue:
                        try:
                            wait = await self._fill()
                        except Exception:  # the database busy or away: the lane waits
                            log.exception("integration %s: reading due deliveries failed",
                                          self.id)
                            wait = FILL_RETRY_S
                    while self.queue and self.inflight < self._limit():
                        self._spawn(info, self.queue.popleft())
                    if self.throttled and self.inflight:
                        wait = None  # one probe at a time: wait for it
                if self.inflight or self.queue or self.busy:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > LANE_IDLE_S:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, LANE_IDLE_S) if wait is not None
                                               else LANE_IDLE_S):
                        await self._wake.wait()
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            # a lane whose sent deliveries are not recorded yet stays registered (done), so
            # its successor inherits them (IntegrationWorker.lane) instead of finding them
            # still pending and sending them again (a lane ending as it disables the
            # integration, with the third failure's outcome not yet written)
            if self.worker.lanes.get(self.id) is self and not self.busy - self.settled:
                del self.worker.lanes[self.id]
                PENDING_LANES.set(len(self.worker.lanes))

    async def _fill(self) -> float | None:
        """Take due deliveries from the database; when none is due, the seconds until the
        next one is (None: nothing pending)."""
        now = clock.now()
        self.busy -= self.settled
        self.settled.clear()
        async with self.worker.sessionmaker() as db:
            rows = (await db.execute(_DUE.where(
                Delivery.integration_id == self.id, Delivery.status == "pending",
                Delivery.next_attempt_at <= now).order_by(Delivery.id)
                .limit(FETCH + len(self.busy)))).all()
            fresh = [r for r in rows if r.id not in self.busy]
            if fresh:
                for r in fresh:
                    self.busy.add(r.id)
                    self.queue.append(r)
                return None
            cond = [Delivery.integration_id == self.id, Delivery.status == "pending"]
            if self.busy:
                cond.append(Delivery.id.not_in(list(self.busy)[:1000]))
            nxt = (await db.execute(select(func.min(Delivery.next_attempt_at))
                                    .where(*cond))).scalar_one_or_none()
        if nxt is None:
            return None
        nxt = clock.aware(nxt)
        assert nxt is not None
        return max(0.01, (nxt - clock.now()).total_seconds())

    def _spawn(self, info: Info, row: Any) -> None:
        self.inflight += 1
        task = asyncio.get_running_loop().create_task(self._deliver(info, row))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, info: Info, row: Any) -> None:
        settings = self.worker.settings
        try:
            if row.name is None:
                outcome = Outcome("failed", error="the event is no longer stored")
            else:
                facts = templates.EventFacts(
                    event_id=row.event_id, name=row.name, data=row.data,
                    published_at=clock.iso(row.published_at) or "", device_id=row.device_id,
                    product_id=row.product_id, owner_user_id=row.owner_user_id,
                    firmware_version=row.firmware_version)
                try:
                    outcome = await self.worker.send(info, facts)
                except Exception as exc:  # a bug must not lose the delivery: retry it
                    log.exception("integration %s: sending failed", info.id)
                    outcome = Outcome("retry", error=f"internal error: {exc!r}"[:500])
                if info.integration_type == schemas.WEBHOOK:
                    self.worker.publish(self._responses(info, facts, outcome,
                                                        first=row.attempts == 0, row=row))
            attempts = row.attempts + 1
            now = clock.now()
            if outcome.ok:
                status, nxt = "success", now
            elif outcome.kind == "retry" and attempts < settings.integrations_max_attempts:
                status = "pending"
                nxt = now + dt.timedelta(seconds=self._backoff(attempts, outcome.retry_after))
            else:
                status, nxt = "failed", now
            DELIVERED.labels(outcome.kind if status != "failed" else "failed").inc()
            decided = self.disabling
            self._health(outcome)
            decided = self.disabling and not decided  # this failure disables the integration
            await self.worker.recorder.add(Result(
                self, row.id, row.event_id, status, attempts, nxt, row.next_attempt_at,
                outcome, now, self.failures, self.failing_since, decided))
        finally:
            self.inflight -= 1
            self._wake.set()

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        s = self.worker.settings
        delay = float(min(s.integrations_retry_max_s,
                          s.integrations_retry_base_s * 2 ** (attempts - 1)))
        delay *= random.uniform(0.5, 1.0)  # jitter: retries of many events spread out
        if retry_after is not None:
            delay = max(delay, min(retry_after, 86_400.0))
        return delay

    def _health(self, outcome: Outcome) -> None:
        s = self.worker.settings
        if outcome.ok:
            self.failures, self.failing_since = 0, None
            return
        self.failures += 1
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = clock.now()
        if outcome.retry_after is not None:  # the target asked for a pause (429, 503)
            self.pause_until = max(self.pause_until, now + min(outcome.retry_after, 3600.0))
        if self.throttled:  # one probe at a time, further apart each failure
            n = self.failures - s.integrations_throttle_after
            cooldown = min(s.integrations_retry_max_s, s.integrations_retry_base_s * 2 ** n)
            self.pause_until = max(self.pause_until, now + cooldown * random.uniform(0.5, 1.0))
            failing = (clock.now() - self.failing_since).total_seconds()
            if failing >= s.integrations_disable_after_s \
                    and self.failures >= s.integrations_disable_min_failures:
                self.disabling = True

    def _responses(self, info: Info, facts: templates.EventFacts, outcome: Outcome, *,
                   first: bool, row: Any) -> list[NewEvent]:
        """The events a webhook's answer becomes: its body as ``hook-response`` chunks, or
        an error as ``hook-error`` (on the first failed attempt; later retries are quiet)."""
        if outcome.ok:
            text = service.response_text(info, facts, outcome.body)
            if not text:
                return []
            topic = service.response_topics(info, facts)[0]
        elif first:
            text = outcome.error or "error"
            topic = service.response_topics(info, facts)[1]
        else:
            return []
        at = clock.now()
        return [NewEvent(name=name, data=part, source="cloud", device_id=None,
                         product_id=row.product_id, org_id=row.org_id,
                         owner_user_id=row.owner_user_id, customer_id=row.customer_id,
                         published_at=at)
                for name, part in service.chunks(topic, text)]


# --- the recorder -------------------------------------------------------------------------

class Recorder:
    """Writes attempt outcomes in batches (one transaction per flush)."""

    def __init__(self, worker: IntegrationWorker) -> None:
        self.worker = worker
        self.pending: list[Result] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.logged: collections.Counter[str] = collections.Counter()  # since last prune
        self.flushes = 0

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="integration-recorder")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def add(self, result: Result) -> None:
        self.pending.append(result)
        if len(self.pending) >= FLUSH_MAX or self._task is None:
            if self._task is None:  # not running (a test driving lanes by hand)
                await self.flush()
                return
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_S)  # gather a batch
            try:
                await self.flush()
            except Exception:
                log.exception("recording integration outcomes failed; retrying")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def flush(self) -> None:
        async with self._lock:
            batch, self.pending = self.pending, []
            if not batch:
                return
            try:
                written = await self._write(batch)
            except BaseException:
                self.pending[:0] = batch  # keep them for the next try
                raise
            # committed: whatever fails from here on must not write the batch again (its
            # log rows would be doubled)
            self.flushes += 1
            for r in batch:
                r.lane.settled.add(r.delivery_id)
                r.lane.wake()
            if written is not None:
                await self._after_commit(*written)

    async def _write(self, batch: list[Result]
                     ) -> tuple[dict[str, Result], dict[str, Result]] | None:
        """The batch's outcomes in one transaction; what :meth:`_after_commit` needs (None
        when nothing was written)."""
        worker = self.worker
        async with worker.sessionmaker() as db:
            # an integration deleted while its requests were in flight: nothing to record
            alive = set((await db.execute(select(Integration.id).where(
                Integration.id.in_({r.lane.id for r in batch})))).scalars())
            batch = [r for r in batch if r.lane.id in alive]
            if not batch:
                return None
            table: Any = Delivery.__table__  # core: an executemany, not an ORM bulk update
            await db.execute(
                update(table).where(table.c.id == bindparam("b_id"))
                # only over the delivery as its lane took it: still pending (not skipped by a
                # user's disable meanwhile) and not redelivered since (a new due time)
                .where(table.c.status == "pending",
                       table.c.next_attempt_at == bindparam("b_taken"))
                .values(status=bindparam("b_status"), attempts=bindparam("b_attempts"),
                        next_attempt_at=bindparam("b_next"), finished_at=bindparam("b_done"),
                        last_status_code=bindparam("b_code"), last_error=bindparam("b_error")),
                [{"b_id": r.delivery_id, "b_status": r.status, "b_attempts": r.attempts,
                  "b_next": r.next_attempt_at, "b_taken": r.taken_due,
                  "b_done": None if r.status == "pending" else r.at,
                  "b_code": r.outcome.status_code,
                  "b_error": (r.outcome.error or None) and r.outcome.error[:500]}
                 for r in batch])
            await db.execute(Attempt.__table__.insert(), [  # type: ignore[attr-defined]
                {"integration_id": r.lane.id, "delivery_id": r.delivery_id,
                 "event_id": r.event_id, "at": r.at,
                 "outcome": r.outcome.kind if r.status != "failed" else "failed",
                 "status_code": r.outcome.status_code, "latency_ms": r.outcome.latency_ms,
                 "request": r.outcome.request, "response": r.outcome.response,
                 "error": (r.outcome.error or None) and r.outcome.error[:500]}
                for r in batch])
            last: dict[str, Result] = {}  # per integration, its latest outcome in the batch
            for r in batch:
                last[r.lane.id] = r
            disabling = {r.lane.id: r for r in batch if r.disable}
            for iid, r in last.items():
                values: dict[str, Any] = {"consecutive_failures": r.failures,
                                          "failing_since": r.failing_since}
                values["last_success_at" if r.outcome.ok else "last_failure_at"] = r.at
                # health is not a configuration change: leave updated_at (the snapshot's
                # change detector) alone
                await db.execute(update(Integration).where(Integration.id == iid)
                                 .values(**values, updated_at=Integration.updated_at)
                                 .execution_options(synchronize_session=False))
                self.logged[iid] += sum(1 for x in batch if x.lane.id == iid)
            for iid, r in disabling.items():  # in the transaction of the failure that does it
                row = await db.get(Integration, iid)
                if row is not None and not row.disabled:
                    s = worker.settings
                    await service.disable_for_failures(
                        db, row, f"its target failed {r.failures} times in a row for "
                        f"more than {s.integrations_disable_after_s:g} s "
                        f"(last error: {r.outcome.error})"[:300],
                        public_url=worker.public_url)
            await commit(db)  # runs the after-commit hooks (the mailer's wake-up)
        return last, disabling

    async def _after_commit(self, last: dict[str, Result],
                            disabling: dict[str, Result]) -> None:
        """After a batch committed: the lanes' snapshot, the log's trim, a rescan if one
        was disabled."""
        worker = self.worker
        for iid, r in last.items():
            info = worker.snapshot.get(iid)
            if info is not None:
                worker.snapshot[iid] = dataclasses.replace(
                    info, consecutive_failures=r.failures, failing_since=r.failing_since)
        if disabling:
            worker.changed()
        keep = worker.settings.integrations_log_keep
        for iid, n in list(self.logged.items()):
            if n >= max(10, keep // 2):
                self.logged[iid] = 0
                await self._trim(iid, keep)

    async def _trim(self, integration_id: str, keep: int) -> None:
        """Keep the newest ``keep`` log rows of an integration."""
        async with self.worker.sessionmaker() as db:
            cut = (await db.execute(select(Attempt.id).where(
                Attempt.integration_id == integration_id).order_by(Attempt.id.desc())
                .offset(keep).limit(1))).scalar_one_or_none()
            if cut is not None:
                await db.execute(delete(Attempt).where(and_(
                    Attempt.integration_id == integration_id, Attempt.id <= cut)))
                await db.commit()

