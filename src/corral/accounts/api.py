"""/oauth/token, /v1/users, /v1/user and /v1/access_tokens (Particle wire format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from corral.accounts import service
from corral.accounts.schemas import (
    AccessTokenInfo,
    CurrentToken,
    MessageAnswer,
    PasswordConfirm,
    SignUp,
    TokenAnswer,
    TokenRequest,
    UserAnswer,
    UserChange,
)
from corral.auth.deps import AuthCtx, PublicCtx, auth_ctx, basic_credentials
from corral.auth.models import AccessToken
from corral.auth.policy import api_users_not_allowed
from corral.auth.subject import Subject
from corral.db.session import TransactionRoute
from corral.kit import clock
from corral.kit.body import body, check_no_nul, describe_errors, documented_body
from corral.kit.errors import NotFound, OAuthError
from corral.kit.responses import NO_STORE, OkAnswer, answers, ok

router = APIRouter(tags=["accounts"], route_class=TransactionRoute)


def _person(me: Subject) -> Subject:
    if me.kind != "user":
        raise api_users_not_allowed()
    return me


@router.post("/oauth/token", summary="Create an access token (OAuth 2)",
             responses=answers(TokenAnswer, 429),
             dependencies=[Depends(documented_body(TokenRequest, media=(
                 "application/x-www-form-urlencoded",)))])
async def create_token(request: Request, ctx: PublicCtx) -> JSONResponse:
    """Issue a token: password, refresh_token or client_credentials grant (form-encoded)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise OAuthError("Method must be POST with application/x-www-form-urlencoded encoding")
    await service.check_lockout(ctx.db, ctx.ip)  # before reading the form
    form = await request.form()
    f = {k: v for k, v in form.items() if isinstance(v, str)}
    check_no_nul(f)
    grant = f.get("grant_type")
    basic_id, basic_secret = basic_credentials(request)
    client_id = basic_id if basic_id is not None else f.get("client_id")
    client_secret = basic_secret if basic_id is not None else f.get("client_secret")
    if grant not in ("password", "refresh_token", "client_credentials"):
        raise OAuthError("Invalid or missing grant_type parameter")
    try:  # OAuth's error shape, not /v1's
        TokenRequest.model_validate(f)
    except ValidationError as exc:
        raise OAuthError(describe_errors(exc)) from None
    expires_at = service.parse_lifetime(ctx.settings, f.get("expires_in"), f.get("expires_at"))
    async with service.login_attempt(ctx.db, request.app.state.sessionmaker, ctx.settings,
                                     ctx.ip):
        oauth_client = await service.authenticate_client(
            ctx.db, client_id, client_secret, required=grant == "client_credentials")
        if grant == "password":
            issued = await service.password_grant(
                ctx.db, ctx.settings, username=f.get("username"), password=f.get("password"),
                client=client_id or "", oauth_client=oauth_client, expires_at=expires_at, ip=ctx.ip)
        elif grant == "refresh_token":
            issued = await service.refresh_grant(ctx.db, ctx.settings,
                                                 refresh_token=f.get("refresh_token"),
                                                 client=client_id or "", ip=ctx.ip)
        else:
            assert oauth_client is not None
            issued = await service.client_credentials_grant(
                ctx.db, ctx.settings, oauth_client=oauth_client, scope=f.get("scope"),
                expires_at=expires_at, ip=ctx.ip)
    return JSONResponse(issued.body(), headers=NO_STORE)


@router.post("/v1/users", summary="Sign up", responses=answers(OkAnswer))
async def sign_up(ctx: PublicCtx, req: SignUp = body(SignUp)) -> dict[str, Any]:
    """Create an account with `username` (e-mail) and `password` (and optional `account_info`)."""
    info = req.account_info.model_dump(exclude_unset=True) if req.account_info else None
    await service.create_user(ctx.db, ctx.settings, username=req.username,
                              password=req.password, account_info=info, ip=ctx.ip)
    return ok()


@router.get("/v1/user", summary="Get the current user", responses=answers(UserAnswer))
async def get_user(ctx: AuthCtx) -> dict[str, Any]:
    """The calling user's profile and organizations."""
    rows = await service.profile(ctx.db, _person(ctx.me).user_id)
    username, first_name, last_name, business, no_password = rows[0][:5]
    return {
        "username": username,
        "subscription_ids": [],
        "account_info": {"first_name": first_name, "last_name": last_name,
                         "business_account": business},
        "mfa": {"enabled": False},
        "scim_provisioned": False,
        "no_password": bool(no_password),
        "wifi_device_count": 0,
        "cellular_device_count": 0,
        "orgs": [{"id": org_id, "name": name, "slug": slug, "personal": personal,
                  "subscription": None if plan is None else {"plan": str(plan),
                                                             "status": str(status)}}
                 for *_user, org_id, name, slug, personal, plan, status in rows
                 if org_id is not None],
    }


@router.put("/v1/user", summary="Update the current user", responses=answers(MessageAnswer))
async def put_user(ctx: AuthCtx, req: UserChange = body(UserChange)) -> dict[str, Any]:
    """Change `account_info`, or `username`/`password` with `current_password`."""
    me = _person(ctx.me)
    message = await service.update_user(ctx.db, ctx.settings, me, req, ctx.ip)
    return ok(message=message)


@router.delete("/v1/user", summary="Delete the current user",
               responses=answers(MessageAnswer, 409))
async def delete_user(ctx: AuthCtx, req: PasswordConfirm = body(PasswordConfirm)) -> dict[str, Any]:
    """Delete the account; needs `password`."""
    me = _person(ctx.me)
    await service.delete_user(ctx.db, me, req.password, ctx.ip)
    return ok(message="User's account has been deleted.")


def _token_json(t: AccessToken, current_id: int | None) -> dict[str, Any]:
    return {"id": t.public_id, "client": t.client, "expires_at": clock.iso(t.expires_at),
            "created_at": clock.iso(t.created_at), "scopes": list(t.scopes or []),
            "current": t.id == current_id}


@router.get("/v1/access_tokens", summary="List my access tokens",
            responses=answers(list[AccessTokenInfo]))
async def list_tokens(ctx: AuthCtx) -> list[dict[str, Any]]:
    """Tokens of the calling user (values are never shown again; `id` identifies them)."""
    me = _person(ctx.me)
    return [_token_json(t, me.token_id) for t in await service.list_tokens(ctx.db, me.user_id or 0)]


@router.get("/v1/access_tokens/current", summary="Describe the token in use",
            responses=answers(CurrentToken))
async def current_token(ctx: AuthCtx) -> dict[str, Any]:
    """Expiry, client and scopes of the presented token."""
    me = ctx.me
    row = await ctx.db.get(AccessToken, me.token_id)
    assert row is not None
    orgs = await service.user_orgs(ctx.db, me.user_id) if me.kind == "user" and me.user_id else []
    return {"expires_at": clock.iso(row.expires_at), "client": row.client,
            "scopes": list(me.scopes), "orgs": [o.slug for o in orgs]}


@router.delete("/v1/access_tokens/current", summary="Revoke the token in use (log out)",
               responses=answers(OkAnswer))
async def revoke_current(ctx: AuthCtx) -> dict[str, Any]:
    """Revoke the presented token."""
    row = await ctx.db.get(AccessToken, ctx.me.token_id)
    if row is not None:
        await ctx.db.delete(row)
    return ok()


@router.delete("/v1/access_tokens", summary="Revoke all my tokens", responses=answers(OkAnswer))
async def revoke_all(ctx: AuthCtx) -> dict[str, Any]:
    """Revoke every token of the calling user, including this one."""
    me = _person(ctx.me)
    await service.revoke_all(ctx.db, me.user_id or 0)
    return ok()


@router.delete("/v1/access_tokens/{token}", summary="Revoke a token",
               responses=answers(OkAnswer, 401, 403))
async def revoke_token(token: str, request: Request, ctx: PublicCtx) -> Response:
    """Revoke by the token's value (no other credential needed: holding it is proof), or by
    its `id` from the token list (then a bearer token of the same user is required)."""
    if len(token) == 40 and all(c in "0123456789abcdef" for c in token.lower()):
        if await service.revoke_by_value(ctx.db, token.lower()) is None:
            raise NotFound("Token not found")
        return JSONResponse(ok())
    ctx = await auth_ctx(request)  # the same session as the public context's
    me = _person(ctx.me)
    if await service.revoke_by_id(ctx.db, me, token) is None:
        raise NotFound("Token not found")
    return JSONResponse(ok())
