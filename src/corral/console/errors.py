"""Error pages of the console: a refusal from a guard or a service becomes a page in the
layout (404 for another tenant's object, 403 for a role that may not, the "Inactive
subscription" page for a shut organization, the sign-in page when signed out)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response

from corral.auth.policy import Role
from corral.console.forms import FormErrors
from corral.console.render import page, redirect
from corral.kit.errors import CorralError
from corral.orgs.access import OrgCtx
from corral.orgs.models import Organization

TITLES = {400: "That did not work", 403: "Not allowed", 404: "Not found",
          405: "Not allowed", 409: "Conflict", 413: "Too large", 429: "Slow down",
          500: "Something went wrong"}


def is_console_path(path: str) -> bool:
    return path == "/" or path == "/console" or path.startswith("/console/")


async def _org_of_path(request: Request) -> tuple[Organization | None, Role | None]:
    """The organization a console path is about (``/console/orgs/{org}/...`` or
    ``/console/products/{product}/...``) and the caller's org-scope role in it."""
    from corral.orgs.access import org_role
    from corral.orgs.service import get_org
    from corral.products.access import get_product

    ctx = getattr(request.state, "console", None)
    if ctx is None or ctx.subject is None or ctx.subject.user_id is None:
        return None, None
    parts = request.url.path.split("/")
    org = None
    if len(parts) > 3 and parts[2] == "orgs":
        org = await get_org(ctx.db, parts[3])
    elif len(parts) > 3 and parts[2] == "products":
        product = await get_product(ctx.db, parts[3])
        org = await ctx.db.get(Organization, product.org_id) if product else None
    if org is None:
        return None, None
    return org, await org_role(ctx.db, ctx.subject.user_id, org.id)


async def inactive_page(request: Request, org: Organization, status: str,
                        role: Role | None, *, http_status: int = 402,
                        errors: FormErrors | None = None) -> Response:
    """Seed 002's "Inactive subscription" page: nothing else of the organization is shown;
    an Owner or Administrator gets the re-activate form (``errors``: its refusal)."""
    return await page(request, "billing/inactive.html", status=http_status, org=org,
                      role=role, title="Inactive subscription", shut_status=status,
                      errors=errors or FormErrors())


async def inactive_if_shut(request: Request, oc: OrgCtx) -> Response | None:
    """The "Inactive subscription" page when ``oc``'s organization is locked or inactive
    (pages the guards let through for a shut organization show it instead of themselves)."""
    from corral.billing import locks

    shut = (await locks.shut_statuses(oc.db, (oc.org.id,))).get(oc.org.id)
    return None if shut is None else await inactive_page(request, oc.org, shut, oc.role)


async def render_error(request: Request, err: CorralError) -> Response:
    """The page for ``err``, read in a fresh transaction (the request's was rolled back)."""
    from corral.console.session import console_ctx

    async with request.app.state.sessionmaker() as db:
        await console_ctx(request, db)
        try:
            return await _render_error(request, err)
        finally:
            request.scope.get("state", {}).pop("console", None)  # no cycle via the request


async def _render_error(request: Request, err: CorralError) -> Response:
    if err.status == 401:
        target = request.url.path
        if request.url.query and request.method == "GET":
            target += "?" + request.url.query
        if request.method != "GET" or not target.startswith("/console"):
            target = "/console/"
        return redirect(f"/console/login?next={quote(target)}")
    if err.code == "subscription_inactive":
        org, role = await _org_of_path(request)
        if org is not None:
            return await inactive_page(request, org, str(err.extra.get(
                "subscription_status", "inactive")), role)
    return await page(request, "error.html", status=err.status,
                      title=TITLES.get(err.status, "That did not work"), error=err)
