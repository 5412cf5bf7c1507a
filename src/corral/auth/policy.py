"""The one policy module: roles, scopes, and "may this subject do this to that".

Every /v1 route that touches organization or product data declares a permission through
:class:`corral.auth.guards.Guard`; the guard calls :func:`check_product` or :func:`check_org`.
Rules:

* a subject with no role in the tenant gets 404 (the object "does not exist" for them);
* a subject with a role that lacks the permission gets 403;
* API users and OAuth-client tokens hold explicit scopes for exactly one product.

``docs/permissions.md`` is this table in prose; ``tests/test_permissions_matrix.py`` checks
every guarded route against every role and another tenant.
"""

from __future__ import annotations

from enum import IntEnum

from corral.kit.errors import Forbidden, NotFound


class Role(IntEnum):
    VIEW_ONLY = 1
    SUPPORT = 2
    DEVELOPER = 3
    ADMINISTRATOR = 4
    OWNER = 5

    @property
    def label(self) -> str:
        return ROLE_LABELS[self]

    @classmethod
    def parse(cls, value: str | None) -> Role:
        if value is None:
            raise ValueError("role is required")
        key = value.strip().lower().replace("_", "-").replace(" ", "-")
        for role, label in ROLE_LABELS.items():
            if label.lower() == key or role.name.lower().replace("_", "-") == key:
                return role
        raise ValueError(f"unknown role {value!r}; one of {', '.join(ROLE_LABELS.values())}")


ROLE_LABELS = {
    Role.VIEW_ONLY: "View-only",
    Role.SUPPORT: "Support",
    Role.DEVELOPER: "Developer",
    Role.ADMINISTRATOR: "Administrator",
    Role.OWNER: "Owner",
}

# --- the scope catalogue (Particle's API-user scope names, plus corral's own) -------------

PRODUCT_READ = frozenset({
    "products:get", "teams.users:list", "clients:list", "customers:list", "devices:list",
    "devices:get", "events:get", "firmware:list", "firmware:get", "groups:list", "groups:get",
    "cohorts:list", "cohorts:get", "rollouts:list", "fleet:get", "usage:get", "locations:get", "devices.diagnostics:get",
    "integrations:list", "integrations:get", "metrics.integrations:get",
    "ledgers:list", "ledgers:get", "ledgers.instances:get",
})
SUPPORT_EXTRA = frozenset({
    "devices:update", "devices.function:call", "devices.variable:get", "customers:update",
    "devices.diagnostics:update",
})
DEVELOPER_EXTRA = frozenset({
    "devices:import", "devices:remove", "devices.keys:update", "events:send",
    "firmware:create", "firmware:update", "firmware:release", "firmware:remove",
    "groups:create", "groups:update", "groups:remove", "cohorts:create", "cohorts:update",
    "cohorts:remove", "customers:create", "customers:remove",
    "clients:create", "clients:update", "clients:remove", "rollouts:manage",
    "sims:update", "fleet:manage",
    "integrations:create", "integrations:update", "integrations:remove", "integrations:test",
    "ledgers:create", "ledgers:update", "ledgers:remove", "ledgers.instances:set",
})
ADMIN_EXTRA = frozenset({
    "products:update", "products:remove", "teams.users:invite", "teams.users:update",
    "teams.users:remove", "audit:list", "products.settings:update",
})
ORG_READ = frozenset({"orgs:get", "orgs.team:list", "orgs.products:list"})
ORG_ADMIN = frozenset({
    "orgs:update", "orgs.team:invite", "orgs.team:update", "orgs.team:remove",
    "orgs.products:create", "orgs.audit:list", "orgs.billing:get", "orgs.billing:update",
})
ORG_OWNER = frozenset({"orgs:remove"})

PRODUCT_SCOPES = PRODUCT_READ | SUPPORT_EXTRA | DEVELOPER_EXTRA | ADMIN_EXTRA
ORG_SCOPES = ORG_READ | ORG_ADMIN | ORG_OWNER
# scopes an API user may be given (product-scoped; team and audit management stay with people)
API_USER_SCOPES = PRODUCT_SCOPES - {
    "teams.users:invite", "teams.users:update", "teams.users:remove", "audit:list",
    "products:remove",
}

_P_VIEW = PRODUCT_READ | ORG_READ
_P_SUPPORT = _P_VIEW | SUPPORT_EXTRA
_P_DEV = _P_SUPPORT | DEVELOPER_EXTRA
_P_ADMIN = _P_DEV | ADMIN_EXTRA | ORG_ADMIN
ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.VIEW_ONLY: _P_VIEW,
    Role.SUPPORT: _P_SUPPORT,
    Role.DEVELOPER: _P_DEV,
    Role.ADMINISTRATOR: _P_ADMIN,
    Role.OWNER: _P_ADMIN | ORG_OWNER,
}


def role_allows(role: Role, permission: str) -> bool:
    return permission in ROLE_PERMISSIONS[role]


def assignable_roles(granter: Role) -> list[Role]:
    """Only an Owner can make another Owner; Administrators grant up to Administrator."""
    return [r for r in Role if r <= granter] if granter >= Role.ADMINISTRATOR else []


def check_role(role: Role | None, permission: str, *, what: str) -> Role:
    if role is None:
        raise NotFound(f"{what} not found")
    if not role_allows(role, permission):
        raise Forbidden(
            f"The {role.label} role may not do this ({permission})",
            code="forbidden", required=permission,
        )
    return role


def check_scopes(scopes: frozenset[str], permission: str) -> None:
    if permission not in scopes:
        raise Forbidden(
            f"This API user or client lacks the {permission} scope",
            code="forbidden", required=permission,
        )


def api_users_not_allowed() -> Forbidden:
    return Forbidden("API users are not allowed to call this endpoint", code="unauthorized")
