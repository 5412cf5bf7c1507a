"""Sign in, sign up, sign out; the invitee's invitations; the account page."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from corral.accounts import service as accounts
from corral.console.forms import FormErrors, attempt, read_form, text
from corral.console.render import page, redirect
from corral.console.session import (
    CONSOLE_CLIENT,
    ConsoleCtx,
    SignedIn,
    clear_session_cookie,
    safe_next,
    session_token,
    set_session_cookie,
)
from corral.db.session import TransactionRoute
from corral.kit import clock
from corral.kit.errors import BadRequest, OAuthError
from corral.orgs import service as orgs
from corral.products.access import get_product

router = APIRouter(route_class=TransactionRoute)

SIGN_IN_FIELDS = ("username", "password", "product")


def _session_lifetime(request: Request) -> int:
    return int(request.app.state.settings.console_session_s)


@router.get("/console/login", summary="Sign-in page")
async def sign_in_page(request: Request, ctx: ConsoleCtx) -> Response:
    """The sign-in form (signed-in visitors go on to the console)."""
    if ctx.subject is not None:
        return redirect(safe_next(request.query_params.get("next")))
    return await page(request, "auth/login.html", title="Sign in", errors=FormErrors(),
                      form={}, next=safe_next(request.query_params.get("next")))


@router.post("/console/login", summary="Sign in")
async def sign_in(request: Request, ctx: ConsoleCtx) -> Response:
    """Check the password (same lockout as ``/oauth/token``) and start a console session."""
    form = await read_form(request)
    username, password = text(form, "username").strip(), text(form, "password")
    product_key = text(form, "product").strip()
    target = safe_next(text(form, "next"))
    lifetime = _session_lifetime(request)
    expires = clock.now() + dt.timedelta(seconds=lifetime)

    async def go() -> accounts.IssuedToken:
        if not username or not password:
            raise OAuthError("Enter your e-mail address and password")
        async with accounts.login_attempt(ctx.db, request.app.state.sessionmaker,
                                          ctx.settings, ctx.ip):
            if product_key:  # a customer of that product
                product = await get_product(ctx.db, product_key)
                issued = None
                if product is not None:
                    issued = await accounts.customer_password_grant(
                        ctx.db, ctx.settings, product_id=product.id, username=username,
                        password=password, client=CONSOLE_CLIENT, oauth_client_id=None,
                        expires_at=expires, ip=ctx.ip)
                if issued is None:
                    raise OAuthError("User credentials are invalid", code="invalid_grant")
                return issued
            return await accounts.password_grant(
                ctx.db, ctx.settings, username=username, password=password,
                client=CONSOLE_CLIENT, oauth_client=None, expires_at=expires, ip=ctx.ip)

    issued, errors = await attempt(ctx.db, SIGN_IN_FIELDS, go)
    if issued is None:
        if errors.general == ["User credentials are invalid"]:
            errors.general = ["The e-mail address or password is not right."]
        return await page(request, "auth/login.html", status=400, title="Sign in",
                          errors=errors, form={"username": username, "product": product_key},
                          next=target)
    if issued.row.customer_id is not None:
        target = "/console/devices"
    response = redirect(target)
    set_session_cookie(request, response, issued.access_token, lifetime)
    return response


@router.get("/console/signup", summary="Sign-up page")
async def sign_up_page(request: Request, ctx: ConsoleCtx) -> Response:
    """The form to create an account."""
    if ctx.subject is not None:
        return redirect("/console/")
    return await page(request, "auth/signup.html", title="Create an account",
                      errors=FormErrors(), form={})


@router.post("/console/signup", summary="Sign up")
async def sign_up(request: Request, ctx: ConsoleCtx) -> Response:
    """Create the account (``/v1/users`` rules), then sign in to it."""
    form = await read_form(request)
    username, password = text(form, "username").strip(), text(form, "password")
    confirm = text(form, "password_confirm")
    lifetime = _session_lifetime(request)

    async def go() -> accounts.IssuedToken:
        if password != confirm:
            raise BadRequest("The two passwords differ", field="password_confirm")
        user = await accounts.create_user(ctx.db, ctx.settings, username=username,
                                          password=password, ip=ctx.ip)
        return accounts.issue_token(
            ctx.db, ctx.settings, user_id=user.id, client=CONSOLE_CLIENT,
            expires_at=clock.now() + dt.timedelta(seconds=lifetime), ip=ctx.ip, refresh=False)

    issued, errors = await attempt(ctx.db, ("username", "password", "password_confirm"), go)
    if issued is None:
        return await page(request, "auth/signup.html", status=400, title="Create an account",
                          errors=errors, form={"username": username})
    response = redirect("/console/", flash="Welcome to corral. This is your personal sandbox.")
    set_session_cookie(request, response, issued.access_token, lifetime)
    return response


@router.post("/console/logout", summary="Sign out")
async def sign_out(request: Request, ctx: ConsoleCtx) -> Response:
    """End the session: its token is revoked, the cookie cleared."""
    token = session_token(request)
    if token and ctx.subject is not None:
        await accounts.revoke_by_value(ctx.db, token)
    response = redirect("/console/login", flash="You are signed out.")
    clear_session_cookie(request, response)
    return response


# --- invitations (the invitee's side) --------------------------------------------------------

async def _invitations_page(request: Request, ctx: Any, *, status: int = 200,
                            errors: FormErrors | None = None) -> Response:
    rows = await orgs.user_invitations(ctx.db, actor=ctx.me)
    items = await orgs.invitations_json(ctx.db, rows)
    return await page(request, "auth/invitations.html", status=status, title="Invitations",
                      invitations=items, errors=errors or FormErrors())


@router.get("/console/invitations", summary="My invitations")
async def invitations(request: Request, ctx: SignedIn) -> Response:
    """Pending invitations addressed to me: accept or decline; or enter a code."""
    if ctx.me.kind != "user":
        return redirect("/console/devices")
    return await _invitations_page(request, ctx)


@router.post("/console/invitations/{invitation_id}/accept", summary="Accept an invitation")
async def accept(invitation_id: int, request: Request, ctx: SignedIn) -> Response:
    """Join the team (``orgs.service.accept_invitation``)."""
    member, errors = await attempt(ctx.db, (), lambda: orgs.accept_invitation(
        ctx.db, actor=ctx.me, invitation_id=invitation_id, ip=ctx.ip))
    if member is None:
        return await _invitations_page(request, ctx, status=400, errors=errors)
    return _joined(member)


def _joined(member: Any) -> Response:
    """After accepting: the team's product or organization."""
    target = (f"/console/products/{member.product_id}" if member.product_id
              else f"/console/orgs/{member.org_id}")
    return redirect(target, flash="Invitation accepted: welcome to the team.")


@router.post("/console/invitations/{invitation_id}/decline", summary="Decline an invitation")
async def decline(invitation_id: int, request: Request, ctx: SignedIn) -> Response:
    """Turn the invitation down."""
    done, errors = await attempt(ctx.db, (), lambda: orgs.decline_invitation(
        ctx.db, actor=ctx.me, invitation_id=invitation_id, ip=ctx.ip))
    if done is None:
        return await _invitations_page(request, ctx, status=400, errors=errors)
    return redirect("/console/invitations", flash="Invitation declined.")


@router.post("/console/invitations/code", summary="Accept an invitation by its code")
async def accept_code(request: Request, ctx: SignedIn) -> Response:
    """Accept with the code from the invitation e-mail."""
    form = await read_form(request)
    code = text(form, "code").strip()

    async def go() -> Any:
        if not code:
            raise BadRequest("code is required", field="code")
        return await orgs.accept_invitation(ctx.db, actor=ctx.me, code=code, ip=ctx.ip)

    member, errors = await attempt(ctx.db, ("code",), go)
    if member is None:
        return await _invitations_page(request, ctx, status=400, errors=errors)
    return _joined(member)
