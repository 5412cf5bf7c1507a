"""The console's cookie session, CSRF protection and guards.

A console session is an ordinary access token (``accounts.service``), issued through the
same password check and login lockout as ``/oauth/token`` with the client
``corral-console``, and kept in an HttpOnly, SameSite=Lax cookie (``Secure`` when the
request came over HTTPS). Only tokens of that client are accepted from the cookie, and the
cookie is never accepted by ``/v1``.

CSRF: every state-changing console request carries a ``csrf_token`` form field. Signed in,
the token is derived from the session token (an attacker who cannot read the HttpOnly cookie
cannot compute it); signed out (sign-in and sign-up forms), it must match a random
``corral_csrf`` cookie. A request whose ``Origin`` names another site is refused outright.

The console guards are the ``/v1`` guards (:class:`ProductGuard`, :class:`OrgGuard`,
:class:`DeviceGuard`) with the console's context: the policy is the same code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response

from corral.auth.deps import Ctx, Db, client_ip
from corral.auth.subject import Subject, resolve_token
from corral.db.session import REQUEST_STATE, get_db
from corral.devices.access import DeviceGuard
from corral.kit.errors import CorralError, Forbidden, Unauthorized
from corral.orgs.access import OrgGuard
from corral.products.access import ProductGuard

CONSOLE_CLIENT = "corral-console"
SESSION_COOKIE = "corral_session"
CSRF_COOKIE = "corral_csrf"
CSRF_FIELD = "csrf_token"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REQUEST_STATE.add("console")  # request.state.console: dropped as the route ends


class SignInRequired(CorralError):
    """Sign in to continue."""

    status = 401
    code = "sign_in_required"


def is_https(request: Request) -> bool:
    if request.url.scheme == "https":
        return True
    public = request.app.state.settings.public_url or ""
    return public.startswith("https://")


def set_session_cookie(request: Request, response: Response, token: str, max_age: int) -> None:
    response.set_cookie(SESSION_COOKIE, token, max_age=max_age, path="/", httponly=True,
                        samesite="lax", secure=is_https(request))


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                           secure=is_https(request))


def session_token(request: Request) -> str | None:
    token = request.cookies.get(SESSION_COOKIE)
    return token if token and len(token) <= 100 else None


async def console_ctx(request: Request, db: Db) -> Ctx:
    """The request's context with the signed-in subject (None when signed out). Kept on
    ``request.state`` while the route runs (the layout shows who is signed in), and made
    once per request (the console's guards call :func:`signed_in_context` themselves). The
    route's end drops it (:data:`~corral.db.session.REQUEST_STATE`): the context refers to
    the request, so kept it would leave the request's graph in a cycle; an error page makes
    its own (:func:`corral.console.errors.render_error`)."""
    made: Ctx | None = getattr(request.state, "console", None)
    if made is not None and made.db is db:  # an error page passes a fresh session: a new one
        return made
    subject: Subject | None = None
    token = session_token(request)
    if token:
        try:
            found = await resolve_token(db, token)
        except Unauthorized:  # expired or revoked: signed out
            found = None
        if found is not None and found.client == CONSOLE_CLIENT:
            subject = found
    ctx = Ctx(db=db, settings=request.app.state.settings, ip=client_ip(request),
              subject=subject, request=request)
    request.state.console = ctx
    return ctx


async def signed_in(ctx: Annotated[Ctx, Depends(console_ctx)]) -> Ctx:
    """The context of a signed-in console user or customer; otherwise the sign-in page."""
    if ctx.subject is None:
        raise SignInRequired()
    return ctx


async def signed_in_context(request: Request) -> Ctx:
    """:func:`signed_in`, called rather than depended on (the console's guards)."""
    return await signed_in(await console_ctx(request, await get_db(request)))


ConsoleCtx = Annotated[Ctx, Depends(console_ctx)]
SignedIn = Annotated[Ctx, Depends(signed_in)]


# --- CSRF -----------------------------------------------------------------------------------

def csrf_for_session(token: str) -> str:
    return hashlib.sha256(f"corral-console-csrf:{token}".encode()).hexdigest()


def csrf_token(request: Request) -> str:
    """The token forms of this page carry (see the module docstring)."""
    token = session_token(request)
    ctx = getattr(request.state, "console", None)
    if token and ctx is not None and ctx.subject is not None:
        return csrf_for_session(token)
    pre = request.cookies.get(CSRF_COOKIE)
    if not pre or len(pre) != 32:
        pre = getattr(request.state, "new_csrf_cookie", None) or secrets.token_hex(16)
        request.state.new_csrf_cookie = pre  # the response sets it (render.page)
    return pre


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    o = urlsplit(origin)
    host = request.headers.get("host", "")
    return o.netloc == host


async def check_csrf(request: Request) -> None:
    """Router dependency: refuse a state-changing request without a valid token."""
    if request.method not in UNSAFE:
        return
    if not _same_origin(request):
        raise Forbidden("This form was sent from another site", code="csrf_failed")
    limits = request.app.state.settings
    # the first read of the form: uploads (device IDs, firmware) may be large parts
    form = await request.form(max_part_size=max(limits.max_import_bytes,
                                                limits.firmware_max_bytes) + 1024,
                              max_files=4)
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not sent:
        raise Forbidden("The form has expired; reload the page and try again",
                        code="csrf_failed")
    token = session_token(request)
    if token:
        if hmac.compare_digest(sent, csrf_for_session(token)):
            return
    pre = request.cookies.get(CSRF_COOKIE)
    if pre and hmac.compare_digest(sent, pre):
        return
    raise Forbidden("The form has expired; reload the page and try again", code="csrf_failed")


# --- guards ---------------------------------------------------------------------------------

class _SignedIn:
    """A guard judging the console's signed-in user (the session cookie's subject) instead of
    an API caller: put first among a console guard's bases."""

    async def context(self, request: Request) -> Ctx:
        return await signed_in_context(request)


class ConsoleProductGuard(_SignedIn, ProductGuard):
    """:class:`ProductGuard` for console pages."""


class ConsoleOrgGuard(_SignedIn, OrgGuard):
    """:class:`OrgGuard` for console pages."""


class ConsoleDeviceGuard(_SignedIn, DeviceGuard):
    """:class:`DeviceGuard` for console pages (owners, customers and product members)."""


def safe_next(value: str | None) -> str:
    """A local console path to return to after signing in; anything else goes home."""
    if value and value.startswith("/console") and not value.startswith("//") \
            and "\\" not in value and len(value) < 500:
        return value
    return "/console/"
