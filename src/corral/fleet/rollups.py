"""Fleet rollups: per-minute and hourly counters per product and firmware version, and per
device and day, written from what the node already sees, never from scanning events.

:class:`FleetTally` (one per node) counts in memory and adds its counts to the rollup tables
every ``flush_s`` seconds, in one transaction (an upsert that adds, so every node adds its own
counts to the same rows):

* events: the event writer's after-commit hook (committed device events, not the cloud's
  ``spark*``/``particle*`` system events) and its ``spark/status`` events (connects and
  disconnects, with the per-device-day disconnect count). Per device event the hook raises
  one counter keyed by device, product, firmware version and epoch minute; these are folded
  into the rollup dictionaries per distinct key when flushing (bench B16);
* function and variable calls: the session core's call results (success, failure,
  timeout) and the API's "device offline" answers;
* data operations: the writer's counted publishes (with their rows) and the usage
  increments it commits for deliveries, function calls and variable reads;
* the firmware version of a device is what its session said (Hello, describe), carried by
  the event it published (``StoredEvent.firmware_version``) or looked up for the rest; 0
  when not known.

The same counts go to the segment rollups (``fleet_segment_minutes``/``_hours``), which
answer fleet health filtered by device group or by Device OS version: a device's counts are
kept per device until the flush, which looks up the devices' groups and Device OS versions
(two indexed reads per 500 devices counted, cached for ``SEGMENT_TTL_S``) and adds them to
each segment the device is in (``g:<group id>``, ``os:<version>``). A device is counted
under the groups it is in when its counts are flushed (at most ``SEGMENT_TTL_S`` late after
a change of its groups), never under the groups it joins later.

Online devices per minute are sampled by :func:`sample_online` (a singleton, once a
minute): a grouped count of the devices table (indexed), kept as the most seen in the
bucket. A node that dies loses at most ``flush_s`` seconds of its counts; a node that stops
flushes them first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from sqlalchemy import case, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.devices.models import Device, DeviceGroupMember
from corral.devices.presence import Offline
from corral.events.writer import StoredEvent
from corral.fleet.models import (
    FleetDeviceCount,
    FleetDeviceDay,
    FleetDisconnect,
    FleetHour,
    FleetMinute,
    FleetSegmentDeviceCount,
    FleetSegmentDisconnect,
    FleetSegmentHour,
    FleetSegmentMinute,
    FleetTroubledDay,
)
from corral.kit import clock
from corral.kit.aio import cancel_and_wait
from corral.metering.ledger import Usage

log = logging.getLogger("corral.fleet")

COUNTERS = ("events", "connects", "disconnects", "fn_success", "fn_failure", "fn_offline",
            "var_success", "var_failure", "var_offline", "fn_timeout", "var_timeout",
            "data_ops")
_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_EVENTS, _DATA_OPS = _INDEX["events"], _INDEX["data_ops"]
CallOutcome = Literal["success", "failure", "timeout", "offline"]
# usage kinds that are data operations and do not come with an event row (a counted
# publish is counted from its row)
DATA_OP_KINDS = frozenset({"delivery", "function", "variable"})
Key = tuple[int, dt.datetime, int]  # product, minute, firmware version
DeviceKey = tuple[str, int, dt.datetime, int]  # device, product, minute, firmware version
SegmentKey = tuple[int, str, dt.datetime, int]  # product, segment, minute, firmware version
PendingKey = tuple[str, int, int | None, int]  # device, product, firmware version, epoch minute
_SYSTEM = ("spark", "particle")  # (lower case) prefixes of the cloud's own event names
_MINUTE = dt.timedelta(minutes=1)
SEGMENT_TTL_S = 60.0  # how long a device's looked-up segments are used
SEGMENT_CACHE_MAX = 200_000  # devices whose segments are cached (cleared when over)
LOOKUP_CHUNK = 500  # device IDs per segment look-up


def group_segment(group_id: int) -> str:
    return f"g:{group_id}"


def os_segment(version: str) -> str:
    return f"os:{version}"


def minute_of(at: dt.datetime) -> dt.datetime:
    at = at.astimezone(dt.UTC) if at.tzinfo else at.replace(tzinfo=dt.UTC)
    return at.replace(second=0, microsecond=0)


def hour_of(at: dt.datetime) -> dt.datetime:
    return minute_of(at).replace(minute=0)


def day_of(at: dt.datetime) -> dt.datetime:
    return hour_of(at).replace(hour=0)


class FleetTally:
    """This node's counts since the last flush (see the module doc)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *,
                 firmware_of: Callable[[str], int | None] | None = None,
                 flush_s: float = 5.0) -> None:
        self.sessionmaker = sessionmaker
        self.firmware_of = firmware_of or (lambda _device: None)
        self.flush_s = flush_s
        self.pending: dict[PendingKey, int] = {}  # device events since the last fold
        self.pending_ops: dict[PendingKey, int] = {}  # of which counted (data operations)
        self.counts: dict[Key, list[int]] = {}
        self.per_device: dict[DeviceKey, list[int]] = {}  # the same, per device (segments)
        self._segments: dict[str, tuple[float, tuple[str, ...]]] = {}  # device -> (until, s)
        self.device_days: dict[tuple[str, dt.datetime, int], list[int]] = {}
        self.last_firmware: dict[str, int] = {}  # connected devices' versions (for offline)
        self.reasons: dict[tuple[int, dt.datetime, str], int] = {}  # disconnects by reason
        self.device_reasons: dict[tuple[str, int, dt.datetime, str], int] = {}  # (segments)
        self.flushes = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- counting (synchronous, on the hot paths) ---------------------------------------------

    def _add(self, device_id: str, product_id: int, at: dt.datetime, firmware: int | None,
             counter: str) -> None:
        minute, fw = minute_of(at), firmware or 0
        key = (product_id, minute, fw)
        row = self.counts.get(key)
        if row is None:
            row = self.counts[key] = [0] * len(COUNTERS)
        row[_INDEX[counter]] += 1
        dkey = (device_id, product_id, minute, fw)
        drow = self.per_device.get(dkey)
        if drow is None:
            drow = self.per_device[dkey] = [0] * len(COUNTERS)
        drow[_INDEX[counter]] += 1

    def _device_day(self, device_id: str, product_id: int, at: dt.datetime, which: int) -> None:
        key = (device_id, day_of(at), product_id)
        row = self.device_days.get(key)
        if row is None:
            row = self.device_days[key] = [0, 0]
        row[which] += 1

    def __call__(self, events: Sequence[StoredEvent]) -> None:
        """The event writer's after-commit hook. Per device event one counter in
        ``pending`` goes up, keyed by device, product, firmware version (the publishing
        session's, carried by the event) and epoch minute; the minute of a batch's events
        is worked out once per minute seen, not per event. ``pending`` is folded into the
        rollup dictionaries per distinct key when flushing (bench B16)."""
        pending, ops = self.pending, self.pending_ops
        lo = hi = None  # the minute of the last event counted: [lo, hi), epoch minute m
        m = 0
        for e in events:
            product_id, device_id = e.product_id, e.device_id
            if product_id is None or not device_id:
                continue
            if e.source != "device":
                if e.name == "spark/status" and e.source == "cloud":
                    self._status(e, device_id, product_id)
                continue
            name = e.name
            if name[:1] in "sSpP" and name[:8].lower().startswith(_SYSTEM):
                continue
            at = e.published_at
            try:
                same = lo <= at < hi  # type: ignore[operator]
            except TypeError:  # the first event, or naive after aware
                same = False
            if not same:
                lo = at.replace(second=0, microsecond=0)
                hi = lo + _MINUTE
                m = int((at if at.tzinfo else at.replace(tzinfo=dt.UTC)).timestamp()) // 60
            key = (device_id, product_id, e.firmware_version, m)
            pending[key] = pending.get(key, 0) + 1
            if e.counted:
                ops[key] = ops.get(key, 0) + 1

    def _status(self, e: StoredEvent, device_id: str, product_id: int) -> None:
        """A connect or disconnect (``spark/status`` online/offline from the cloud)."""
        if e.data == "online":
            fw = e.firmware_version
            if fw is None:
                fw = self.firmware_of(device_id)
            if fw is not None:
                self.last_firmware[device_id] = fw
            self._add(device_id, product_id, e.published_at, fw, "connects")
        elif e.data == "offline":
            last = self.last_firmware.pop(device_id, None)
            fw = e.firmware_version if e.firmware_version is not None else last
            self._add(device_id, product_id, e.published_at, fw, "disconnects")
            self._device_day(device_id, product_id, e.published_at, 0)

    def _fold(self) -> None:
        """Add the events counted since the last fold to the rollup dictionaries (per
        device, product, minute and firmware version). An event whose session did not say
        its firmware version is counted under the device's version known now."""
        pending, self.pending = self.pending, {}
        ops, self.pending_ops = self.pending_ops, {}
        minutes: dict[int, dt.datetime] = {}
        width = len(COUNTERS)
        for key, n in pending.items():
            device_id, product_id, fw, m = key
            minute = minutes.get(m)
            if minute is None:
                minute = minutes[m] = dt.datetime.fromtimestamp(m * 60, dt.UTC)
            if fw is None:
                fw = self._firmware(device_id) or 0
            row = self.counts.get((product_id, minute, fw))
            if row is None:
                row = self.counts[(product_id, minute, fw)] = [0] * width
            drow = self.per_device.get((device_id, product_id, minute, fw))
            if drow is None:
                drow = self.per_device[(device_id, product_id, minute, fw)] = [0] * width
            k = ops.get(key, 0)
            row[_EVENTS] += n
            drow[_EVENTS] += n
            row[_DATA_OPS] += k
            drow[_DATA_OPS] += k

    def usage(self, items: Sequence[Usage]) -> None:
        """The event writer's after-usage hook: the data operations that come without an
        event row (deliveries to the device, function calls, variable reads)."""
        for u in items:
            if u.kind in DATA_OP_KINDS and u.product_id is not None:
                self._add(u.device_id, u.product_id, u.at, self._firmware(u.device_id),
                          "data_ops")

    def presence(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        """The event writer's after-presence hook: the reasons of committed disconnects."""
        for row, change in pairs:
            if isinstance(change, Offline) and row.product_id is not None:
                key = (row.product_id, hour_of(change.at), (change.reason or "unknown")[:64])
                self.reasons[key] = self.reasons.get(key, 0) + 1
                dkey = (change.device_id, *key)
                self.device_reasons[dkey] = self.device_reasons.get(dkey, 0) + 1

    def _firmware(self, device_id: str) -> int | None:
        fw = self.firmware_of(device_id)
        if fw is not None:
            self.last_firmware[device_id] = fw
            return fw
        return self.last_firmware.get(device_id)

    def call(self, device_id: str, product_id: int | None, kind: str,
             outcome: CallOutcome, *, at: dt.datetime | None = None) -> None:
        """A function call or variable read ended (``kind``: function | variable)."""
        if product_id is None or kind not in ("function", "variable"):
            return
        at = at or clock.now()
        prefix = "fn" if kind == "function" else "var"
        self._add(device_id, product_id, at, self._firmware(device_id), f"{prefix}_{outcome}")
        if outcome in ("failure", "timeout"):  # the device failed (offline is no error)
            self._device_day(device_id, product_id, at, 1)

    # -- flushing ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-tally")

    async def stop(self) -> None:
        """Stop the flush loop and flush what is left."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("fleet rollups not flushed (kept for the next flush)")

    async def flush(self) -> None:
        """Add the counts so far to the rollup tables (one transaction). On failure they
        are put back and tried again at the next flush."""
        async with self._lock:
            self._fold()
            counts, self.counts = self.counts, {}
            per_device, self.per_device = self.per_device, {}
            days, self.device_days = self.device_days, {}
            reasons, self.reasons = self.reasons, {}
            device_reasons, self.device_reasons = self.device_reasons, {}
            if not counts and not days and not reasons:
                return
            try:
                async with self.sessionmaker() as db:
                    segments = await self._by_segment(db, per_device)
                    await add_counts(db, counts, days, reasons, segments)
                    await self._reasons_by_segment(db, device_reasons)
                    await db.commit()
            except BaseException:
                for drkey, n in device_reasons.items():
                    self.device_reasons[drkey] = self.device_reasons.get(drkey, 0) + n
                for pkey, prow in per_device.items():
                    pmine = self.per_device.setdefault(pkey, [0] * len(COUNTERS))
                    for i, n in enumerate(prow):
                        pmine[i] += n
                for rkey, n in reasons.items():
                    self.reasons[rkey] = self.reasons.get(rkey, 0) + n
                for key, row in counts.items():
                    mine = self.counts.setdefault(key, [0] * len(COUNTERS))
                    for i, n in enumerate(row):
                        mine[i] += n
                for dkey, drow in days.items():
                    dmine = self.device_days.setdefault(dkey, [0, 0])
                    dmine[0] += drow[0]
                    dmine[1] += drow[1]
                raise
            self.flushes += 1

    async def _by_segment(self, db: AsyncSession, per_device: dict[DeviceKey, list[int]]
                          ) -> dict[SegmentKey, list[int]]:
        """The per-device counts summed per segment the devices are in now."""
        if not per_device:
            return {}
        found = await self.segments_of(db, {d for d, _p, _m, _f in per_device})
        out: dict[SegmentKey, list[int]] = {}
        for (device, product, minute, fw), row in per_device.items():
            for seg in found.get(device, ()):
                mine = out.setdefault((product, seg, minute, fw), [0] * len(COUNTERS))
                for i, n in enumerate(row):
                    mine[i] += n
        return out

    async def _reasons_by_segment(self, db: AsyncSession,
                                  device_reasons: dict[tuple[str, int, dt.datetime, str], int]
                                  ) -> None:
        """Add the disconnects by reason to each segment the devices are in now."""
        if not device_reasons:
            return
        found = await self.segments_of(db, {d for d, *_rest in device_reasons})
        rows: dict[tuple[int, str, dt.datetime, str], int] = {}
        for (device, product, hour, reason), n in device_reasons.items():
            for seg in found.get(device, ()):
                rows[(product, seg, hour, reason)] = rows.get((product, seg, hour, reason), 0) + n
        if not rows:
            return
        stmt = _insert((await db.connection()).dialect.name)(FleetSegmentDisconnect)
        stmt = stmt.on_conflict_do_update(
            index_elements=["product_id", "segment", "bucket", "reason"],
            set_={"count": FleetSegmentDisconnect.count + stmt.excluded.count})
        await db.execute(stmt, [{"product_id": p, "segment": sg, "bucket": b, "reason": r,
                                 "count": n} for (p, sg, b, r), n in sorted(rows.items())])

    async def segments_of(self, db: AsyncSession, devices: set[str]
                          ) -> dict[str, tuple[str, ...]]:
        """Each device's segments: its groups and its Device OS version (an indexed read
        pair per ``LOOKUP_CHUNK`` devices not looked up in the last ``SEGMENT_TTL_S``)."""
        now = time.monotonic()
        out: dict[str, tuple[str, ...]] = {}
        missing = []
        for d in devices:
            hit = self._segments.get(d)
            if hit is not None and hit[0] > now:
                out[d] = hit[1]
            else:
                missing.append(d)
        if len(self._segments) + len(missing) > SEGMENT_CACHE_MAX:
            self._segments.clear()
        found = await lookup_segments(db, missing)
        for device, segs in found.items():
            out[device] = segs
            self._segments[device] = (now + SEGMENT_TTL_S, segs)
        return out


async def lookup_segments(db: AsyncSession, devices: Iterable[str]
                          ) -> dict[str, tuple[str, ...]]:
    """Each device's segments now: its groups and its Device OS version (an indexed read
    pair per ``LOOKUP_CHUNK`` devices)."""
    ids = sorted(devices)
    out: dict[str, tuple[str, ...]] = {}
    for i in range(0, len(ids), LOOKUP_CHUNK):
        chunk = ids[i:i + LOOKUP_CHUNK]
        found: dict[str, list[str]] = {d: [] for d in chunk}
        for device, group in (await db.execute(
                select(DeviceGroupMember.device_id, DeviceGroupMember.group_id)
                .where(DeviceGroupMember.device_id.in_(chunk)))).all():
            found[device].append(group_segment(group))
        for device, version in (await db.execute(
                select(Device.id, Device.system_firmware_version)
                .where(Device.id.in_(chunk),
                       Device.system_firmware_version.is_not(None)))).all():
            found[device].append(os_segment(version))
        for device, segs in found.items():
            out[device] = tuple(segs)
    return out


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


async def add_counts(db: AsyncSession, counts: dict[Key, list[int]],
                     days: dict[tuple[str, dt.datetime, int], list[int]],
                     reasons: dict[tuple[int, dt.datetime, str], int] | None = None,
                     segments: dict[SegmentKey, list[int]] | None = None) -> None:
    """Add ``counts`` to the minute and hour rows, ``days`` to the per-device days,
    ``reasons`` to the disconnects per hour and reason and ``segments`` to the segments'
    minute and hour rows."""
    ins = _insert((await db.connection()).dialect.name)
    if segments:
        seg_hours: dict[SegmentKey, list[int]] = {}
        for (product, seg, minute, fw), row in segments.items():
            h = seg_hours.setdefault((product, seg, hour_of(minute), fw), [0] * len(COUNTERS))
            for i, n in enumerate(row):
                h[i] += n
        for stable, srows in ((FleetSegmentMinute, segments), (FleetSegmentHour, seg_hours)):
            svalues = [{"product_id": p, "segment": sg, "bucket": b, "firmware_version": fw,
                        "online": 0, **dict(zip(COUNTERS, row, strict=True))}
                       for (p, sg, b, fw), row in sorted(srows.items())]
            sstmt = ins(stable)
            sstmt = sstmt.on_conflict_do_update(
                index_elements=["product_id", "segment", "bucket", "firmware_version"],
                set_={c: getattr(stable, c) + getattr(sstmt.excluded, c) for c in COUNTERS})
            await db.execute(sstmt, svalues)
    if reasons:
        stmt = ins(FleetDisconnect)
        stmt = stmt.on_conflict_do_update(
            index_elements=["product_id", "bucket", "reason"],
            set_={"count": FleetDisconnect.count + stmt.excluded.count})
        await db.execute(stmt, [{"product_id": p, "bucket": b, "reason": r, "count": n}
                                for (p, b, r), n in sorted(reasons.items())])
    hours: dict[Key, list[int]] = {}
    for (product, minute, fw), row in counts.items():
        h = hours.setdefault((product, hour_of(minute), fw), [0] * len(COUNTERS))
        for i, n in enumerate(row):
            h[i] += n
    for table, rows in ((FleetMinute, counts), (FleetHour, hours)):
        if not rows:
            continue
        values = [{"product_id": p, "bucket": b, "firmware_version": fw, "online": 0,
                   **dict(zip(COUNTERS, row, strict=True))}
                  for (p, b, fw), row in sorted(rows.items())]
        stmt = ins(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["product_id", "bucket", "firmware_version"],
            set_={c: getattr(table, c) + getattr(stmt.excluded, c) for c in COUNTERS})
        await db.execute(stmt, values)
    if days:
        values = [{"device_id": d, "day": day, "product_id": p, "disconnects": row[0],
                   "errors": row[1]} for (d, day, p), row in sorted(days.items())]
        stmt = ins(FleetDeviceDay)
        stmt = stmt.on_conflict_do_update(
            index_elements=["device_id", "day"],
            set_={"disconnects": FleetDeviceDay.disconnects + stmt.excluded.disconnects,
                  "errors": FleetDeviceDay.errors + stmt.excluded.errors,
                  "product_id": stmt.excluded.product_id})
        await db.execute(stmt, values)
        # the days' "most troubled" lists are out of date until made again (fleet.tops)
        marked = ins(FleetTroubledDay)
        marked = marked.on_conflict_do_update(
            index_elements=["product_id", "day"],
            set_={"version": FleetTroubledDay.version + 1})
        await db.execute(marked, [
            {"product_id": p, "day": day, "version": 1, "computed_version": 0,
             "rest_disconnects": 0, "rest_errors": 0}
            for p, day in sorted({(p, day) for _d, day, p in days})])


async def sample_online(db: AsyncSession, *, at: dt.datetime | None = None) -> int:
    """Record how many devices of each product and firmware version are online now in
    this minute's and this hour's rollups (the most seen in the bucket wins), and how many
    devices each product has per firmware version and how many of them are online
    (:class:`FleetDeviceCount`, what fleet health reads for a large product), the same per
    static group and Device OS version (:class:`FleetSegmentDeviceCount`). Each is one
    grouped pass over the devices counting them and their online ones together. Returns the
    number of (product, firmware) pairs online. The caller commits."""
    at = at or clock.now()
    per_fw: dict[tuple[int, int], tuple[int, int]] = {}
    for product, fw, n, on in (await db.execute(
            select(Device.product_id, Device.firmware_version, func.count(), _ONLINE)
            .where(Device.product_id.is_not(None))
            .group_by(Device.product_id, Device.firmware_version))).all():
        _add(per_fw, (int(product), int(fw or 0)), int(n), int(on or 0))  # 0: never reported
    per_seg = await _per_segment(db)
    await _replace_counts(db, FleetDeviceCount, per_fw, ("product_id", "firmware_version"), at)
    await _replace_counts(db, FleetSegmentDeviceCount, per_seg,
                          ("product_id", "segment", "firmware_version"), at)
    online = {k: on for k, (_n, on) in per_fw.items() if on}
    seg_rows = {k: on for k, (_n, on) in per_seg.items() if on}
    dialect = (await db.connection()).dialect.name
    ins = _insert(dialect)
    if not online:
        return 0
    rows = [(p, fw, n) for (p, fw), n in sorted(online.items())]
    bigger = func.greatest if dialect == "postgresql" else func.max
    for table, bucket in ((FleetMinute, minute_of(at)), (FleetHour, hour_of(at))):
        values = [{"product_id": p, "bucket": bucket, "firmware_version": int(fw),
                   "online": int(n), **dict.fromkeys(COUNTERS, 0)} for p, fw, n in rows]
        stmt = ins(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["product_id", "bucket", "firmware_version"],
            set_={"online": bigger(table.online, stmt.excluded.online)})
        await db.execute(stmt, values)
    for stable, bucket in ((FleetSegmentMinute, minute_of(at)), (FleetSegmentHour, hour_of(at))):
        if not seg_rows:
            break
        svalues = [{"product_id": p, "segment": sg, "bucket": bucket, "firmware_version": fw,
                    "online": n, **dict.fromkeys(COUNTERS, 0)}
                   for (p, sg, fw), n in sorted(seg_rows.items())]
        sstmt = ins(stable)
        sstmt = sstmt.on_conflict_do_update(
            index_elements=["product_id", "segment", "bucket", "firmware_version"],
            set_={"online": bigger(stable.online, sstmt.excluded.online)})
        await db.execute(sstmt, svalues)
    return len(rows)


# the online devices among those a grouped count counts
_ONLINE = func.sum(case((Device.online, 1), else_=0))


def _add(out: dict[Any, tuple[int, int]], key: Any, n: int, on: int) -> None:
    had = out.get(key, (0, 0))
    out[key] = (had[0] + n, had[1] + on)


async def _replace_counts(db: AsyncSession, table: Any, counts: dict[Any, tuple[int, int]],
                          keys: tuple[str, ...], at: dt.datetime) -> None:
    """Replace every row of ``table`` (:class:`FleetDeviceCount`,
    :class:`FleetSegmentDeviceCount`) with ``counts``: key -> (devices, online)."""
    await db.execute(delete(table))
    if counts:
        await db.execute(table.__table__.insert(), [
            {**dict(zip(keys, k, strict=True)), "devices": n, "online": on, "sampled_at": at}
            for k, (n, on) in sorted(counts.items())])


async def _per_segment(db: AsyncSession) -> dict[tuple[int, str, int], tuple[int, int]]:
    """(devices, online) per product, segment and firmware version (0: not known): the
    static groups' memberships joined to their devices, and the devices per Device OS
    version (ix_devices_product_os)."""
    out: dict[tuple[int, str, int], tuple[int, int]] = {}
    by_group = (await db.execute(
        select(Device.product_id, DeviceGroupMember.group_id, Device.firmware_version,
               func.count(), _ONLINE)
        .join(DeviceGroupMember, DeviceGroupMember.device_id == Device.id)
        .where(Device.product_id.is_not(None))
        .group_by(Device.product_id, DeviceGroupMember.group_id,
                  Device.firmware_version))).all()
    by_os = (await db.execute(
        select(Device.product_id, Device.system_firmware_version, Device.firmware_version,
               func.count(), _ONLINE)
        .where(Device.product_id.is_not(None), Device.system_firmware_version.is_not(None))
        .group_by(Device.product_id, Device.system_firmware_version,
                  Device.firmware_version))).all()
    for rows, name in ((by_group, group_segment), (by_os, os_segment)):
        for product, seg, fw, n, on in rows:
            _add(out, (int(product), name(seg), int(fw or 0)), int(n), int(on or 0))
    return out
