"""The metering service: folds usage deltas, recomputes the usage gate, fires usage warnings.

:meth:`MeteringService.tick` (tests call it directly with a ManualClock) first folds the
usage deltas committed since the last tick into ``usage_counters`` (its own transaction:
:func:`corral.metering.ledger.fold_pending`), then reads, in one
transaction, every organization's usage in its current allowance period, plan and billable
devices; fires the 70/90/100 % warnings not fired yet (:mod:`corral.metering.alerts`);
commits; stores the warnings' events through the event writer; and hands the new state to
the :class:`~corral.metering.gate.UsageGate`. It runs every ``metering_refresh_s`` seconds,
at once after a plan change commits (:meth:`wake`), and at the start of each UTC month (a new
allowance period resumes paused organizations).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.kit import clock
from corral.metering import alerts, daily, ledger, plans, sims, usage
from corral.metering.gate import Snapshot, UsageGate
from corral.metering.plans import MB, EffectivePlan, add_months, month_start
from corral.orgs.models import Organization

log = logging.getLogger("corral.metering")


@dataclasses.dataclass(slots=True)
class OrgState:
    """One organization's position in its current allowance period."""

    org_id: int
    plan: EffectivePlan
    period_start: dt.date
    period_end: dt.date
    data_operations: int
    cellular_bytes: int
    billable_devices: int
    paused: str | None


@dataclasses.dataclass(slots=True)
class TickResult:
    orgs: dict[int, OrgState]
    fired: list[alerts.Fired]
    paused: dict[int, str]
    resumed: list[int]


def pause_reason(plan: EffectivePlan, metric: str, period_end: dt.date) -> str:
    what = "data operations" if metric == "data_operations" else "cellular data"
    return (f"The organization's {what} for this period are used up; device communication "
            f"is paused until {period_end.isoformat()} or until the plan adds blocks")


class MeteringService:
    """Background metering work for one server process (see the module docstring)."""

    def __init__(self, settings: Any, gate: UsageGate) -> None:
        self.settings = settings
        self.gate = gate
        self.sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self.writer: Any = None  # corral.events.writer.EventWriter
        self.hub: Any = None  # corral.sessions.core.SessionHub (cellular byte flushes)
        self.ticks = 0
        self.folded = 0  # counter rows changed by folds
        self.last: TickResult | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._paused_by_limit: set[int] = set()
        self.billable_every_s = 60.0
        self._billable: tuple[dt.date, dict[int, int]] | None = None
        self._billable_at = 0.0
        self._days: dict[int, tuple[dt.date, tuple[int, int, int]]] = {}  # recorded readings
        self._sim_days: dict[str, tuple[dt.date, int]] = {}  # SIM readings recorded today
        # scaled out: only the holder of the metering lease folds usage and fires warnings;
        # every node refreshes its own gate
        self.leads: Callable[[], bool] = lambda: True

    def attach(self, sessionmaker: async_sessionmaker[AsyncSession], writer: Any,
               hub: Any = None) -> None:
        self.sessionmaker, self.writer, self.hub = sessionmaker, writer, hub

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Seed missing plan rows, compute the gate once, then (``background``) keep it
        current."""
        assert self.sessionmaker is not None, "attach() first"
        async with self.sessionmaker() as db:
            if await plans.ensure_seeded(db):
                await db.commit()
        try:
            await self.tick()
        except Exception:
            log.exception("metering: first refresh failed")
        if background:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metering")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush_cellular()

    def wake(self) -> None:
        """Recompute now (a plan changed); safe to call from an after-commit hook."""
        self._wake.set()

    async def _run(self) -> None:
        interval = float(getattr(self.settings, "metering_refresh_s", 5.0))
        while True:
            now = clock.now()
            nxt = add_months(month_start(now.date()), 1)
            to_month = (dt.datetime(nxt.year, nxt.month, 1, tzinfo=dt.UTC) - now).total_seconds()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, min(interval, to_month + 0.001))):
                    await self._wake.wait()
            # cleared only now: a wake-up that arrives during the refresh triggers another
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                await self.flush_cellular()
                await self.tick(full=woken)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("metering refresh failed")

    async def flush_cellular(self) -> None:
        """Hand every session's counted cellular bytes to the event writer."""
        hub = self.hub
        if hub is None:
            return
        for session in list(hub.sessions.values()):
            flush = getattr(session, "flush_bytes", None)
            if flush is not None:
                with contextlib.suppress(Exception):
                    flush()

    # -- the refresh -----------------------------------------------------------------------

    async def tick(self, now: dt.datetime | None = None, *, full: bool = True) -> TickResult:
        """Recompute every organization's state, fire due warnings, update the gate.
        Billable devices (a scan of the devices) are recounted when ``full``, else at most
        every ``billable_every_s`` (the gate counts newly admitted devices in between)."""
        async with self._lock:
            return await self._tick(now or clock.now(), full)

    async def fold(self) -> int:
        """Fold the usage deltas committed so far into the counters (its own transaction)."""
        assert self.sessionmaker is not None
        try:
            async with self.sessionmaker() as db:
                n = await ledger.fold_pending(db)
                await db.commit()
        except Exception as exc:
            if not ledger.is_fold_conflict(exc):
                raise
            log.info("metering: another node folded the usage deltas first")
            return 0
        self.folded += n
        return n

    async def _tick(self, now: dt.datetime, full: bool) -> TickResult:
        assert self.sessionmaker is not None
        lead = self.leads()
        try:
            if lead:
                await self.fold()
        except Exception:  # readers add unfolded deltas: the refresh is exact regardless
            log.exception("metering: folding usage deltas failed")
        gate = self.gate
        gate.begin()
        month = month_start(now.date())
        public_url = self.settings.resolved_public_url()
        async with self.sessionmaker() as db:
            user_org = await usage.personal_orgs(db)
            free = await plans.free_plan(db)
            org_plans = await plans.effective_plans(db)
            # this month for everyone; earlier months only for yearly pools
            monthly = await usage.monthly_by_org(db, month, user_org)
            yearly = {org for org, p in org_plans.items() if p.period != "month"}
            if yearly:
                older = await usage.monthly_by_org(db, add_months(month, -11), user_org,
                                                   only=yearly)
                for org, months in older.items():
                    monthly.setdefault(org, {}).update(months)
            billable = self._billable
            if full or billable is None or billable[0] != month or \
                    time.monotonic() - self._billable_at >= self.billable_every_s:
                # devices admitted as new stay counted by the gate until a recount sees them
                stored = await usage.committed_first_online(db, sorted(gate.fresh()))
                billable = (month, await usage.billable_by_org(db, month, user_org))
                gate.stored(stored)
                self._billable, self._billable_at = billable, time.monotonic()
            billable_now = billable[1]
            extra: dict[int, str] = {}
            for source in list(gate.sources):
                try:
                    extra.update(await source(db))
                except Exception:
                    log.exception("metering: a pause source failed")
            known = await alerts.fired_since(db, add_months(month, -11))
            org_ids = set(monthly) | set(org_plans) | set(billable_now)
            names = await _org_names(db, org_ids | self._paused_by_limit)
            owners = {org: user for user, org in user_org.items()}
            states: dict[int, OrgState] = {}
            fired: list[alerts.Fired] = []
            paused: dict[int, str] = {}
            remaining: dict[int, int] = {}
            limit_reason: dict[int, str] = {}
            for org in sorted(org_ids):
                if org not in names:
                    continue  # usage of a deleted organization
                plan = org_plans.get(org, free)
                start, end = plan.period_bounds(now)
                rows = [r for p, r in monthly.get(org, {}).items() if start <= p < end]
                ops = sum(usage.metric_ops(r, plan) for r in rows)
                cell = sum(r["cellular_bytes"] for r in rows)
                reason: str | None = None
                if plan.pause_at_limit:
                    if ops >= plan.max_data_ops:
                        reason = pause_reason(plan, "data_operations", end)
                    elif cell >= plan.max_cellular_mb * MB:
                        reason = pause_reason(plan, "cellular_data", end)
                    else:
                        remaining[org] = plan.max_data_ops - ops
                    limit_reason[org] = pause_reason(plan, "data_operations", end)
                for metric, used, allowance in (
                        ("data_operations", ops, plan.max_data_ops),
                        ("cellular_data", cell, plan.max_cellular_mb * MB)):
                    if not lead:
                        continue
                    fired += await alerts.fire(
                        db, org_id=org, owner_user_id=owners.get(org), org_name=names[org],
                        plan=plan, period=start, period_end=end, metric=metric, used=used,
                        allowance=allowance, public_url=public_url, known=known)
                if reason is not None:
                    paused[org] = reason
                states[org] = OrgState(org, plan, start, end, ops, cell,
                                       billable_now.get(org, 0), reason)
            for org, why in extra.items():
                paused.setdefault(org, why)
            now_limited = {org for org, s in states.items() if s.paused}
            resumed = sorted(self._paused_by_limit - now_limited)
            for org in resumed:
                if org in names and lead:
                    await alerts.resumed(db, org, "The organization's allowance allows device "
                                         "communication again (a new period or more blocks).")
            days: dict[int, tuple[int, int, int]] = {}
            sim_days: dict[str, int] = {}
            if lead:  # the per-day series of the console's chart (changed readings only)
                today = now.date()
                for org, months in monthly.items():
                    row = months.get(month)
                    if row is None or org not in names:
                        continue
                    value = daily.reading(row)
                    if self._days.get(org) != (today, value):
                        days[org] = value
                await daily.record(db, today, days)
                # each SIM's month-to-date cellular data (the SIM data_usage routes)
                sim_now = await sims.month_readings(db, month)
                sim_days = {i: b for i, b in sim_now.items()
                            if self._sim_days.get(i) != (today, b)}
                await sims.record_days(db, today, sim_days)
            await db.commit()
        for org, value in days.items():
            self._days[org] = (now.date(), value)
        for iccid, used in sim_days.items():
            self._sim_days[iccid] = (now.date(), used)
        self._paused_by_limit = now_limited
        free_end = add_months(month, 1)
        gate.apply(Snapshot(
            user_org=user_org, known=set(states), paused=paused, remaining=remaining,
            limit_reason=limit_reason,
            max_devices={org: s.plan.max_devices for org, s in states.items()},
            devices=billable_now,
            free_budget=free.max_data_ops if free.pause_at_limit else None,
            free_reason=pause_reason(free, "data_operations", free_end),
            free_max_devices=free.max_devices))
        if fired and self.writer is not None:
            for f in fired:
                try:
                    await self.writer.write(f.event())
                except Exception:
                    log.exception("usage warning event for org %s not stored", f.org_id)
        self.ticks += 1
        result = TickResult(states, fired, paused, resumed)
        self.last = result
        return result


async def _org_names(db: AsyncSession, org_ids: set[int]) -> dict[int, str]:
    if not org_ids:
        return {}
    out: dict[int, str] = {}
    ids = sorted(org_ids)
    for i in range(0, len(ids), 500):
        rows = (await db.execute(select(Organization.id, Organization.name).where(
            Organization.id.in_(ids[i:i + 500])))).all()
        out.update({int(r[0]): str(r[1]) for r in rows})
    return out


__all__ = ["MeteringService", "OrgState", "TickResult"]
