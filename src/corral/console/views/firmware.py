"""Product firmware: upload (with progress), the list with device counts, one version's page,
release with the impact preview before confirming (standard or intelligent, to the product
default and/or groups, optionally as a phased rollout), and the rollouts with their live
progress, pause / resume / abort and the automatic pause's reason. Signing keys too.

Every action calls the same service as ``/v1``: ``firmware.service`` (upload, edit, delete,
keys), ``firmware.releases`` (release and its dry run), ``rollouts.service``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from corral.console.forms import FormErrors, attempt, checked, read_form, text, values
from corral.console.render import page, redirect
from corral.console.session import CSRF_FIELD, ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.devices import groups as group_rules
from corral.firmware import releases, service, storage
from corral.firmware.api import read_upload
from corral.firmware.schemas import FirmwareChange, Release, SigningKeyCreate
from corral.kit.body import from_body
from corral.kit.errors import BadRequest, NotFound
from corral.products.access import ProductCtx
from corral.rollouts import service as rollouts
from corral.rollouts.schemas import RolloutShares

router = APIRouter(route_class=TransactionRoute)

UPLOAD_FIELDS = ("version", "title", "description", "binary", "mandatory", "signature")
PREVIEW_ROWS = 100


def _base(pc: ProductCtx) -> str:
    return f"/console/products/{pc.product.slug}"


async def _list_page(request: Request, pc: ProductCtx, *, status: int = 200,
                     upload_errors: FormErrors | None = None,
                     form: Mapping[str, str] | None = None) -> Response:
    items = await service.list_firmware(pc.db, pc.product)
    live = {r.firmware_id: r for r in await rollouts.list_rollouts(pc.db, pc.product)
            if r.state in ("active", "paused")}
    newest = max((f["version"] for f in items), default=0)
    return await page(request, "firmware/list.html", status=status, product=pc.product,
                      role=pc.role, title=f"Firmware · {pc.product.name}", section="firmware",
                      items=items, live=live, upload_errors=upload_errors or FormErrors(),
                      form=form or {"version": str(newest + 1)}, base=_base(pc))


@router.get("/console/products/{product}/firmware", summary="Firmware")
async def firmware_list(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("firmware:list"))
                        ) -> Response:
    """Every version with its releases and how many devices run it; the upload form."""
    return await _list_page(request, pc)


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


@router.post("/console/products/{product}/firmware", summary="Upload firmware")
async def upload(request: Request,
                 pc: ProductCtx = Depends(ConsoleProductGuard("firmware:create"))) -> Response:
    """A binary with its version, title and description (``service.create_firmware``, the
    same checks as ``POST /v1/products/{product}/firmware``). The page's script sends it with
    a progress bar and asks for JSON; without scripts the form posts as usual."""
    ctx = pc.ctx

    async def go() -> Any:
        upload = await read_upload(request, ctx.settings, ignore=frozenset({CSRF_FIELD}))
        return await service.create_firmware(pc.db, actor=ctx.me, ip=ctx.ip,
                                             product=pc.product, settings=ctx.settings,
                                             upload=upload)

    fw, errors = await attempt(pc.db, UPLOAD_FIELDS, go)
    if errors and not errors.fields and errors.general:
        msg = errors.general[0]
        if any(w in msg.lower() for w in ("binary", "file", "module", "platform", "crc",
                                          "product_version", "product version", "bytes")):
            errors.fields["binary"] = errors.general.pop(0)
    if _wants_json(request):
        if fw is None:
            return JSONResponse({"ok": False, "fields": errors.fields,
                                 "general": errors.general}, status_code=400)
        return JSONResponse({"ok": True, "location": f"{_base(pc)}/firmware/{fw.version}"})
    if fw is None:
        form = await read_form(request)
        shown = {k: text(form, k) for k in ("version", "title", "description")}
        return await _list_page(request, pc, status=400, upload_errors=errors, form=shown)
    return redirect(f"{_base(pc)}/firmware/{fw.version}",
                    flash=f"Version {fw.version} uploaded. Release it when you are ready.")


# --- one version -----------------------------------------------------------------------------

async def _version_page(request: Request, pc: ProductCtx, version: str, *, status: int = 200,
                        errors: FormErrors | None = None) -> Response:
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    view = await service.firmware_view(pc.db, pc.product, fw)
    adoption = await service.adoption(pc.db, pc.product, fw)
    mine = [r for r in await rollouts.list_rollouts(pc.db, pc.product) if r.firmware_id == fw.id]
    return await page(request, "firmware/version.html", status=status, product=pc.product,
                      role=pc.role, title=f"v{fw.version} · {pc.product.name}",
                      section="firmware", fw=fw, view=view, adoption=adoption, rollouts=mine,
                      errors=errors or FormErrors(), base=_base(pc))


@router.get("/console/products/{product}/firmware/{version}", summary="A firmware version")
async def version_page(version: str, request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("firmware:get"))
                       ) -> Response:
    """One version: where it is released, how it spreads, its rollouts."""
    return await _version_page(request, pc, version)


@router.get("/console/products/{product}/firmware/{version}/binary",
            summary="Download a firmware binary")
async def binary(version: str,
                 pc: ProductCtx = Depends(ConsoleProductGuard("firmware:get"))) -> Response:
    """The binary as uploaded."""
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    path = storage.blob_path(pc.ctx.settings, fw.sha256)
    if not path.is_file():
        raise NotFound("The binary of this firmware is missing from the data directory")
    return FileResponse(path, media_type="application/octet-stream", filename=fw.filename)


@router.post("/console/products/{product}/firmware/{version}/edit", summary="Edit firmware")
async def edit(version: str, request: Request,
               pc: ProductCtx = Depends(ConsoleProductGuard("firmware:update"))) -> Response:
    """Change the title, description or the mandatory flag."""
    form = await read_form(request)
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    body = {"title": text(form, "title"), "description": text(form, "description"),
            "mandatory": checked(form, "mandatory")}
    done, errors = await attempt(pc.db, ("title", "description"), lambda: service.update_firmware(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, fw=fw,
        req=from_body(FirmwareChange, body)))
    if done is None:
        return await _version_page(request, pc, version, status=400, errors=errors)
    return redirect(f"{_base(pc)}/firmware/{version}", flash="Firmware saved.")


@router.post("/console/products/{product}/firmware/{version}/delete", summary="Delete")
async def delete(version: str, request: Request,
                 pc: ProductCtx = Depends(ConsoleProductGuard("firmware:remove"))) -> Response:
    """Delete a version that was never released (and no device is locked to)."""
    await read_form(request)
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    _, errors = await attempt(pc.db, (), lambda: service.delete_firmware(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, settings=pc.ctx.settings,
        fw=fw))
    if errors:
        return await _version_page(request, pc, version, status=400, errors=errors)
    return redirect(f"{_base(pc)}/firmware", flash=f"Version {version} deleted.")


# --- release: the form, the impact preview, the confirmation --------------------------------

def release_body(params: Mapping[str, Any], version: int, *, dry_run: bool) -> dict[str, Any]:
    """The ``/v1`` release body from the console's release form (query or form)."""
    def one(name: str) -> str:
        v = params.get(name)
        if isinstance(v, list):
            v = v[-1] if v else ""
        return str(v or "")

    groups = params.getlist("group") if hasattr(params, "getlist") else values(
        dict(params), "group")
    body: dict[str, Any] = {
        "version": version, "product_default": one("product_default") in ("on", "true"),
        "groups": [g for g in groups if g], "intelligent": one("mode") == "intelligent",
        "dry_run": dry_run}
    kind = one("rollout")
    if kind in ("percent", "count"):
        rollout: dict[str, Any] = {kind: one("amount")}
        if one("failure_threshold_percent"):
            rollout["failure_threshold_percent"] = one("failure_threshold_percent")
        if one("failure_min_attempts"):
            rollout["failure_min_attempts"] = one("failure_min_attempts")
        body["rollout"] = rollout
    return body


RELEASE_FIELDS = ("product_default", "group", "groups", "mode", "rollout", "amount", "percent",
                  "count", "failure_threshold_percent", "failure_min_attempts")


@router.get("/console/products/{product}/firmware/{version}/release", summary="Release")
async def release_page(version: str, request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("firmware:release"))
                       ) -> Response:
    """The release form; with ``preview`` it shows the impact of those choices (a dry run of
    the release: nothing changes) and the button that confirms them."""
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    params = request.query_params
    colors = await group_rules.group_colors(pc.db, pc.product)
    preview = None
    errors = FormErrors()
    if params.get("preview"):
        body = release_body(params, fw.version, dry_run=True)
        preview, errors = await attempt(pc.db, RELEASE_FIELDS, lambda: releases.release(
            pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
            req=from_body(Release, body), page=1,
            per_page=PREVIEW_ROWS))
    current = await service.firmware_view(pc.db, pc.product, fw)
    chosen = {"product_default": params.get("product_default") in ("on", "true")
              if params.get("preview") else bool(current["product_default"]),
              "groups": params.getlist("group") if params.get("preview")
              else list(current["groups"]),
              "mode": params.get("mode") or ("intelligent" if fw.intelligent else "standard"),
              "rollout": params.get("rollout") or "none", "amount": params.get("amount", ""),
              "failure_threshold_percent": params.get("failure_threshold_percent", ""),
              "failure_min_attempts": params.get("failure_min_attempts", "")}
    return await page(request, "firmware/release.html", status=400 if errors else 200,
                      product=pc.product, role=pc.role,
                      title=f"Release v{fw.version} · {pc.product.name}", section="firmware",
                      fw=fw, current=current, colors=colors, chosen=chosen, preview=preview,
                      errors=errors, base=_base(pc), query=str(params))


@router.post("/console/products/{product}/firmware/{version}/release", summary="Release now")
async def release(version: str, request: Request,
                  pc: ProductCtx = Depends(ConsoleProductGuard("firmware:release"))
                  ) -> Response:
    """Release as previewed (``releases.release``, as ``PUT /v1/.../firmware/release``)."""
    form = await read_form(request)
    fw = await service.get_firmware(pc.db, pc.product, service.version_of_path(version))
    body = release_body(form, fw.version, dry_run=False)
    done, errors = await attempt(pc.db, RELEASE_FIELDS, lambda: releases.release(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
        req=from_body(Release, body)))
    if errors:
        return await page(request, "firmware/release.html", status=400, product=pc.product,
                          role=pc.role, title=f"Release v{fw.version}", section="firmware",
                          fw=fw, current=await service.firmware_view(pc.db, pc.product, fw),
                          colors=await group_rules.group_colors(pc.db, pc.product),
                          chosen={"product_default": body["product_default"],
                                  "groups": body["groups"],
                                  "mode": "intelligent" if body["intelligent"] else "standard",
                                  "rollout": text(form, "rollout") or "none",
                                  "amount": text(form, "amount"),
                                  "failure_threshold_percent": text(
                                      form, "failure_threshold_percent"),
                                  "failure_min_attempts": text(form, "failure_min_attempts")},
                          preview=None, errors=errors, base=_base(pc), query="")
    if "rollout" in body:
        live = await rollouts.live_rollout(pc.db, fw.id)
        if live is not None:
            return redirect(f"{_base(pc)}/rollouts/{live.id}",
                            flash=f"Version {fw.version} released as a phased rollout.")
    return redirect(f"{_base(pc)}/firmware/{fw.version}",
                    flash=f"Version {fw.version} released.")


# --- rollouts ---------------------------------------------------------------------------------

@router.get("/console/products/{product}/rollouts", summary="Rollouts")
async def rollout_list(request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("rollouts:list"))
                       ) -> Response:
    """Every phased rollout of the product, live ones first."""
    rows = await rollouts.list_rollouts(pc.db, pc.product)
    rows.sort(key=lambda r: (r.state not in ("active", "paused"), -r.id))
    return await page(request, "firmware/rollouts.html", product=pc.product, role=pc.role,
                      title=f"Rollouts · {pc.product.name}", section="firmware", rollouts=rows,
                      base=_base(pc))


async def _rollout_page(request: Request, pc: ProductCtx, rollout_id: str, *,
                        status: int = 200, errors: FormErrors | None = None) -> Response:
    r = await rollouts.get_rollout(pc.db, pc.product, rollout_id)
    progress = await rollouts.progress(pc.db, pc.product, r)
    return await page(request, "firmware/rollout.html", status=status, product=pc.product,
                      role=pc.role, title=f"Rollout #{r.id} · {pc.product.name}",
                      section="firmware", r=r, progress=progress, errors=errors or FormErrors(),
                      base=_base(pc))


@router.get("/console/products/{product}/rollouts/{rollout_id}", summary="A rollout")
async def rollout_page(rollout_id: str, request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("rollouts:list"))
                       ) -> Response:
    """Its share, state (and why), and progress: targeted, updated, failed, pending."""
    return await _rollout_page(request, pc, rollout_id)


@router.get("/console/products/{product}/rollouts/{rollout_id}/progress",
            summary="A rollout's progress (JSON)")
async def rollout_progress(rollout_id: str,
                           pc: ProductCtx = Depends(ConsoleProductGuard("rollouts:list"))
                           ) -> Response:
    """What the page shows, for its script to refresh live."""
    r = await rollouts.get_rollout(pc.db, pc.product, rollout_id)
    return JSONResponse({"rollout": rollouts.rollout_json(r),
                         "progress": await rollouts.progress(pc.db, pc.product, r)},
                        headers={"Cache-Control": "no-store"})


@router.post("/console/products/{product}/rollouts/{rollout_id}/grow", summary="Grow")
async def grow(rollout_id: str, request: Request,
               pc: ProductCtx = Depends(ConsoleProductGuard("rollouts:manage"))) -> Response:
    """Raise the share (a rollout only grows) or change its failure threshold."""
    form = await read_form(request)
    r = await rollouts.get_rollout(pc.db, pc.product, rollout_id)
    body: dict[str, Any] = {}
    amount = text(form, "amount").strip()
    if amount:
        body["count" if r.count is not None else "percent"] = amount
    if text(form, "failure_threshold_percent").strip() or "failure_threshold_percent" in form:
        body["failure_threshold_percent"] = text(form, "failure_threshold_percent").strip()

    async def go() -> Any:
        if not body:
            raise BadRequest("Enter a new share", field="amount")
        return await rollouts.change(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                     product=pc.product, rollout=r,
                                     req=from_body(RolloutShares, body))

    done, errors = await attempt(pc.db, ("amount", "percent", "count",
                                         "failure_threshold_percent"), go)
    for key in ("percent", "count"):
        if key in errors.fields:
            errors.fields["amount"] = errors.fields.pop(key)
    if done is None:
        return await _rollout_page(request, pc, rollout_id, status=400, errors=errors)
    return redirect(f"{_base(pc)}/rollouts/{rollout_id}", flash="Rollout changed.")


async def _transition(request: Request, pc: ProductCtx, rollout_id: str,
                      action: str) -> Response:
    form = await read_form(request)
    r = await rollouts.get_rollout(pc.db, pc.product, rollout_id)
    reason = text(form, "reason").strip() or None
    done, errors = await attempt(pc.db, ("reason",), lambda: rollouts.act(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, rollout=r, action=action,
        reason=reason))
    if done is None:
        return await _rollout_page(request, pc, rollout_id, status=400, errors=errors)
    words = {"pause": "paused", "resume": "resumed", "abort": "aborted"}
    return redirect(f"{_base(pc)}/rollouts/{rollout_id}", flash=f"Rollout {words[action]}.")


@router.post("/console/products/{product}/rollouts/{rollout_id}/pause", summary="Pause")
async def pause(rollout_id: str, request: Request,
                pc: ProductCtx = Depends(ConsoleProductGuard("rollouts:manage"))) -> Response:
    """Hold the rollout: no new update starts."""
    return await _transition(request, pc, rollout_id, "pause")


@router.post("/console/products/{product}/rollouts/{rollout_id}/resume", summary="Resume")
async def resume(rollout_id: str, request: Request,
                 pc: ProductCtx = Depends(ConsoleProductGuard("rollouts:manage"))) -> Response:
    """Carry on (also after an automatic pause)."""
    return await _transition(request, pc, rollout_id, "resume")


@router.post("/console/products/{product}/rollouts/{rollout_id}/abort", summary="Abort")
async def abort(rollout_id: str, request: Request,
                pc: ProductCtx = Depends(ConsoleProductGuard("rollouts:manage"))) -> Response:
    """Stop for good: no device that does not run the version yet gets it."""
    return await _transition(request, pc, rollout_id, "abort")


# --- signing keys ------------------------------------------------------------------------------

async def _keys_page(request: Request, pc: ProductCtx, *, status: int = 200,
                     errors: FormErrors | None = None) -> Response:
    keys = await service.list_keys(pc.db, pc.product)
    return await page(request, "firmware/keys.html", status=status, product=pc.product,
                      role=pc.role, title=f"Signing keys · {pc.product.name}",
                      section="signing", keys=[service.key_json(k) for k in keys],
                      errors=errors or FormErrors(), base=_base(pc))


@router.get("/console/products/{product}/signing-keys", summary="Signing keys")
async def keys(request: Request,
               pc: ProductCtx = Depends(ConsoleProductGuard("firmware:list"))) -> Response:
    """The product's Ed25519 firmware signing keys."""
    return await _keys_page(request, pc)


@router.post("/console/products/{product}/signing-keys", summary="Add a signing key")
async def add_key(request: Request,
                  pc: ProductCtx = Depends(ConsoleProductGuard("products.settings:update"))
                  ) -> Response:
    """Generate a key pair (corral signs uploads), or register an uploader's public key."""
    form = await read_form(request)
    body = {k: text(form, k).strip() for k in ("name", "public_key") if text(form, k).strip()}
    key, errors = await attempt(pc.db, ("name", "public_key"), lambda: service.create_key(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
        req=from_body(SigningKeyCreate, body)))
    if key is None:
        return await _keys_page(request, pc, status=400, errors=errors)
    return redirect(f"{_base(pc)}/signing-keys", flash=f"Signing key {key.key_id} added.")


@router.post("/console/products/{product}/signing-keys/{key_id}/revoke", summary="Revoke a key")
async def revoke_key(key_id: str, request: Request,
                     pc: ProductCtx = Depends(ConsoleProductGuard("products.settings:update"))
                     ) -> Response:
    """The key signs and verifies no new uploads; its private half is erased."""
    await read_form(request)
    _, errors = await attempt(pc.db, (), lambda: service.revoke_key(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, key_id=key_id))
    if errors:
        return await _keys_page(request, pc, status=400, errors=errors)
    return redirect(f"{_base(pc)}/signing-keys", flash=f"Signing key {key_id} revoked.")
