"""Ledgers of an organization (and of the personal sandbox: its personal organization) in
the console, and a product's view of them (its own documents and its devices'; no
definitions created or archived there): the definitions with a form to create one, one ledger's instances, and one
instance with a JSON editor (Replace or Merge; schema violations listed by path), its
history (any version viewable) and rollback. Each action calls the service ``/v1`` calls."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.deps import Ctx
from corral.console.forms import FormErrors, attempt, read_form, text
from corral.console.nav import NavItem, add_org_page, add_product_page
from corral.console.render import page, redirect
from corral.console.session import ConsoleOrgGuard, ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.kit.body import from_body
from corral.kit.errors import BadRequest
from corral.kit.ids import path_id
from corral.kit.text import strict_loads
from corral.ledgers import schemas as S
from corral.ledgers import service
from corral.ledgers.models import LedgerDefinition
from corral.ledgers.sync_status import device_syncs
from corral.orgs.access import OrgCtx
from corral.orgs.models import Organization
from corral.products.access import ProductCtx
from corral.products.models import Product

T = TypeVar("T")
router = APIRouter(route_class=TransactionRoute)
add_org_page(NavItem("ledgers", "Ledgers", "/ledgers", "ledgers:list", "sliders"))
add_product_page(NavItem("ledgers", "Ledgers", "/ledgers", "ledgers:list", "sliders"))

CREATE_FIELDS = ("name", "scope", "direction", "description", "schema")
SCOPE_OPTIONS = [(s, s) for s in S.SCOPES]
DIRECTION_OPTIONS = [(S.CLOUD_ONLY, "Cloud only (up to 1 MB)"),
                     (S.CLOUD_TO_DEVICE, "Cloud to device (up to 16 KB)"),
                     (S.DEVICE_TO_CLOUD, "Device to cloud (up to 16 KB)")]
SYNC_PAGE = 50  # devices per page of a ledger's sync table
MODE_OPTIONS = [(S.REPLACE, "Replace the document"), (S.MERGE, "Merge into it")]


@dataclass
class Place:
    """Whose ledgers a page shows: an organization's (the sandbox: the personal one), or a
    product's view of its organization's (only its own documents and its devices')."""

    ctx: Ctx
    org: Organization
    base: str
    layout: dict[str, Any]
    product: Product | None = None

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


def org_place(permission: str) -> Callable[..., Awaitable[Place]]:
    async def dep(oc: OrgCtx = Depends(ConsoleOrgGuard(permission))) -> Place:
        return Place(oc.ctx, oc.org, f"/console/orgs/{oc.org.slug}/ledgers",
                     {"org": oc.org, "role": oc.role})

    return dep


def product_place(permission: str) -> Callable[..., Awaitable[Place]]:
    async def dep(pc: ProductCtx = Depends(ConsoleProductGuard(permission))) -> Place:
        owner = await pc.db.get(Organization, pc.product.org_id)
        assert owner is not None  # a product's organization exists (RESTRICT)
        return Place(pc.ctx, owner, f"/console/products/{pc.product.slug}/ledgers",
                     {"product": pc.product, "role": pc.role}, pc.product)

    return dep


def _base(oc: Place) -> str:
    return oc.base


def _layout(oc: Place) -> dict[str, Any]:
    return {**oc.layout, "section": "ledgers", "manage": oc.product is None,
            "within": oc.product, "owner_name": oc.org.name}


def _pretty(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)


def _json_field(raw: str, name: str, *, required: bool) -> dict[str, Any] | None:
    if not raw.strip():
        if required:
            raise BadRequest(f"{name} is required", field=name)
        return None
    try:  # strict, as /v1: no NaN/Infinity (PostgreSQL's JSON columns refuse them), bounded depth
        value = strict_loads(raw)
    except ValueError as exc:
        raise BadRequest(f"{name} is not valid JSON: {exc}", field=name) from None
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a JSON object", field=name)
    return value


async def _list_page(request: Request, oc: Place, *, form: dict[str, str] | None = None,
                     errors: FormErrors | None = None, status: int = 200) -> Response:
    q = S.LedgerListQuery(per_page=100)
    listed = await service.list_ledgers(oc.db, oc.org, q)
    return await page(request, "ledgers/list.html", status=status,
                      title=f"Ledgers · {(oc.product or oc.org).name}", ledgers=listed["ledger_definitions"],
                      total=listed["meta"]["total"], base=_base(oc), form=form or {},
                      errors=errors or FormErrors(), scopes=SCOPE_OPTIONS,
                      directions=DIRECTION_OPTIONS, **_layout(oc))


async def _listing_violations(found: list[dict[str, Any]], write: Awaitable[T]) -> T:
    """``write``, keeping a schema refusal's violations in ``found`` (the form shows them
    by path) before the refusal rolls the write back."""
    try:
        return await write
    except service.SchemaViolation as exc:
        found.extend(exc.violations)
        raise


def _instance_url(oc: Place, name: str, scope_value: str) -> str:
    return f"{_base(oc)}/{name}/instance?scope={quote(scope_value, safe='')}"


async def _instance_page(request: Request, oc: Place, name: str, scope_value: str, *,
                         version: int | None = None, editor: str | None = None,
                         mode: str = S.REPLACE, errors: FormErrors | None = None,
                         violations: list[dict[str, Any]] | None = None,
                         status: int = 200) -> Response:
    ledger = await service.get_ledger(oc.db, oc.org, name)
    if not scope_value.strip():
        raise BadRequest("Give a scope value (a device id, product, or owner)")
    ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value.strip(),
                                     oc.product)
    current = await service.find_instance(oc.db, ledger, ref)
    history: list[dict[str, Any]] = []
    shown = None
    if current is not None:
        _, rows, _ = await service.list_versions(oc.db, ledger, ref, S.VersionsQuery(limit=100))
        history = [service.version_json(ledger, current, v, r, ref.name) for v, r in rows]
        if version is not None:
            _, v, replaced = await service.get_version(oc.db, ledger, ref, version)
            shown = service.version_json(ledger, current, v, replaced, ref.name)
    data = current.data if current is not None else None
    return await page(
        request, "ledgers/instance.html", status=status,
        title=f"{ledger.name} · {ref.value} · Ledgers", ledger=service.ledger_json(ledger),
        ref=ref, instance=(service.instance_json(ledger, current, ref.name)
                           if current is not None and current.data is not None else None),
        version_no=current.version if current is not None else 0,
        document=_pretty(data) if data is not None else "",
        editor=editor if editor is not None else (_pretty(data) if data is not None else "{}"),
        mode=mode, modes=MODE_OPTIONS, history=history, shown=shown,
        shown_data=_pretty(shown["data"]) if shown and shown["data"] is not None else None,
        errors=errors or FormErrors(), violations=violations or [],
        base=_base(oc), here=_instance_url(oc, ledger.name, ref.value),
        limit=service.limit_for(ledger.direction), **_layout(oc))


async def _target(request: Request, oc: Place, name: str
                  ) -> tuple[str, LedgerDefinition, service.ScopeRef, dict[str, Any]]:
    """A form post's instance: ``?scope=``, the ledger, the resolved scope, the form."""
    scope_value = request.query_params.get("scope", "")
    form = await read_form(request)
    ledger = await service.get_ledger(oc.db, oc.org, name)
    ref = await service.resolve_scope(oc.db, oc.org, ledger, scope_value.strip(),
                                     oc.product)
    return scope_value, ledger, ref, form


Placer = Callable[[str], Callable[..., Awaitable[Place]]]


def register(base: str, placer: Placer, label: str, *, definitions: bool) -> None:
    """The ledger pages under ``base`` for one kind of place (``definitions``: also create
    and archive ledgers: organizations and the sandbox, never a product's members)."""
    if definitions:
        register_definitions(base, placer, label)

    @router.get(base, summary=f"Ledgers ({label})")
    async def ledger_list(request: Request,
                          oc: Place = Depends(placer("ledgers:list"))) -> Response:
        """The ledger definitions (and, on an organization's page, the form to add one)."""
        return await _list_page(request, oc)

    @router.get(base + "/{name}", summary=f"A ledger ({label})")
    async def ledger_detail(request: Request, name: str,
                            oc: Place = Depends(placer("ledgers:get"))) -> Response:
        """One definition and its instances (the first 100), with a way to open any scope
        value; for a cloud-to-device ledger, each device's applied version (``?behind=1``:
        only the devices that do not hold the latest; ``?page=``)."""
        ledger = await service.get_ledger(oc.db, oc.org, name)
        instances = await service.list_instances(oc.db, ledger, S.InstancePage(per_page=100),
                                                  oc.product)
        syncs, sync_meta = None, None
        behind = request.query_params.get("behind") in ("1", "true")
        if ledger.direction == S.CLOUD_TO_DEVICE:
            sync_page = path_id(request.query_params.get("page", "1")) or 1
            syncs, sync_meta = await device_syncs(
                oc.db, oc.org, ledger, product_id=oc.product.id if oc.product else None,
                behind=behind, page=min(sync_page, 1_000_000), per_page=SYNC_PAGE)
        return await page(request, "ledgers/detail.html", title=f"{ledger.name} · Ledgers",
                          ledger=service.ledger_json(ledger), instances=instances["instances"],
                          total=instances["meta"]["total"], base=_base(oc),
                          schema=_pretty(ledger.json_schema) if ledger.json_schema else None,
                          syncs=syncs, sync_meta=sync_meta, behind=behind, **_layout(oc))

    @router.get(base + "/{name}/instance", summary=f"A ledger instance ({label})")
    async def instance_view(request: Request, name: str,
                            oc: Place = Depends(placer("ledgers.instances:get"))
                            ) -> Response:
        """``?scope=<scope value>``: the document, the editor, its history (``&version=n``
        shows one earlier version)."""
        scope_value = request.query_params.get("scope", "")
        raw_version = request.query_params.get("version")
        version = None
        if raw_version:
            version = path_id(raw_version)
            if version is None or version < 1:
                raise BadRequest("version must be a positive integer")
        return await _instance_page(request, oc, name, scope_value, version=version)

    @router.post(base + "/{name}/instance", summary=f"Save a ledger instance ({label})")
    async def instance_save(request: Request, name: str,
                            oc: Place = Depends(placer("ledgers.instances:set"))
                            ) -> Response:
        """Replace or merge the document from the editor; schema violations are listed."""
        scope_value, ledger, ref, form = await _target(request, oc, name)
        raw, mode = text(form, "data"), text(form, "set_mode") or S.REPLACE
        found: list[dict[str, Any]] = []

        async def go() -> Any:
            data = _json_field(raw, "data", required=True)
            assert data is not None
            chosen = from_body(S.SetModeQuery, {"set_mode": mode}).set_mode
            return await _listing_violations(found, service.set_instance(
                oc.db, oc.org, ledger, ref, data, chosen, actor=oc.ctx.me, ip=oc.ctx.ip))

        done, errors = await attempt(oc.db, ("data", "set_mode"), go)
        if done is None:
            return await _instance_page(request, oc, name, scope_value, editor=raw, mode=mode,
                                        errors=errors, violations=found,
                                        status=422 if found else 400)
        return redirect(_instance_url(oc, ledger.name, ref.value),
                        flash=f"Saved as version {done.version}.")

    @router.post(base + "/{name}/instance/rollback", summary=f"Roll a ledger instance back ({label})")
    async def instance_rollback(request: Request, name: str,
                                oc: Place = Depends(placer("ledgers.instances:set"))
                                ) -> Response:
        """Restore the chosen version's document as a new version."""
        scope_value, ledger, ref, form = await _target(request, oc, name)
        version = path_id(text(form, "version"))
        if version is None or version < 1:
            raise BadRequest("version must be a positive integer")
        found: list[dict[str, Any]] = []
        done, errors = await attempt(oc.db, (), lambda: _listing_violations(found, service.rollback(
            oc.db, oc.org, ledger, ref, version, actor=oc.ctx.me, ip=oc.ctx.ip)))
        if done is None:
            return await _instance_page(request, oc, name, scope_value, errors=errors,
                                        violations=found, status=422 if found else 400)
        return redirect(_instance_url(oc, ledger.name, ref.value),
                        flash=f"Version {version} restored as version {done.version}.")


def register_definitions(base: str, placer: Placer, label: str) -> None:
    """Creating and archiving definitions (organization pages only)."""

    @router.post(base, summary=f"Create a ledger ({label})")
    async def ledger_create(request: Request,
                            oc: Place = Depends(placer("ledgers:create"))) -> Response:
        """A ledger definition: name, scope, direction, description, optional JSON Schema."""
        form = await read_form(request)
        shown = {k: text(form, k) for k in CREATE_FIELDS}

        async def go() -> Any:
            schema = _json_field(shown["schema"], "schema", required=False)
            req = from_body(S.LedgerCreate, {
                "name": shown["name"].strip(), "scope": shown["scope"],
                "direction": shown["direction"], "description": shown["description"],
                "schema": schema})
            return await service.create_ledger(oc.db, oc.org, req, actor=oc.ctx.me, ip=oc.ctx.ip)

        done, errors = await attempt(oc.db, CREATE_FIELDS, go)
        if done is None:
            return await _list_page(request, oc, form=shown, errors=errors, status=400)
        return redirect(f"{_base(oc)}/{done.name}", flash=f"Ledger {done.name} created.")

    @router.post(base + "/{name}/archive", summary=f"Archive a ledger ({label})")
    async def ledger_archive(name: str,
                             oc: Place = Depends(placer("ledgers:remove"))) -> Response:
        """Archive the ledger: readable, no more writes."""
        await service.archive_ledger(oc.db, oc.org, name, actor=oc.ctx.me, ip=oc.ctx.ip)
        return redirect(f"{_base(oc)}/{name}", flash=f"Ledger {name} archived.")


register("/console/orgs/{org}/ledgers", org_place, "organization or sandbox", definitions=True)
register("/console/products/{product}/ledgers", product_place, "product", definitions=False)
