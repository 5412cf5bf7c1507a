"""Which firmware each device should run: Particle's precedence rules, plus phased rollouts.

The rules (Particle's "firmware precedence"), first match wins:

1. a **development** device gets nothing automatically;
2. a **locked** device (``desired_firmware_version``) gets that version;
3. a device in a **cohort with a release** gets the cohort's release, even when one of its
   groups has a higher one (corral's addition: a cohort is the device's one exclusive release
   track, chosen on purpose; groups overlap and are only labels for releases);
4. a device in **groups with releases** gets the highest version released to any of them
   (static groups by membership, dynamic groups by matching their query when resolved: the
   resolver sees only group ids, so both kinds rank the same way, below a cohort);
5. otherwise the **product default** release;
6. otherwise nothing.

A release under a phased rollout (:mod:`corral.rollouts`) admits only part of the devices it
would target; a device it does not admit keeps what that release replaced (the previous
product default, or its group's previous release, when the rollout started with the
release), and otherwise falls through to the next rule (another group's release, then the
product default; a cohort's release not admitting it falls through to its groups). A device already
running a rolled-out version stays admitted (so a rollout never turns into a downgrade), and
an aborted rollout admits no one else.

:func:`resolve` is pure (plain data in, a :class:`Target` out); :func:`targets_for` loads a
product's releases and devices and resolves them in bulk.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.cohort_models import Cohort, CohortMember
from corral.devices.groups import dynamic_matches
from corral.devices.models import Device, DeviceGroupMember
from corral.firmware.models import FirmwareGroupRelease, ProductFirmware
from corral.rollouts.models import Rollout

Source = Literal["development", "locked", "cohort", "group", "default", "none"]
BUCKETS = 10_000  # rollout shares are in basis points
CHUNK = 5_000


@dataclass(frozen=True)
class DeviceFacts:
    id: str
    development: bool = False
    desired_version: int | None = None
    group_ids: frozenset[int] = frozenset()
    firmware_version: int | None = None  # what it runs now
    cohort_id: int | None = None


def sticky_value(firmware_id: int, device_id: str) -> int:
    """A device's fixed place in a release's rollout order (64 bits of SHA-256)."""
    digest = hashlib.sha256(f"{firmware_id}:{device_id.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def bucket(firmware_id: int, device_id: str) -> int:
    """0..9,999: a device is in a rollout of ``percent_bp`` basis points when below it."""
    return sticky_value(firmware_id, device_id) % BUCKETS


@dataclass(frozen=True)
class Gate:
    """A live or aborted rollout of one released version."""

    rollout_id: int
    firmware_id: int
    version: int
    state: str  # active | paused | aborted
    percent_bp: int | None = None
    admitted_ids: frozenset[str] | None = None  # count mode, computed by :func:`count_admitted`
    # what the release replaced, for the devices it does not admit: the previous product
    # default, and each group's previous release (group id -> version)
    fallback_default: int | None = None
    fallback_groups: Mapping[int, int] = field(default_factory=dict)

    def admits(self, device: DeviceFacts) -> bool:
        if device.firmware_version == self.version:
            return True
        if self.state == "aborted":
            return False
        if self.admitted_ids is not None:
            return device.id in self.admitted_ids
        return bucket(self.firmware_id, device.id) < (self.percent_bp or 0)


@dataclass(frozen=True)
class ReleaseSet:
    """A product's releases: the default version and each group's released version."""

    default_version: int | None = None
    group_versions: Mapping[int, int] = field(default_factory=dict)  # group id -> version
    gates: Mapping[int, Gate] = field(default_factory=dict)  # version -> its rollout
    cohort_versions: Mapping[int, int] = field(default_factory=dict)  # cohort id -> version


@dataclass(frozen=True)
class Target:
    version: int | None
    source: Source
    rollout_id: int | None = None
    held: bool = False  # its rollout is paused: targeted, but no update may start now


MAX_FALLBACKS = 8  # a chain of rollouts, each over the previous release


def _admitted(version: int | None, source: Source, device: DeviceFacts, releases: ReleaseSet,
              group_id: int | None = None) -> Target | None:
    """The first release along ``version`` and what each gated release replaced (for this
    group, or the default) that admits ``device``. A cohort's release replaced nothing the
    gate remembers: not admitted, the device falls through to the next rule."""
    for _ in range(MAX_FALLBACKS):
        if version is None:
            return None
        gate = releases.gates.get(version)
        if gate is None:
            return Target(version, source)
        if gate.admits(device):
            return Target(version, source, rollout_id=gate.rollout_id,
                          held=gate.state == "paused" and device.firmware_version != version)
        if source == "cohort":
            return None
        version = (gate.fallback_default if group_id is None
                   else gate.fallback_groups.get(group_id))
    return None


def resolve(device: DeviceFacts, releases: ReleaseSet) -> Target:
    """The firmware ``device`` should run under ``releases`` (see the module docstring)."""
    if device.development:
        return Target(None, "development")
    if device.desired_version is not None:
        return Target(device.desired_version, "locked")
    if device.cohort_id is not None and device.cohort_id in releases.cohort_versions:
        target = _admitted(releases.cohort_versions[device.cohort_id], "cohort", device,
                           releases)
        if target is not None:
            return target
    found = [t for g in sorted(device.group_ids) if g in releases.group_versions
             if (t := _admitted(releases.group_versions[g], "group", device, releases, g))]
    if found:
        assert all(t.version is not None for t in found)
        return max(found, key=lambda t: (t.version or 0, t.rollout_id is None))
    target = _admitted(releases.default_version, "default", device, releases)
    return target if target is not None else Target(None, "none")


def count_admitted(gate: Gate, count: int, devices: Iterable[DeviceFacts],
                   releases: ReleaseSet) -> frozenset[str]:
    """The devices a count-mode rollout admits: of those this release would target (with
    every other gate as it is), the ones already running it, then the smallest sticky
    values, ``count`` in all. With the same devices, a larger count only adds devices."""
    open_gate = replace(gate, admitted_ids=None, percent_bp=BUCKETS, state="active")
    trial = replace(releases, gates={**releases.gates, gate.version: open_gate})
    eligible = [d for d in devices if _targets(resolve(d, trial), gate.version)]
    if gate.state == "aborted":
        return frozenset(d.id for d in eligible if d.firmware_version == gate.version)
    eligible.sort(key=lambda d: (d.firmware_version != gate.version,
                                 sticky_value(gate.firmware_id, d.id), d.id))
    return frozenset(d.id for d in eligible[:max(0, count)])


def _targets(target: Target, version: int) -> bool:
    return target.version == version and target.source in ("cohort", "group", "default")


# --- the database side -------------------------------------------------------------------------

@dataclass
class ProductTargets:
    """Everything needed to resolve a product's devices."""

    releases: ReleaseSet
    firmware_ids: dict[int, int]  # version -> firmware id (uploaded ones)
    counts: dict[int, int]  # version -> count, for count-mode rollouts
    # the groups with a release (whatever its firmware), None when not read
    released_groups: frozenset[int] | None = None


async def load_releases(db: AsyncSession, product_id: int,
                        include_aborted: bool = True) -> ProductTargets:
    """The product's default and group releases and their rollouts (count gates are
    completed by :func:`finish_count_gates`, which needs the devices). A product without
    firmware has none of them (each references one of its firmware: group releases and
    rollouts go with it, a cohort's release is cleared): one statement, not four."""
    rows = (await db.execute(select(ProductFirmware.id, ProductFirmware.version,
                                    ProductFirmware.product_default)
                             .where(ProductFirmware.product_id == product_id))).all()
    if not rows:  # no firmware: no group release, rollout or cohort release can name one
        return ProductTargets(releases=ReleaseSet(default_version=None, group_versions={},
                                                  gates={}, cohort_versions={}),
                              firmware_ids={}, counts={}, released_groups=frozenset())
    firmware_ids = {int(v): int(i) for i, v, _d in rows}
    defaults = [int(v) for _i, v, d in rows if d]
    by_id = {int(i): int(v) for i, v, _d in rows}
    group_rows = (await db.execute(
        select(FirmwareGroupRelease.group_id, FirmwareGroupRelease.firmware_id)
        .where(FirmwareGroupRelease.product_id == product_id))).all()
    group_versions = {int(g): by_id[int(f)] for g, f in group_rows if int(f) in by_id}
    states = ("active", "paused", "aborted") if include_aborted else ("active", "paused")
    gates: dict[int, Gate] = {}
    counts: dict[int, int] = {}
    for r in (await db.execute(select(Rollout).where(
            Rollout.product_id == product_id, Rollout.state.in_(states))
            .order_by(Rollout.id))).scalars():
        gates[r.version] = Gate(
            rollout_id=r.id, firmware_id=r.firmware_id, version=r.version, state=r.state,
            percent_bp=r.percent_bp, fallback_default=r.fallback_default,
            fallback_groups={int(g): int(v) for g, v in (r.fallback_groups or {}).items()})
        if r.count is not None:
            counts[r.version] = r.count
        else:
            counts.pop(r.version, None)
    cohort_versions = {int(c): by_id[f] for c, f in (await db.execute(
        select(Cohort.id, Cohort.firmware_id).where(Cohort.product_id == product_id,
                                                    Cohort.firmware_id.is_not(None)))).all()
        if f is not None and f in by_id}
    releases = ReleaseSet(default_version=max(defaults) if defaults else None,
                          group_versions=group_versions, gates=gates,
                          cohort_versions=cohort_versions)
    return ProductTargets(releases=releases, firmware_ids=firmware_ids, counts=counts,
                          released_groups=frozenset(int(g) for g, _f in group_rows))


def finish_count_gates(pt: ProductTargets, devices: Sequence[DeviceFacts]) -> ReleaseSet:
    """Fix each count-mode gate's admitted devices, highest version first (a higher
    release decides before a lower one which devices fall through to it)."""
    releases = pt.releases
    for version in sorted(pt.counts, reverse=True):
        gate = releases.gates[version]
        admitted = count_admitted(gate, pt.counts[version], devices, releases)
        releases = replace(releases, gates={**releases.gates,
                                            version: replace(gate, admitted_ids=admitted)})
    return releases


async def _dynamic_members(db: AsyncSession, product_id: int, device_ids: list[str] | None,
                           also: Collection[int], released: Collection[int] | None
                           ) -> list[tuple[str, int]]:
    """(device id, group id) of the devices (all the product's, or ``device_ids``) matching
    the product's dynamic groups that have a release (``released``: their ids, when the
    caller has read them already) or are in ``also`` (a release being simulated): a
    statement per 50 such groups (and chunk of ids), never one per device."""
    if released is None:
        released = set((await db.execute(select(FirmwareGroupRelease.group_id).where(
            FirmwareGroupRelease.product_id == product_id))).scalars())
    wanted = set(also) | set(released)
    if not wanted:
        return []
    return [(did, g.id) for did, g in await dynamic_matches(
        db, product_id, device_ids, only=lambda g: g.id in wanted)]


async def device_facts(db: AsyncSession, product_id: int,
                       device_ids: Sequence[str] | None = None,
                       also_groups: Collection[int] = (),
                       released_groups: Collection[int] | None = None,
                       matched: Sequence[tuple[str, int]] | None = None) -> list[DeviceFacts]:
    """The product's devices (or those of ``device_ids`` in it) as resolver input. Their
    ``group_ids`` hold their static groups and the dynamic groups with a release (and
    those of ``also_groups``) whose query they match now; ``released_groups``: the ids of
    the groups with a release, when the caller has them (:func:`load_releases`);
    ``matched``: (device id, group id) of every dynamic group each of ``device_ids``
    matches now, when the caller has tested them already (a device page shows them)."""
    groups: dict[str, set[int]] = defaultdict(set)
    cohorts: dict[str, int] = {}
    rows: list[tuple[str, bool, int | None, int | None]] = []
    cols = (Device.id, Device.development, Device.desired_firmware_version,
            Device.firmware_version)
    if device_ids is None:
        rows = [tuple(r) for r in (await db.execute(  # type: ignore[misc]
            select(*cols).where(Device.product_id == product_id).order_by(Device.id))).all()]
        member_rows = (await db.execute(
            select(DeviceGroupMember.device_id, DeviceGroupMember.group_id)
            .join(Device, Device.id == DeviceGroupMember.device_id)
            .where(Device.product_id == product_id))).all()
        for did, gid in member_rows:
            groups[did].add(int(gid))
        cohorts.update({did: int(cid) for did, cid in (await db.execute(
            select(CohortMember.device_id, CohortMember.cohort_id)
            .join(Cohort, Cohort.id == CohortMember.cohort_id)
            .where(Cohort.product_id == product_id))).all()})
    else:
        ids = sorted(set(device_ids))
        for i in range(0, len(ids), CHUNK):
            chunk = ids[i:i + CHUNK]
            rows += [tuple(r) for r in (await db.execute(  # type: ignore[misc]
                select(*cols).where(Device.product_id == product_id,
                                    Device.id.in_(chunk)))).all()]
            for did, gid in (await db.execute(
                    select(DeviceGroupMember.device_id, DeviceGroupMember.group_id)
                    .where(DeviceGroupMember.device_id.in_(chunk)))).all():
                groups[did].add(int(gid))
            cohorts.update({did: int(cid) for did, cid in (await db.execute(
                select(CohortMember.device_id, CohortMember.cohort_id)
                .where(CohortMember.device_id.in_(chunk)))).all()})
    if matched is not None and device_ids is not None and released_groups is not None:
        wanted = set(also_groups) | set(released_groups)
        dynamic = [(did, gid) for did, gid in matched if gid in wanted]
    else:
        dynamic = await _dynamic_members(
            db, product_id, None if device_ids is None else sorted(set(device_ids)),
            also_groups, released_groups)
    for did, gid in dynamic:
        groups[did].add(gid)
    return [DeviceFacts(id=did, development=bool(dev), desired_version=desired,
                        group_ids=frozenset(groups.get(did, ())), firmware_version=fw,
                        cohort_id=cohorts.get(did))
            for did, dev, desired, fw in rows]


async def targets_for(db: AsyncSession, product_id: int,
                      device_ids: Sequence[str] | None = None,
                      releases: ProductTargets | None = None,
                      matched: Sequence[tuple[str, int]] | None = None,
                      known: Sequence[DeviceFacts] | None = None) -> dict[str, Target]:
    """Device id -> its target, for the product's devices (or just ``device_ids``;
    ``matched``: the dynamic groups they match, if known: see :func:`device_facts`;
    ``known``: with ``matched``, the facts of ``device_ids`` as the caller read them, their
    static groups only: a listing has read each device's row, groups and cohort already)."""
    pt = releases or await load_releases(db, product_id)
    if known is not None and matched is not None and not pt.counts \
            and pt.released_groups is not None:
        extra: dict[str, set[int]] = defaultdict(set)
        for did, gid in matched:
            if gid in pt.released_groups:
                extra[did].add(gid)
        return {d.id: resolve(replace(d, group_ids=d.group_ids | extra[d.id])
                              if d.id in extra else d, pt.releases) for d in known}
    if pt.counts:  # count gates rank every device the release could target
        everyone = await device_facts(db, product_id, released_groups=pt.released_groups)
        rs = finish_count_gates(pt, everyone)
        wanted = set(device_ids) if device_ids is not None else None
        return {d.id: resolve(d, rs) for d in everyone if wanted is None or d.id in wanted}
    facts = await device_facts(db, product_id, device_ids, released_groups=pt.released_groups,
                               matched=matched)
    return {d.id: resolve(d, pt.releases) for d in facts}
