"""A product's groups, customers, OAuth clients, CA certificates (JITP) and audit log; an
organization's audit log and settings. Each action calls the service ``/v1`` calls."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from corral.audit import service as audit
from corral.console.forms import FormErrors, attempt, checked, read_form, text
from corral.console.render import ENV, page, redirect
from corral.console.session import ConsoleOrgGuard, ConsoleProductGuard
from corral.customers import service as customers
from corral.customers.schemas import CustomerCreate
from corral.db.session import TransactionRoute
from corral.devices import credentials, dynquery
from corral.devices import groups as group_rules
from corral.devices import service as device_service
from corral.devices.schemas import CaChange, GroupChange, GroupCreate
from corral.kit.body import from_body
from corral.kit.errors import BadRequest
from corral.kit.ids import INT64_MAX, path_id
from corral.orgs import service as orgs
from corral.orgs.access import OrgCtx
from corral.products import service as products
from corral.products.access import ProductCtx
from corral.products.schemas import ClientChange, ClientCreate

router = APIRouter(route_class=TransactionRoute)
PER_PAGE = 50


def _base(pc: ProductCtx) -> str:
    return f"/console/products/{pc.product.slug}"


def _page_no(request: Request) -> int:
    n = path_id(request.query_params.get("page", "1"), hi=INT64_MAX)
    return min(n, 100_000) if n else 1


# --- groups ---------------------------------------------------------------------------------

async def _groups(request: Request, pc: ProductCtx, *, status: int = 200,
                  errors: FormErrors | None = None, editing: str | None = None,
                  form: dict[str, str] | None = None) -> Response:
    rows = await group_rules.list_groups(pc.db, pc.product)
    return await page(request, "manage/groups.html", status=status, product=pc.product,
                      role=pc.role, title=f"Groups · {pc.product.name}", section="groups",
                      groups=rows, errors=errors or FormErrors(), editing=editing,
                      form=form or {}, base=_base(pc))


@router.get("/console/products/{product}/groups", summary="Groups")
async def groups(request: Request,
                 pc: ProductCtx = Depends(ConsoleProductGuard("groups:list"))) -> Response:
    """The product's device groups with how many devices each holds."""
    return await _groups(request, pc)


GROUP_FIELDS = ("name", "color", "description", "query")
PREVIEW_DEVICES = 10


def _group_body(form: dict[str, Any], *, editing: bool = False) -> dict[str, Any]:
    body = {"name": text(form, "name").strip(), "color": text(form, "color"),
            "description": text(form, "description")}
    query = text(form, "query").strip()
    if query or (editing and "query" in form):
        body["query"] = query or None  # blank while editing: a static group again
    return body


@router.get("/console/products/{product}/groups/preview", summary="Preview a group query")
async def preview_group(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("devices:list"))
                        ) -> Response:
    """A fragment for the group editor's live preview: how many devices ``query`` matches
    now and the first of them, or where the query is wrong."""
    query = request.query_params.get("query", "").strip()
    result: dict[str, Any] | None = None
    problem = None
    if query:
        try:
            result = await device_service.preview_query(pc.db, pc.product, query,
                                                        PREVIEW_DEVICES)
        except dynquery.QueryError as exc:
            problem = exc.description.removeprefix("query: ")
    html = ENV.get_template("manage/_group_preview.html").render(
        query=query, result=result, problem=problem, base=_base(pc))
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@router.post("/console/products/{product}/groups", summary="Create a group")
async def create_group(request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("groups:create"))
                       ) -> Response:
    """A group: name (lowercase letters, digits, - and _), color, description; with a
    query, a dynamic group."""
    form = await read_form(request)
    body = _group_body(form)
    g, errors = await attempt(pc.db, GROUP_FIELDS, lambda: (
        group_rules.create_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                 req=from_body(GroupCreate, body))))
    if g is None:
        return await _groups(request, pc, status=400, errors=errors, form=body)
    return redirect(f"{_base(pc)}/groups", flash=f"Group {g.name} created.")


@router.post("/console/products/{product}/groups/{name}", summary="Edit a group")
async def edit_group(name: str, request: Request,
                     pc: ProductCtx = Depends(ConsoleProductGuard("groups:update"))
                     ) -> Response:
    """Rename, recolor or describe the group, or change its query."""
    form = await read_form(request)
    body = _group_body(form, editing=True)
    done, errors = await attempt(pc.db, GROUP_FIELDS, lambda: (
        group_rules.update_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                 name=name, req=from_body(GroupChange, body))))
    if done is None:
        return await _groups(request, pc, status=400, errors=errors, editing=name, form=body)
    return redirect(f"{_base(pc)}/groups", flash=f"Group {done[0].name} saved.")


@router.post("/console/products/{product}/groups/{name}/delete", summary="Delete a group")
async def delete_group(name: str, request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("groups:remove"))
                       ) -> Response:
    """Delete the group; its devices simply leave it."""
    await read_form(request)
    _, errors = await attempt(pc.db, (), lambda: group_rules.delete_group(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, name=name))
    if errors:
        return await _groups(request, pc, status=400, errors=errors)
    return redirect(f"{_base(pc)}/groups", flash=f"Group {name} deleted.")


# --- customers ------------------------------------------------------------------------------

async def _customers(request: Request, pc: ProductCtx, *, status: int = 200,
                     errors: FormErrors | None = None, form: dict[str, str] | None = None
                     ) -> Response:
    n = _page_no(request)
    result = await customers.list_customers(pc.db, pc.product, page=n, per_page=PER_PAGE)
    return await page(request, "manage/customers.html", status=status, product=pc.product,
                      role=pc.role, title=f"Customers · {pc.product.name}", section="customers",
                      result=result, page_no=n, per_page=PER_PAGE,
                      errors=errors or FormErrors(), form=form or {}, base=_base(pc))


@router.get("/console/products/{product}/customers", summary="Customers")
async def customer_list(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("customers:list"))
                        ) -> Response:
    """Each customer with their devices (once they claimed one)."""
    return await _customers(request, pc)


@router.post("/console/products/{product}/customers", summary="Create a customer")
async def create_customer(request: Request,
                          pc: ProductCtx = Depends(ConsoleProductGuard("customers:create"))
                          ) -> Response:
    """A customer with an e-mail address and a password (as a team member creates one)."""
    form = await read_form(request)
    email = text(form, "email").strip()
    body = {"email": email, "password": text(form, "password")}
    done, errors = await attempt(pc.db, ("email", "password"), lambda: customers.create_customer(
        pc.db, pc.ctx.settings, creator=customers.Creator(actor=pc.ctx.me), product=pc.product,
        req=from_body(CustomerCreate, body), ip=pc.ctx.ip))
    if done is None:
        return await _customers(request, pc, status=400, errors=errors, form={"email": email})
    return redirect(f"{_base(pc)}/customers", flash=f"Customer {email} created.")


@router.post("/console/products/{product}/customers/{email}/delete",
             summary="Delete a customer")
async def delete_customer(email: str, request: Request,
                          pc: ProductCtx = Depends(ConsoleProductGuard("customers:remove"))
                          ) -> Response:
    """Delete the customer; their devices stay in the product, unclaimed."""
    await read_form(request)
    _, errors = await attempt(pc.db, (), lambda: customers.delete_customer(
        pc.db, actor=pc.ctx.me, product=pc.product, email=email, ip=pc.ctx.ip))
    if errors:
        return await _customers(request, pc, status=400, errors=errors)
    return redirect(f"{_base(pc)}/customers", flash=f"Customer {email} deleted.")


# --- OAuth clients -----------------------------------------------------------------------------

async def _clients(request: Request, pc: ProductCtx, *, status: int = 200,
                   errors: FormErrors | None = None, form: dict[str, str] | None = None,
                   created: Any = None, secret: str | None = None) -> Response:
    rows = await products.list_clients(pc.db, product=pc.product)
    return await page(request, "manage/clients.html", status=status, product=pc.product,
                      role=pc.role, title=f"OAuth clients · {pc.product.name}",
                      section="clients", clients=rows, errors=errors or FormErrors(),
                      form=form or {"type": "installed"}, created=created, secret=secret,
                      base=_base(pc))


@router.get("/console/products/{product}/clients", summary="OAuth clients")
async def clients(request: Request,
                  pc: ProductCtx = Depends(ConsoleProductGuard("clients:list"))) -> Response:
    """The product's OAuth clients (for its apps and servers)."""
    return await _clients(request, pc)


@router.post("/console/products/{product}/clients", summary="Create an OAuth client")
async def create_client(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("clients:create"))
                        ) -> Response:
    """A client; its secret is shown once."""
    form = await read_form(request)
    fields = {k: text(form, k).strip() for k in ("name", "type", "redirect_uri", "scope")}

    async def go() -> Any:
        req = ClientCreate.model_validate({k: v for k, v in fields.items() if v})
        return await products.create_client(pc.db, actor=pc.ctx.me, product=pc.product,
                                            req=req, ip=pc.ctx.ip)

    done, errors = await attempt(pc.db, ("name", "type", "redirect_uri", "scope"), go)
    if done is None:
        return await _clients(request, pc, status=400, errors=errors, form=fields)
    row, secret = done
    return await _clients(request, pc, created=row, secret=secret)


@router.post("/console/products/{product}/clients/{client_id}", summary="Edit an OAuth client")
async def edit_client(client_id: str, request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("clients:update"))
                      ) -> Response:
    """Rename it or change its scope (its tokens are revoked when the scope changes)."""
    form = await read_form(request)
    fields = {"name": text(form, "name").strip(), "scope": text(form, "scope").strip() or "none"}

    async def go() -> Any:
        return await products.update_client(pc.db, actor=pc.ctx.me, client_id=client_id,
                                            product=pc.product,
                                            req=ClientChange.model_validate(fields),
                                            ip=pc.ctx.ip)

    done, errors = await attempt(pc.db, ("name", "scope"), go)
    if done is None:
        return await _clients(request, pc, status=400, errors=errors)
    return redirect(f"{_base(pc)}/clients", flash=f"Client {client_id} saved.")


@router.post("/console/products/{product}/clients/{client_id}/delete",
             summary="Delete an OAuth client")
async def delete_client(client_id: str, request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("clients:remove"))
                        ) -> Response:
    """Delete the client and every token issued through it."""
    await read_form(request)
    _, errors = await attempt(pc.db, (), lambda: products.delete_client(
        pc.db, actor=pc.ctx.me, client_id=client_id, product=pc.product, ip=pc.ctx.ip))
    if errors:
        return await _clients(request, pc, status=400, errors=errors)
    return redirect(f"{_base(pc)}/clients", flash=f"Client {client_id} deleted.")


# --- CA certificates and JITP -------------------------------------------------------------------

async def _cas(request: Request, pc: ProductCtx, *, status: int = 200,
               errors: FormErrors | None = None, edit_errors: dict[int, FormErrors] | None = None,
               form: dict[str, str] | None = None) -> Response:
    rows = await credentials.list_cas(pc.db, pc.product)
    return await page(request, "manage/certificates.html", status=status, product=pc.product,
                      role=pc.role, title=f"Certificates · {pc.product.name}",
                      section="certificates", cas=[credentials.ca_json(c) for c in rows],
                      errors=errors or FormErrors(), edit_errors=edit_errors or {},
                      form=form or {}, base=_base(pc))


def _jitp(form: dict[str, Any]) -> dict[str, Any]:
    def words(name: str) -> list[str]:
        return [w.strip() for w in text(form, name).split(",") if w.strip()]

    return {"groups": words("groups"), "tags": words("tags"),
            "development": checked(form, "development"),
            "quarantine": checked(form, "quarantine")}


@router.get("/console/products/{product}/certificates", summary="CA certificates")
async def certificates(request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("products:get"))
                       ) -> Response:
    """CA certificates that provision devices just in time (JITP), with their settings."""
    return await _cas(request, pc)


@router.post("/console/products/{product}/certificates", summary="Register a CA")
async def create_ca(request: Request,
                    pc: ProductCtx = Depends(ConsoleProductGuard("products.settings:update"))
                    ) -> Response:
    """Register a CA certificate (PEM pasted or a file) with JITP settings."""
    form = await read_form(request)
    pem = text(form, "certificate").strip()
    upload = form.get("file")

    async def go() -> Any:
        cert: str | bytes | None = pem or None
        if cert is None and upload is not None and hasattr(upload, "read"):
            cert = (await upload.read())[:credentials.MAX_CERT_TEXT + 1]
        return await credentials.create_ca(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                           product=pc.product, certificate=cert,
                                           jitp=_jitp(form), active=True)

    ca, errors = await attempt(pc.db, ("certificate", "groups", "tags"), go)
    if ca is None:
        if errors.general and not errors.fields:
            errors.fields["certificate"] = errors.general.pop(0)
        return await _cas(request, pc, status=400, errors=errors,
                          form={"certificate": pem, "groups": text(form, "groups"),
                                "tags": text(form, "tags")})
    return redirect(f"{_base(pc)}/certificates", flash=f"CA {ca.subject} registered.")


@router.post("/console/products/{product}/certificates/{ca_id}", summary="Edit a CA")
async def edit_ca(ca_id: str, request: Request,
                  pc: ProductCtx = Depends(ConsoleProductGuard("products.settings:update"))
                  ) -> Response:
    """Turn the CA on or off and change what it gives the devices it provisions."""
    form = await read_form(request)
    ca = await credentials.get_ca(pc.db, pc.product, ca_id)
    req = CaChange(active=checked(form, "active"), jitp=_jitp(form))
    done, errors = await attempt(pc.db, ("groups", "tags"), lambda: credentials.update_ca(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, ca=ca, req=req))
    if done is None:
        return await _cas(request, pc, status=400, edit_errors={ca.id: errors})
    return redirect(f"{_base(pc)}/certificates", flash="Certificate settings saved.")


@router.post("/console/products/{product}/certificates/{ca_id}/delete",
             summary="Unregister a CA")
async def delete_ca(ca_id: str, request: Request,
                    pc: ProductCtx = Depends(ConsoleProductGuard("products.settings:update"))
                    ) -> Response:
    """Devices it provisioned stay; new devices can no longer use it."""
    await read_form(request)
    ca = await credentials.get_ca(pc.db, pc.product, ca_id)
    await credentials.delete_ca(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                ca=ca)
    return redirect(f"{_base(pc)}/certificates", flash="Certificate unregistered.")


# --- audit logs -------------------------------------------------------------------------------

def _action_filter(request: Request) -> str | None:
    value = (request.query_params.get("action") or "").strip()
    return value[:64] or None


@router.get("/console/products/{product}/audit", summary="Product audit log")
async def product_audit(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("audit:list"))
                        ) -> Response:
    """Who changed what in the product, newest first."""
    n, action = _page_no(request), _action_filter(request)
    rows, more = await audit.list_entries(pc.db, product_id=pc.product.id, page=n,
                                          per_page=PER_PAGE, action_prefix=action)
    return await page(request, "manage/audit.html", product=pc.product, role=pc.role,
                      title=f"Audit log · {pc.product.name}", section="audit", rows=rows,
                      more=more, page_no=n, action=action or "",
                      base=f"{_base(pc)}/audit")


@router.get("/console/orgs/{org}/audit", summary="Organization audit log")
async def org_audit(request: Request,
                    oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.audit:list"))) -> Response:
    """Who changed what in the organization and its products, newest first."""
    n, action = _page_no(request), _action_filter(request)
    rows, more = await audit.list_entries(oc.db, org_id=oc.org.id, page=n, per_page=PER_PAGE,
                                          action_prefix=action)
    return await page(request, "manage/audit.html", org=oc.org, role=oc.role,
                      title=f"Audit log · {oc.org.name}", section="audit", rows=rows,
                      more=more, page_no=n, action=action or "",
                      base=f"/console/orgs/{oc.org.slug}/audit")


# --- organization settings -----------------------------------------------------------------------

async def _org_settings(request: Request, oc: OrgCtx, *, status: int = 200,
                        errors: FormErrors | None = None,
                        delete_errors: FormErrors | None = None) -> Response:
    return await page(request, "manage/org_settings.html", status=status, org=oc.org,
                      role=oc.role, title=f"Settings · {oc.org.name}", section="settings",
                      errors=errors or FormErrors(), delete_errors=delete_errors or FormErrors())


@router.get("/console/orgs/{org}/settings", summary="Organization settings")
async def org_settings(request: Request,
                       oc: OrgCtx = Depends(ConsoleOrgGuard("orgs:get"))) -> Response:
    """The organization's name and slug; deleting it."""
    return await _org_settings(request, oc)


@router.post("/console/orgs/{org}/settings", summary="Rename the organization")
async def rename_org(request: Request,
                     oc: OrgCtx = Depends(ConsoleOrgGuard("orgs:update"))) -> Response:
    """A new name (the slug, and so every address, stays)."""
    form = await read_form(request)
    done, errors = await attempt(oc.db, ("name",), lambda: orgs.rename_org(
        oc.db, actor=oc.ctx.me, org=oc.org, name=text(form, "name"), ip=oc.ctx.ip))
    if done is None:
        return await _org_settings(request, oc, status=400, errors=errors)
    return redirect(f"/console/orgs/{oc.org.slug}/settings", flash="Organization renamed.")


@router.post("/console/orgs/{org}/delete", summary="Delete the organization")
async def delete_org(request: Request,
                     oc: OrgCtx = Depends(ConsoleOrgGuard("orgs:remove"))) -> Response:
    """Delete an organization without products (Owners only)."""
    form = await read_form(request)
    slug = oc.org.slug

    async def go() -> bool:
        if text(form, "confirm").strip() != slug:
            raise BadRequest(f"Type the organization's slug ({slug}) to confirm",
                             field="confirm")
        await orgs.delete_org(oc.db, actor=oc.ctx.me, org=oc.org, ip=oc.ctx.ip)
        return True

    done, errors = await attempt(oc.db, ("confirm",), go)
    if done is None:
        return await _org_settings(request, oc, status=400, delete_errors=errors)
    return redirect("/console/", flash="Organization deleted.")
