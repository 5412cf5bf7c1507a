"""Route guards: a route declares the permission it needs by depending on a Guard.

``tests/test_permissions_matrix.py`` walks the app's routes, finds every Guard, and checks it
against every role and another tenant, so a new route joins the matrix by declaring one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar

from sqlalchemy.ext.asyncio import AsyncSession


class Guard:
    """Base for tenant guards. ``scope`` is "product" or "org"; ``permission`` a scope name."""

    scope: ClassVar[str] = ""
    path_param: ClassVar[str] = ""

    def __init__(self, permission: str) -> None:
        self.permission = permission

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.permission!r})"


# --- tenant checks after the guard has resolved the tenant and allowed the caller ---------
# A domain above ``auth`` (billing: a locked or inactive subscription) registers a check
# here instead of being imported by the guards. Each check gets the transaction, the
# organization that owns the resolved tenant and the permission the route needs, and
# raises a CorralError to refuse.

TenantCheck = Callable[[AsyncSession, int, str], Awaitable[None]]
_tenant_checks: list[TenantCheck] = []


def add_tenant_check(check: TenantCheck) -> None:
    """Register ``check`` (once; registering it again changes nothing)."""
    if check not in _tenant_checks:
        _tenant_checks.append(check)


async def check_tenant(db: AsyncSession, org_id: int, permission: str) -> None:
    """Run the registered checks; called by the org and product authorizers."""
    for check in _tenant_checks:
        await check(db, org_id, permission)
