"""Generate ``docs/permissions.md`` from the policy and the route table.

``python -m corral.web.permissions_doc > docs/permissions.md``; a test fails when the file and
the code disagree, so the document is always the enforced matrix.
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute

from corral.auth.guards import Guard
from corral.auth.policy import API_USER_SCOPES, ORG_SCOPES, PRODUCT_SCOPES, ROLE_PERMISSIONS, Role

INTRO = """# Permissions

corral enforces tenancy and roles in one place: `src/corral/auth/policy.py`. Every route that
touches an organization's or a product's data declares the permission it needs with a guard
(`ProductGuard("devices:list")`, `OrgGuard("orgs.team:invite")`); the guard resolves the
organization or product from the path (id or slug) and asks the policy. This file is generated
from that code (`python -m corral.web.permissions_doc > docs/permissions.md`) and a test fails
when they disagree. `tests/test_permissions_matrix.py` checks every guarded route against every
role, a product-scope member, API users and another tenant.

## Rules

- **Roles**: Owner, Administrator, Developer, Support, View-only (Particle's team roles).
  A role is held at **organization scope** (it applies to the organization and every product in
  it) or at **product scope** (that product only). The effective role on a product is the
  stronger of the two.
- **Another tenant's object is invisible**: a caller with no role there gets
  `404 {"ok":false,"error":"not_found","error_description":"Product not found"}` (or
  "Organization not found"), exactly as for an id that does not exist.
- **A role that may not act** gets `403 {"ok":false,"error":"forbidden","required":"<permission>"}`.
- **401** is only for a missing, invalid or expired token.
- **API users** are programmatic members of one product with explicit scopes (below). They never
  act at organization scope (`403 {"error":"unauthorized","error_description":"API users are not
  allowed to call this endpoint"}`) and see other products as missing (404). Tokens issued to a
  product's **OAuth client** (`client_credentials` grant) behave the same way, with the client's
  scopes (`*:*` = every API-user scope).
- Only an **Owner** can grant or revoke the Owner role; Administrators grant up to
  Administrator. An organization always keeps at least one Owner.
- **A change applies to the next request**, on every node: granting, changing or removing a
  role, deleting a product, a subscription locking. A node keeps a product and the caller's
  role on it for reads (GET, for `CORRAL_TENANT_CACHE_S` seconds) and drops them the moment
  such a change commits anywhere (`src/corral/auth/cache.py`); a write is always judged on
  the role the database holds. A change made behind corral's back (SQL by hand) reaches
  reads when the entry expires.
"""


def _mark(ok: bool) -> str:
    return "yes" if ok else "-"


def role_table(scopes: frozenset[str], title: str) -> list[str]:
    roles = sorted(Role, reverse=True)
    lines = [f"## {title}", "",
             "| permission | " + " | ".join(r.label for r in roles) + " | API user may hold |",
             "|---|" + "---|" * len(roles) + "---|"]
    for perm in sorted(scopes):
        cells = [_mark(perm in ROLE_PERMISSIONS[r]) for r in roles]
        api = _mark(perm in API_USER_SCOPES)
        lines.append(f"| `{perm}` | " + " | ".join(cells) + f" | {api} |")
    return [*lines, ""]


def _guards(dependant: Any) -> list[Guard]:
    found: list[Guard] = []
    for dep in dependant.dependencies:
        if isinstance(dep.call, Guard):
            found.append(dep.call)
        found.extend(_guards(dep))
    return found


def route_table() -> list[str]:
    from corral.web.app import routers

    rows = []
    for router in routers():
        for route in router.routes:
            if isinstance(route, APIRoute):
                guards = _guards(route.dependant)
                if guards:
                    for m in sorted(route.methods - {"HEAD"}):
                        rows.append((route.path, m, guards[0].scope, guards[0].permission))
    lines = ["## Routes and the permission each requires", "",
             "| route | method | scope | permission |", "|---|---|---|---|"]
    lines += [f"| `{p}` | {m} | {s} | `{perm}` |" for p, m, s, perm in sorted(rows)]
    lines += ["", "Routes not listed act on the caller's own account (`/v1/user`, "
              "`/v1/access_tokens`, `/v1/user/invitations`, sign-up and `/oauth/token`) or list "
              "only what the caller may see (`/v1/orgs`, `/v1/products`, `/v1/user/products`).", ""]
    return lines


def render() -> str:
    parts = [INTRO]
    parts += role_table(PRODUCT_SCOPES, "Product permissions")
    parts += role_table(ORG_SCOPES, "Organization permissions")
    parts += route_table()
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
