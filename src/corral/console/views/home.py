"""The console's entry points: the organization switcher's targets (the personal sandbox and
each organization), creating organizations and products, and "my devices"."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.auth.policy import role_allows
from corral.console import counts
from corral.console.forms import FormErrors, attempt, read_form, text
from corral.console.render import page, redirect
from corral.console.session import ConsoleOrgGuard, SignedIn
from corral.db.session import TransactionRoute
from corral.devices import claims
from corral.devices import service as devices
from corral.orgs import service as orgs
from corral.orgs.access import OrgCtx
from corral.products import service as products
from corral.products.schemas import ProductCreate

router = APIRouter(route_class=TransactionRoute)

ORG_COOKIE = "corral_org"  # the organization last opened: /console/ goes back there

# Particle's platform ids (reference: particle-cloud-api.md) and corral's generic MQTT devices
PLATFORMS = [(0, "Any / MQTT device"), (6, "Photon"), (8, "P1"), (10, "Electron"),
             (12, "Argon"), (13, "Boron"), (32, "P2")]
PLATFORM_NAMES = dict(PLATFORMS)


@router.get("/", include_in_schema=False)
async def root() -> Response:
    """The web console lives under /console/."""
    return redirect("/console/")


@router.get("/console", include_in_schema=False)
@router.get("/console/", summary="Console home")
async def home(request: Request, ctx: SignedIn) -> Response:
    """Back to the organization last opened, else the personal sandbox (customers: their
    devices)."""
    me = ctx.me
    if me.kind != "user":
        return redirect("/console/devices")
    mine = await orgs.list_orgs(ctx.db, actor=me)
    last = request.cookies.get(ORG_COOKIE)
    for org, _role in mine:
        if last and org.slug == last:
            return redirect(f"/console/orgs/{org.slug}")
    personal = next((o for o, _ in mine if o.personal), None)
    if personal is None:
        return redirect("/console/devices")
    return redirect(f"/console/orgs/{personal.slug}")


@router.get("/console/orgs/new", summary="New organization form")
async def new_org_page(request: Request, ctx: SignedIn) -> Response:
    """The form to create an organization."""
    return await page(request, "orgs/new.html", title="New organization",
                      errors=FormErrors(), form={})


@router.post("/console/orgs", summary="Create an organization")
async def create_org(request: Request, ctx: SignedIn) -> Response:
    """Create an organization; the caller becomes its Owner (``orgs.service.new_org``)."""
    form = await read_form(request)
    name = text(form, "name")
    org, errors = await attempt(ctx.db, ("name",), lambda: orgs.new_org(
        ctx.db, actor=ctx.me, name=name, ip=ctx.ip))
    if org is None:
        return await page(request, "orgs/new.html", status=400, title="New organization",
                          errors=errors, form={"name": name})
    return redirect(f"/console/orgs/{org.slug}", flash=f"Organization {org.name} created.")


@router.get("/console/orgs/{org}", summary="Organization overview")
async def org_home(request: Request,
                   oc: OrgCtx = Depends(ConsoleOrgGuard("orgs:get"))) -> Response:
    """The organization's (or the personal sandbox's) products; an organization whose
    subscription is shut shows only the "Inactive subscription" page."""
    from corral.console.errors import inactive_if_shut

    if (shut := await inactive_if_shut(request, oc)) is not None:
        return shut
    views = await products.org_products(oc.db, oc.org)
    stats = {pv.product.id: await counts.product_summary(oc.db, pv.product.id)
             for pv in views}
    shared = []
    own_devices: list[dict[str, object]] = []
    if oc.org.personal:
        mine = {pv.product.id for pv in views}
        shared = [pv for pv in await products.visible_products(oc.db, oc.ctx.me)
                  if pv.product.id not in mine]
        own_devices = await devices.my_devices(oc.db, oc.ctx.me)
    warn = None
    if role_allows(oc.role, "orgs.billing:get"):  # the 70/90/100 % banner, as on Billing
        from corral.console.views.billing import usage_warning

        warn = await usage_warning(oc.db, oc.org)
    response = await page(request, "orgs/home.html", org=oc.org, role=oc.role,
                          title="Personal sandbox" if oc.org.personal else oc.org.name,
                          section="products", products=views, stats=stats, shared=shared,
                          own_devices=own_devices, platforms=PLATFORM_NAMES, warn=warn)
    response.set_cookie(ORG_COOKIE, oc.org.slug, path="/console", httponly=True,
                        samesite="lax", max_age=365 * 86400)
    return response


@router.get("/console/orgs/{org}/products/new", summary="New product form")
async def new_product_page(request: Request,
                           oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.products:create"))
                           ) -> Response:
    """The form to create a product in the organization."""
    return await page(request, "products/new.html", org=oc.org, role=oc.role,
                      title="New product", section="products", errors=FormErrors(),
                      form={"platform_id": "12"}, platforms=PLATFORMS)


PRODUCT_FIELDS = ("name", "description", "platform_id", "tags")


@router.post("/console/orgs/{org}/products", summary="Create a product")
async def create_product(request: Request,
                         oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.products:create"))
                         ) -> Response:
    """Create a product (``products.service.create_product``, as ``/v1`` does)."""
    form = await read_form(request)
    fields = {k: text(form, k) for k in PRODUCT_FIELDS}
    # the /v1 request model validates the form (a message per field), the service does the rest
    pv, errors = await attempt(oc.db, PRODUCT_FIELDS, lambda: products.create_product(
        oc.db, actor=oc.ctx.me, org=oc.org, ip=oc.ctx.ip,
        req=ProductCreate.model_validate({k: v for k, v in fields.items() if v.strip()})))
    if pv is None:
        return await page(request, "products/new.html", status=400, org=oc.org, role=oc.role,
                          title="New product", section="products", errors=errors,
                          form=fields, platforms=PLATFORMS)
    return redirect(f"/console/products/{pv.product.slug}",
                    flash=f"Product {pv.product.name} created. Import its devices next.")


# --- my devices (a person's own devices, a customer's claimed ones) ------------------------

@router.get("/console/devices", summary="My devices")
async def my_devices(request: Request, ctx: SignedIn) -> Response:
    """Devices claimed to me (a customer sees only these)."""
    rows = await devices.my_devices(ctx.db, ctx.me)
    return await page(request, "devices/mine.html", title="My devices", section="devices",
                      devices=rows, errors=FormErrors(), form={}, platforms=PLATFORM_NAMES)


@router.post("/console/devices", summary="Claim a device")
async def claim(request: Request, ctx: SignedIn) -> Response:
    """Claim a device by its ID (``claims.claim_device``, as ``POST /v1/devices``)."""
    form = await read_form(request)
    device_id = text(form, "id").strip()
    device, errors = await attempt(ctx.db, ("id",), lambda: claims.claim_device(
        ctx.db, actor=ctx.me, device_id=device_id, ip=ctx.ip))
    if device is None:
        if errors.general and not errors.fields:
            errors.fields["id"] = errors.general.pop(0)
        rows = await devices.my_devices(ctx.db, ctx.me)
        return await page(request, "devices/mine.html", status=400, title="My devices",
                          section="devices", devices=rows, errors=errors,
                          form={"id": device_id}, platforms=PLATFORM_NAMES)
    return redirect(f"/console/devices/{device.id}", flash="Device claimed.")
