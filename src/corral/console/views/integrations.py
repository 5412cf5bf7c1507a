"""Integrations of a product, an organization and the personal sandbox (the signed-in
user's own devices, Particle's ``/v1/integrations``): the list, create (with a preview of the
request a sample event makes), one integration's page (settings with secrets masked, test,
enable/disable, the delivery log with redeliver, the success/failure/skipped chart), delete.

The same views serve the three places: :func:`register` adds them under a base path with the
place's guard, as ``corral.integrations.api.register`` does for ``/v1``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.auth.deps import Ctx
from corral.console.forms import FormErrors, attempt, checked, read_form, text
from corral.console.nav import NavItem, add_org_page, add_product_page
from corral.console.render import page, redirect
from corral.console.session import ConsoleOrgGuard, ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.integrations import schemas, sender, service, templates
from corral.integrations.guard import Policy
from corral.integrations.service import Scope
from corral.kit import clock
from corral.kit.errors import BadRequest
from corral.kit.ids import INT64_MAX, path_id
from corral.kit.text import strict_loads
from corral.orgs.access import OrgCtx
from corral.products.access import ProductCtx

router = APIRouter(route_class=TransactionRoute)
add_product_page(NavItem("integrations", "Integrations", "/integrations", "integrations:list",
                         "plug"))
add_org_page(NavItem("integrations", "Integrations", "/integrations", "integrations:list",
                     "plug"))

FIELDS = ("integration_type", "name", "event", "url", "requestType", "format", "template",
          "headers", "topic", "qos", "verify", "sample")
FORMATS = [("default", "Default data (form, or query for GET)"), ("json", "JSON template"),
           ("body", "Custom body template")]
TYPES = [("Webhook", "Webhook (HTTP)"), ("MQTT", "MQTT forwarding")]
METHODS = [(m, m) for m in schemas.METHODS]
SAMPLE = '{"temp": 21.5}'
MAX_REDELIVER_HOURS = 24 * 366 * 10  # "failed in the last N hours": ten years is every one


@dataclass
class Place:
    """Whose integrations a page shows: the scope, its console URL, what the layout needs
    (``product`` or ``org``, and the caller's ``role``) and how the page names it."""

    ctx: Ctx
    scope: Scope
    base: str
    whose: str  # "Demo Product's", "your sandbox's"
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self) -> Any:
        return self.ctx.db


def product_place(permission: str) -> Callable[..., Awaitable[Place]]:
    async def dep(pc: ProductCtx = Depends(ConsoleProductGuard(permission))) -> Place:
        return Place(pc.ctx, Scope(product_id=pc.product.id),
                     f"/console/products/{pc.product.slug}/integrations",
                     f"{pc.product.name}'s", {"product": pc.product, "role": pc.role})

    return dep


def org_place(permission: str) -> Callable[..., Awaitable[Place]]:
    """An organization's integrations; in the personal sandbox, its owner's own (the events
    of their devices, ``/v1/integrations``)."""

    async def dep(oc: OrgCtx = Depends(ConsoleOrgGuard(permission))) -> Place:
        base = f"/console/orgs/{oc.org.slug}/integrations"
        layout = {"org": oc.org, "role": oc.role}
        if oc.org.personal and oc.org.owner_user_id is not None:
            return Place(oc.ctx, Scope(owner_user_id=oc.org.owner_user_id), base,
                         "your sandbox's devices'", layout)
        return Place(oc.ctx, Scope(org_id=oc.org.id), base, f"{oc.org.name}'s products'",
                     layout)

    return dep


def _worker(request: Request) -> Any:
    return request.app.state.runtime.integrations


def _policy(request: Request, place: Place) -> Policy:
    worker = _worker(request)
    return worker.policy if worker is not None else Policy(
        place.ctx.settings.integrations_allow_hosts)


def _blank_form() -> dict[str, Any]:
    return {"integration_type": "Webhook", "name": "", "event": "", "url": "",
            "requestType": "POST", "format": "default", "template": "", "headers": "",
            "topic": schemas.DEFAULT_MQTT_TOPIC, "qos": "1", "verify": True,
            "sample": SAMPLE}


def _form_of(form: dict[str, Any]) -> dict[str, Any]:
    out = {k: text(form, k) for k in FIELDS if k != "verify"}
    out["verify"] = checked(form, "verify")
    return out


def _config(f: dict[str, Any]) -> dict[str, Any]:
    """The form as Particle's integration fields."""
    body: dict[str, Any] = {"integration_type": f["integration_type"], "event": f["event"],
                            "url": f["url"], "name": f["name"] or None,
                            "rejectUnauthorized": f["verify"]}
    if f["integration_type"] == schemas.MQTT:
        body.update({"topic": f["topic"] or schemas.DEFAULT_MQTT_TOPIC, "qos": f["qos"] or "1"})
        if f["template"].strip():
            body["payload"] = f["template"]
        return body
    body["requestType"] = f["requestType"]
    if f["format"] == "json" and f["template"].strip():
        body["json"] = f["template"]
    elif f["format"] == "body" and f["template"].strip():
        body["body"] = f["template"]
    if f["headers"].strip():
        try:  # strict, as /v1's JSON bodies: no NaN/Infinity; too deep is not JSON either
            headers = strict_loads(f["headers"])
        except ValueError:
            raise BadRequest("headers must be a JSON object of names to values",
                             field="headers") from None
        body["headers"] = headers
    return body


async def _list_page(request: Request, place: Place, *, form: dict[str, Any],
                     errors: FormErrors, preview: str | None = None,
                     status: int = 200) -> Response:
    rows = await service.list_for(place.db, place.scope)
    s = place.ctx.settings
    items = [{**service.list_json(r), "status": service.status_of(
        r, s.integrations_throttle_after)} for r in rows]
    name = place.layout.get("product") or place.layout.get("org")
    title = "Integrations" + (f" · {name.name}" if name is not None else "")
    return await page(request, "integrations/list.html", status=status, title=title,
                      section="integrations", items=items, form=form, errors=errors,
                      preview=preview, types=TYPES, methods=METHODS, formats=FORMATS,
                      base=place.base, whose=place.whose, **place.layout)


async def _preview(request: Request, place: Place) -> Response:
    f = _form_of(await read_form(request))
    try:
        config = schemas.parse_config(_config(f))
    except BadRequest as exc:
        from corral.console.forms import errors_from

        return await _list_page(request, place, form=f, errors=errors_from(exc, FIELDS),
                                status=400)
    facts = templates.EventFacts(
        event_id=1, name=f["event"] or "sample", data=f["sample"] or None,
        published_at=clock.iso(clock.now()) or "", device_id="0123456789abcdef01234567",
        product_id=place.scope.product_id)
    settings = config.settings()
    try:
        if isinstance(config, schemas.MqttConfig):
            ctx = facts.context()
            payload = (templates.render(settings["payload"], ctx) if settings.get("payload")
                       else json.dumps(facts.defaults()))
            shown = (f"PUBLISH {settings['url']}\ntopic: "
                     f"{templates.render(settings['topic'], ctx)}\nqos: {settings['qos']}"
                     f"\n\n{payload}")
        else:
            # describe_request masks the secrets it shows
            shown = sender.describe_request(sender.build(
                settings, facts, integration_id="preview", secret="whsec_cHJldmlldw=="))
    except templates.TemplateError as exc:
        return await _list_page(request, place, form=f, status=400, errors=FormErrors(
            fields={"template": str(exc)}))
    return await _list_page(request, place, form=f, errors=FormErrors(), preview=shown)


async def _create(request: Request, place: Place) -> Response:
    f = _form_of(await read_form(request))

    async def go() -> Any:
        return await service.create(place.db, place.scope, _config(f), actor=place.ctx.me,
                                    ip=place.ctx.ip, policy=_policy(request, place))

    row, errors = await attempt(place.db, FIELDS, go)
    if row is None:
        return await _list_page(request, place, form=f, errors=errors, status=400)
    return redirect(f"{place.base}/{row.id}", flash=(
        f"Integration created. Its signing secret (shown once): {row.signing_secret}"))


def _chart(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """Bars of success / failure / skipped per bucket, for a server-rendered SVG."""
    top = max([b.get("success", 0) + b.get("failure", 0) + b.get("sleep", 0)
               for b in buckets] + [1])
    width, height = 24 * len(buckets), 120
    bars = []
    for i, b in enumerate(buckets):
        y = float(height)
        for key in ("success", "failure", "sleep"):
            n = b.get(key, 0)
            h = height * n / top
            if n:
                y -= h
                bars.append({"x": i * 24 + 4, "y": round(y, 1), "h": round(h, 1), "kind": key,
                             "title": f"{b['time']}: {n} {key}"})
    totals = {k: sum(b.get(k, 0) for b in buckets) for k in ("success", "failure", "sleep")}
    return {"width": width, "height": height, "bars": bars, "top": top, "totals": totals,
            "first": buckets[0]["time"] if buckets else "", "last":
            buckets[-1]["time"] if buckets else ""}


async def _detail(request: Request, place: Place, integration_id: str) -> Response:
    row = await service.get(place.db, place.scope, integration_id)
    s = place.ctx.settings
    shown = service.to_json(row, public_url=s.resolved_public_url(),
                            throttle_after=s.integrations_throttle_after)
    log = [service.attempt_json(a) for a in await service.attempts(place.db, row.id, limit=50)]
    end = clock.now()
    buckets = await service.metrics(place.db, place.scope.product_id,
                                    start=end - dt.timedelta(hours=23), end=end,
                                    bucket_size=3600, integration_id=row.id)
    config = {k: v for k, v in shown.items() if k not in (
        "id", "created_at", "updated_at", "status", "disabled_reason", "consecutive_failures",
        "last_success_at", "last_failure_at", "hookUrl", "product_id")}
    return await page(request, "integrations/detail.html",
                      title=f"{row.name or row.id} · Integrations", section="integrations",
                      hook=shown, config=json.dumps(config, indent=2, ensure_ascii=False),
                      log=log, chart=_chart(buckets), base=place.base, **place.layout)


async def _test(request: Request, place: Place, integration_id: str) -> Response:
    form = await read_form(request)
    row = await service.get(place.db, place.scope, integration_id)
    outcome, attempt_row = await _worker(request).test(
        row, data=text(form, "data") or "test-event", device_id=None)
    place.db.add(attempt_row)
    flash = ("Test passed" + (f" (HTTP {outcome.status_code})" if outcome.status_code else "")
             if outcome.ok else f"Test failed: {outcome.error}")
    return redirect(f"{place.base}/{row.id}", flash=flash)


async def _set_enabled(request: Request, place: Place, integration_id: str) -> Response:
    form = await read_form(request)
    row = await service.get(place.db, place.scope, integration_id)
    enable = checked(form, "enabled")
    await service.set_enabled(place.db, row, enable, actor=place.ctx.me, ip=place.ctx.ip)
    return redirect(f"{place.base}/{row.id}",
                    flash="Integration enabled." if enable else "Integration disabled.")


async def _redeliver(request: Request, place: Place, integration_id: str) -> Response:
    form = await read_form(request)
    row = await service.get(place.db, place.scope, integration_id)
    event = text(form, "event_id").strip()
    event_id = path_id(event, hi=INT64_MAX)
    if event_id is not None:
        _, errors = await attempt(place.db, ("event_id",),
                                  lambda: service.redeliver_event(place.db, row, event_id))
        flash = ("; ".join(errors.general + list(errors.fields.values())) if errors
                 else f"Event {event} queued again.")
        return redirect(f"{place.base}/{row.id}", flash=flash)
    hours = text(form, "hours").strip()
    hours_n = path_id(hours, hi=MAX_REDELIVER_HOURS)
    since = clock.now() - dt.timedelta(hours=hours_n) if hours_n else None
    n = await service.redeliver_range(place.db, row, since=since, until=None)
    return redirect(f"{place.base}/{row.id}", flash=f"{n} failed or skipped deliveries queued "
                                                    "again.")


async def _delete(place: Place, integration_id: str) -> Response:
    row = await service.get(place.db, place.scope, integration_id)
    await service.remove(place.db, row, actor=place.ctx.me, ip=place.ctx.ip)
    return redirect(place.base, flash="Integration deleted.")


Placer = Callable[[str], Callable[..., Awaitable[Place]]]


def register(base: str, placer: Placer, label: str) -> None:
    """The integration pages under ``base`` for one kind of place."""

    @router.get(base, summary=f"Integrations ({label})")
    async def integrations_page(request: Request,
                                place: Place = Depends(placer("integrations:list"))
                                ) -> Response:
        """The integrations and the form to add one."""
        return await _list_page(request, place, form=_blank_form(), errors=FormErrors())

    @router.post(base + "/preview", summary=f"Preview an integration's request ({label})")
    async def preview(request: Request,
                      place: Place = Depends(placer("integrations:create"))) -> Response:
        """The request (or MQTT message) the form's settings make for the sample data."""
        return await _preview(request, place)

    @router.post(base, summary=f"Create an integration ({label})")
    async def create(request: Request,
                     place: Place = Depends(placer("integrations:create"))) -> Response:
        """``integrations.service.create`` with the form's settings (as ``POST /v1``)."""
        return await _create(request, place)

    @router.get(base + "/{integration_id}", summary=f"An integration ({label})")
    async def detail(request: Request, integration_id: str,
                     place: Place = Depends(placer("integrations:get"))) -> Response:
        """Settings (secrets masked), health, the delivery log and the last day's chart."""
        return await _detail(request, place, integration_id)

    @router.post(base + "/{integration_id}/test", summary=f"Test an integration ({label})")
    async def test(request: Request, integration_id: str,
                   place: Place = Depends(placer("integrations:test"))) -> Response:
        """Send a test event now; the outcome is the next page's message (and in the log)."""
        return await _test(request, place, integration_id)

    @router.post(base + "/{integration_id}/enabled",
                 summary=f"Enable or disable an integration ({label})")
    async def set_enabled(request: Request, integration_id: str,
                          place: Place = Depends(placer("integrations:update"))) -> Response:
        """``enabled=on`` enables (after corral disabled it too), anything else disables."""
        return await _set_enabled(request, place, integration_id)

    @router.post(base + "/{integration_id}/redeliver", summary=f"Redeliver events ({label})")
    async def redeliver(request: Request, integration_id: str,
                        place: Place = Depends(placer("integrations:update"))) -> Response:
        """One event (``event_id``) again, or every failed or skipped delivery of the last
        ``hours`` hours."""
        return await _redeliver(request, place, integration_id)

    @router.post(base + "/{integration_id}/delete", summary=f"Delete an integration ({label})")
    async def delete(integration_id: str,
                     place: Place = Depends(placer("integrations:remove"))) -> Response:
        """Delete the integration; nothing more is sent for it."""
        return await _delete(place, integration_id)


register("/console/products/{product}/integrations", product_place, "product")
register("/console/orgs/{org}/integrations", org_place, "organization or sandbox")
