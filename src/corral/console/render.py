"""Rendering console pages: the Jinja2 environment, the layout's facts, flashes, redirects.

Templates never touch the database: a view gathers what its page shows (through the domain
services) and hands it over; :func:`page` adds what the layout needs (who is signed in, the
organization switcher, the current organization and product, the caller's role for
``can()``, the CSRF token, a flash message).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from corral.auth.policy import Role, role_allows
from corral.console.nav import ORG_NAV, PRODUCT_NAV
from corral.kit import clock
from corral.orgs.models import Organization
from corral.products.models import Product

HERE = Path(__file__).parent
STATIC = HERE / "static"
FLASH_COOKIE = "corral_flash"
# pages: never cached (they show secrets once and per-user data); no inline script or style
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; "
                                "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def _static_versions() -> dict[str, str]:
    """``name -> short content hash``: static URLs change when a file does (cached a year)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:10]
            for p in STATIC.iterdir() if p.is_file()}


_VERSIONS = _static_versions()


def static_url(name: str) -> str:
    return f"/console/static/{name}?v={_VERSIONS.get(name, '0')}"


# --- filters --------------------------------------------------------------------------------

def ago(when: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """"3 min ago", "2 h ago", "5 d ago"; "never" for None."""
    if when is None:
        return "never"
    when = clock.aware(when) or when
    seconds = int(((now or clock.now()) - when).total_seconds())
    if seconds < 0:
        return "just now"
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def when(value: dt.datetime | None) -> str:
    """UTC, to the minute: ``2025-01-31 14:05 UTC``."""
    if value is None:
        return "—"
    value = clock.aware(value) or value
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def when_s(value: dt.datetime | None) -> str:
    """UTC to the second (logs)."""
    if value is None:
        return "—"
    value = clock.aware(value) or value
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso(value: dt.datetime | None) -> str:
    return clock.iso(value) or ""


def number(value: int | float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def money(cents: int | None, currency: str = "usd") -> str:
    if cents is None:
        return "—"
    sign = "-" if cents < 0 else ""
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency.lower(), "")
    amount = f"{abs(cents) / 100:,.2f}"
    return f"{sign}{symbol}{amount}" if symbol else f"{sign}{amount} {currency.upper()}"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(HERE / "templates")),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True, auto_reload=False,
)
ENV.filters.update(ago=ago, when=when, when_s=when_s, iso=iso, number=number, money=money)
ENV.globals.update(static=static_url, quote=quote, product_nav=PRODUCT_NAV, org_nav=ORG_NAV)


# --- the layout -----------------------------------------------------------------------------

@dataclass
class Layout:
    """What every signed-in page's frame shows."""

    me: str | None = None
    kind: str | None = None  # user | customer
    orgs: list[tuple[Organization, Role]] = field(default_factory=list)
    shut: dict[int, str] = field(default_factory=dict)  # org id -> locked | inactive
    invitations: int = 0


async def layout_for(request: Request) -> Layout:
    from corral.billing import locks
    from corral.orgs import service as orgs

    ctx = getattr(request.state, "console", None)
    if ctx is None or ctx.subject is None:
        return Layout()
    me = ctx.subject
    if me.kind != "user":
        return Layout(me=me.label, kind=me.kind)
    mine = await orgs.list_orgs(ctx.db, actor=me)
    shut = await locks.shut_statuses(ctx.db, (o.id for o, _ in mine))
    pending = await orgs.user_invitations(ctx.db, actor=me)
    return Layout(me=me.label, kind=me.kind, orgs=mine, shut=shut, invitations=len(pending))


def take_flash(request: Request) -> str | None:
    raw = request.cookies.get(FLASH_COOKIE)
    return unquote(raw)[:500] if raw else None


async def page(request: Request, template: str, *, status: int = 200,
               org: Organization | None = None, product: Product | None = None,
               role: Role | None = None, title: str = "", section: str = "",
               headers: Mapping[str, str] | None = None, **data: Any) -> HTMLResponse:
    """Render ``template`` inside the layout. ``section`` names the active navigation item;
    ``role`` (the caller's role in ``org``/``product``) drives ``can(permission)``."""
    from corral.console.session import CSRF_COOKIE, csrf_token

    ctx = getattr(request.state, "console", None)
    if product is not None and org is None and ctx is not None:
        org = await ctx.db.get(Organization, product.org_id)
    layout = await layout_for(request)

    def can(permission: str) -> bool:
        return role is not None and role_allows(role, permission)

    flash = take_flash(request)
    # not the request itself: Jinja's rendering leaves its context in cycles, and a request
    # named there would wait for the garbage collector with it (tests/test_request_garbage)
    html = ENV.get_template(template).render(
        layout=layout, org=org, product=product, role=role, title=title,
        section=section, can=can, csrf=csrf_token(request), flash=flash,
        path=request.url.path, now=clock.now(), **data)
    response = HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})
    if flash:
        response.delete_cookie(FLASH_COOKIE, path="/")
    new_csrf = getattr(request.state, "new_csrf_cookie", None)
    if new_csrf:
        from corral.console.session import is_https

        response.set_cookie(CSRF_COOKIE, new_csrf, path="/console", httponly=True,
                            samesite="strict", secure=is_https(request))
    return response


def redirect(url: str, *, flash: str | None = None) -> Response:
    """303 to ``url`` (after a form), optionally with a one-time message for the next page."""
    response = RedirectResponse(url, status_code=303)
    if flash:
        response.set_cookie(FLASH_COOKIE, quote(flash[:300]), path="/", httponly=True,
                            samesite="lax", max_age=60)
    return response
