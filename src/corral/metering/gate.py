"""The usage gate: the device-session core asks it before every counted operation.

:class:`UsageGate` implements :class:`corral.sessions.link.CommunicationGate` from state it
keeps in memory, so the hot path is a few dict lookups:

* ``paused``: organization id -> the reason its devices may not communicate (a pausing plan
  at 100 % of its data operations or cellular data, or an extra pause source such as a
  locked subscription);
* a **budget** of data operations left for organizations on pausing plans (Free). Each
  operation the gate lets through takes one from it, so the limit holds between refreshes
  on this node: when the budget is spent the organization is paused at once.

The :class:`~corral.metering.tasks.MeteringService` recomputes all of it from the database on
a timer, after a plan change and when a new month starts (:meth:`UsageGate.apply`). A
refresh never lets the estimate drift: operations the gate let through while the refresh was
reading are subtracted again. An operation that passed the gate and is still in flight
while the refresh reads (a function call waiting for the device) can make usage exceed the
allowance by that many operations; refused operations are never counted.

A user's own devices (in no product) use the allowance of the user's personal organization.

The device cap: :meth:`UsageGate.refuse_connect` is asked when a device that has never been
online connects; it is refused while the organization's billable devices have reached the
plan's maximum. Devices it admits count at once (before their first-online time is stored).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

PauseSource = Callable[[AsyncSession], Awaitable[dict[int, str]]]
FRESH_TTL_S = 300.0  # an admitted device not stored as online after this is forgotten


@dataclasses.dataclass(slots=True)
class Snapshot:
    """What a refresh computed (see :meth:`UsageGate.apply`)."""

    user_org: dict[int, int]  # user id -> personal organization id
    known: set[int]  # organizations the snapshot covers (others: Free, nothing used)
    paused: dict[int, str]
    remaining: dict[int, int]  # pausing organizations: data operations left
    limit_reason: dict[int, str]  # what to say when that budget runs out
    max_devices: dict[int, int]
    devices: dict[int, int]  # billable devices (stored) per organization
    free_budget: int | None  # a Free organization with no usage yet
    free_reason: str
    free_max_devices: int | None


class UsageGate:
    """See the module docstring. Implements ``CommunicationGate``."""

    def __init__(self) -> None:
        self._paused: dict[int, str] = {}
        self._user_org: dict[int, int] = {}
        self._known: set[int] = set()
        self._budget: dict[int, int] = {}
        self._limit_reason: dict[int, str] = {}
        self._spent: dict[int, int] = {}  # budgeted operations let through since begin()
        self._free_budget: int | None = None
        self._free_reason = ""
        self._max_devices: dict[int, int] = {}
        self._free_max_devices: int | None = None
        self._devices: dict[int, int] = {}
        self._fresh: dict[str, tuple[int, float]] = {}  # device -> (org, admitted at)
        self.sources: list[PauseSource] = []
        self.refused = 0
        self.refused_connects = 0
        self.refreshed = 0

    # -- configuration ---------------------------------------------------------------------

    def add_pause_source(self, fn: PauseSource) -> None:
        """``fn(db)`` returns extra paused organizations (id -> reason) at every refresh."""
        self.sources.append(fn)

    # -- the hot path ----------------------------------------------------------------------

    def org_of(self, facts: Any) -> int | None:
        """The organization whose allowance a device uses."""
        org: int | None = facts.org_id
        if org is None and facts.owner_user_id is not None:
            org = self._user_org.get(facts.owner_user_id)
        return org

    def refuse(self, facts: Any, kind: str) -> str | None:
        """``None`` to allow a counted operation, else why not (CommunicationGate)."""
        org = facts.org_id
        if org is None:
            user = facts.owner_user_id
            if user is None:
                return None
            org = self._user_org.get(user)
            if org is None:
                return None
        reason = self._paused.get(org)
        if reason is not None:
            self.refused += 1
            return reason
        left = self._budget.get(org)
        if left is None:
            if org in self._known or self._free_budget is None:
                return None
            left = self._free_budget
            self._limit_reason.setdefault(org, self._free_reason)
        if left <= 0:
            reason = self._limit_reason.get(org) or self._free_reason
            self._paused[org] = reason
            self.refused += 1
            return reason
        self._budget[org] = left - 1
        self._spent[org] = self._spent.get(org, 0) + 1
        return None

    def refuse_connect(self, facts: Any) -> str | None:
        """A device that has never been online connects: ``None`` admits it (it counts as
        billable from now on), else why not."""
        org = self.org_of(facts)
        if org is None:
            return None
        if facts.device_id in self._fresh:
            return None  # admitted already, its first-online time not stored yet
        cap = self._max_devices.get(org)
        if cap is None:
            cap = None if org in self._known else self._free_max_devices
        if cap is None:
            return None
        n = self._devices.get(org, 0)
        if n >= cap:
            self.refused_connects += 1
            return (f"The organization's plan allows {cap} devices and all are in use; "
                    "add blocks or upgrade the plan to bring more devices online")
        self._devices[org] = n + 1
        self._fresh[facts.device_id] = (org, time.monotonic())
        return None

    def paused(self, org_id: int) -> str | None:
        return self._paused.get(org_id)

    @property
    def paused_orgs(self) -> dict[int, str]:
        return dict(self._paused)

    # -- refresh ---------------------------------------------------------------------------

    def begin(self) -> None:
        """A refresh starts reading: count budgeted operations from here on separately."""
        self._spent = {}

    def fresh(self) -> dict[str, int]:
        """Devices admitted as new and not yet seen stored (device -> organization); ones
        older than :data:`FRESH_TTL_S` are dropped."""
        cutoff = time.monotonic() - FRESH_TTL_S
        self._fresh = {d: v for d, v in self._fresh.items() if v[1] >= cutoff}
        return {d: v[0] for d, v in self._fresh.items()}

    def stored(self, device_ids: set[str]) -> None:
        """These admitted devices now have their first-online time stored."""
        for d in device_ids:
            self._fresh.pop(d, None)

    def apply(self, snap: Snapshot) -> None:
        """Take a refresh's results; operations let through since :meth:`begin` stay spent."""
        spent = self._spent
        self._user_org = snap.user_org
        self._known = snap.known
        self._limit_reason = snap.limit_reason
        budget = {org: left - spent.get(org, 0) for org, left in snap.remaining.items()}
        paused = dict(snap.paused)
        for org, left in budget.items():
            if left <= 0 and org not in paused:
                paused[org] = snap.limit_reason.get(org) or snap.free_reason
        self._budget = budget
        self._paused = paused
        self._free_budget = snap.free_budget
        self._free_reason = snap.free_reason
        self._max_devices = snap.max_devices
        self._free_max_devices = snap.free_max_devices
        devices = dict(snap.devices)
        for org, _at in self._fresh.values():
            devices[org] = devices.get(org, 0) + 1
        self._devices = devices
        self.refreshed += 1


__all__ = ["PauseSource", "Snapshot", "UsageGate"]
