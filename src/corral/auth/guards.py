"""Route guards: a route declares the permission it needs by depending on a Guard.

``tests/test_permissions_matrix.py`` walks the app's routes, finds every Guard, and checks it
against every role and another tenant, so a new route joins the matrix by declaring one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.cache import watch_tenant_tables
from corral.auth.deps import Ctx, auth_ctx


class Guard:
    """Base for tenant guards. ``scope`` is "product" or "org"; ``permission`` a scope name."""

    scope: ClassVar[str] = ""
    path_param: ClassVar[str] = ""

    def __init__(self, permission: str) -> None:
        self.permission = permission

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.permission!r})"

    async def context(self, request: Request) -> Ctx:
        """The caller's context, which the guard judges: an API caller's (401 without a
        token); the console's guards give the signed-in user's. A guard's ``__call__`` calls
        this rather than depending on it: one node less of FastAPI's dependency solving on
        every guarded route (corral.auth.deps.optional_ctx)."""
        return await auth_ctx(request)


# --- tenant checks after the guard has resolved the tenant and allowed the caller ---------
# A domain above ``auth`` (billing: a locked or inactive subscription) registers a check
# here instead of being imported by the guards. Each check gets the transaction, the
# organization that owns the resolved tenant and the permission the route needs, and
# raises a CorralError to refuse.

TenantCheck = Callable[[AsyncSession, int, str], Awaitable[None]]
TenantFact = Callable[[Any], Any]  # the organization id column -> a scalar subquery
TenantJudge = Callable[[Any, int, str], None]  # (the fact's value, org id, permission)


@dataclass(frozen=True)
class _Check:
    check: TenantCheck
    fact: TenantFact | None
    judge: TenantJudge | None


_tenant_checks: list[_Check] = []


def add_tenant_check(check: TenantCheck, *, fact: TenantFact | None = None,
                     judge: TenantJudge | None = None, tables: Sequence[str] = ()) -> None:
    """Register ``check`` (once; registering it again changes nothing). A check that can
    also be answered from one value read with the tenant gives ``fact`` (the SQL of that
    value, given the organization id column) and ``judge`` (raises on the value): a guard
    that loads its tenant in one query (:func:`tenant_facts`) then needs no extra one.
    ``tables``: those the check reads; a committed write to one clears the tenant cache,
    which keeps the facts (:mod:`corral.auth.cache`)."""
    watch_tenant_tables(*tables)
    if all(c.check is not check for c in _tenant_checks):
        _tenant_checks.append(_Check(check, fact, judge))


def tenant_facts(org_id: Any) -> list[Any]:
    """The registered facts as labelled columns, to add to the query that loads a tenant."""
    return [c.fact(org_id).label(f"tenant_fact_{i}")
            for i, c in enumerate(_tenant_checks) if c.fact is not None]


def tenant_checks_version() -> int:
    """Changes whenever a check is registered (checks are only ever added): a statement
    built once with :func:`tenant_facts` is rebuilt when this differs from its build's."""
    return len(_tenant_checks)


async def check_tenant(db: AsyncSession, org_id: int, permission: str,
                       facts: Sequence[Any] | None = None) -> None:
    """Run the registered checks; called by the org and product authorizers. ``facts``:
    the values of :func:`tenant_facts` read with the tenant (judged without a query)."""
    values = iter(facts) if facts is not None else None
    for c in _tenant_checks:
        if values is not None and c.fact is not None and c.judge is not None:
            c.judge(next(values), org_id, permission)
        else:
            await c.check(db, org_id, permission)
