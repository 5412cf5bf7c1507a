"""/oauth/token, /v1/users, /v1/user and /v1/access_tokens (Particle wire format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from corral.accounts import service
from corral.auth.deps import AnyCtx, AuthCtx, basic_credentials
from corral.auth.models import AccessToken, User
from corral.auth.policy import api_users_not_allowed
from corral.auth.subject import Subject
from corral.kit import clock
from corral.kit.body import check_no_nul, read_body
from corral.kit.errors import NotFound, OAuthError
from corral.kit.responses import NO_STORE, ok

router = APIRouter(tags=["accounts"])


def _person(me: Subject) -> Subject:
    if me.kind != "user":
        raise api_users_not_allowed()
    return me


@router.post("/oauth/token", summary="Create an access token (OAuth 2)")
async def create_token(request: Request, ctx: AnyCtx) -> JSONResponse:
    """Issue a token: password, refresh_token or client_credentials grant (form-encoded)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise OAuthError("Method must be POST with application/x-www-form-urlencoded encoding")
    await service.check_lockout(ctx.db, ctx.ip)
    form = await request.form()
    f = {k: v for k, v in form.items() if isinstance(v, str)}
    check_no_nul(f)
    grant = f.get("grant_type")
    basic_id, basic_secret = basic_credentials(request)
    client_id = basic_id if basic_id is not None else f.get("client_id")
    client_secret = basic_secret if basic_id is not None else f.get("client_secret")
    if grant not in ("password", "refresh_token", "client_credentials"):
        raise OAuthError("Invalid or missing grant_type parameter")
    expires_at = service.parse_lifetime(ctx.settings, f.get("expires_in"), f.get("expires_at"))
    try:
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
    except OAuthError as exc:
        if exc.code in ("invalid_grant", "invalid_client"):
            await service.note_failure(request.app.state.sessionmaker, ctx.settings, ctx.ip)
        raise
    return JSONResponse(issued.body(), headers=NO_STORE)


@router.post("/v1/users", summary="Sign up")
async def sign_up(request: Request, ctx: AnyCtx) -> dict[str, Any]:
    """Create an account with `username` (e-mail) and `password` (and optional `account_info`)."""
    body = await read_body(request)
    info = body.get("account_info")
    if info is not None and not isinstance(info, dict):
        info = None
    await service.create_user(ctx.db, ctx.settings, username=body.get("username"),
                              password=body.get("password"), account_info=info, ip=ctx.ip)
    return ok()


def _user_json(user: User, orgs: list[Any]) -> dict[str, Any]:
    return {
        "username": user.username,
        "subscription_ids": [],
        "account_info": {"first_name": user.first_name, "last_name": user.last_name,
                         "business_account": user.business_account},
        "mfa": {"enabled": False},
        "scim_provisioned": False,
        "no_password": user.password_hash is None,
        "wifi_device_count": 0,
        "cellular_device_count": 0,
        "orgs": [{"id": o.id, "name": o.name, "slug": o.slug, "personal": o.personal} for o in orgs],
    }


@router.get("/v1/user", summary="Get the current user")
async def get_user(ctx: AuthCtx) -> dict[str, Any]:
    """The calling user's profile and organizations."""
    me = _person(ctx.me)
    user = await ctx.db.get(User, me.user_id)
    assert user is not None
    return _user_json(user, await service.user_orgs(ctx.db, user.id))


@router.put("/v1/user", summary="Update the current user")
async def put_user(request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """Change `account_info`, or `username`/`password` with `current_password`."""
    me = _person(ctx.me)
    message = await service.update_user(ctx.db, ctx.settings, me, await read_body(request), ctx.ip)
    return ok(message=message)


@router.delete("/v1/user", summary="Delete the current user")
async def delete_user(request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """Delete the account; needs `password`."""
    me = _person(ctx.me)
    await service.delete_user(ctx.db, me, (await read_body(request)).get("password"), ctx.ip)
    return ok(message="User's account has been deleted.")


def _token_json(t: AccessToken, current_id: int | None) -> dict[str, Any]:
    return {"id": t.public_id, "client": t.client, "expires_at": clock.iso(t.expires_at),
            "created_at": clock.iso(t.created_at), "scopes": list(t.scopes or []),
            "current": t.id == current_id}


@router.get("/v1/access_tokens", summary="List my access tokens")
async def list_tokens(ctx: AuthCtx) -> list[dict[str, Any]]:
    """Tokens of the calling user (values are never shown again; `id` identifies them)."""
    me = _person(ctx.me)
    return [_token_json(t, me.token_id) for t in await service.list_tokens(ctx.db, me.user_id or 0)]


@router.get("/v1/access_tokens/current", summary="Describe the token in use")
async def current_token(ctx: AuthCtx) -> dict[str, Any]:
    """Expiry, client and scopes of the presented token."""
    me = ctx.me
    row = await ctx.db.get(AccessToken, me.token_id)
    assert row is not None
    orgs = await service.user_orgs(ctx.db, me.user_id) if me.kind == "user" and me.user_id else []
    return {"expires_at": clock.iso(row.expires_at), "client": row.client,
            "scopes": list(me.scopes), "orgs": [o.slug for o in orgs]}


@router.delete("/v1/access_tokens/current", summary="Revoke the token in use (log out)")
async def revoke_current(ctx: AuthCtx) -> dict[str, Any]:
    """Revoke the presented token."""
    row = await ctx.db.get(AccessToken, ctx.me.token_id)
    if row is not None:
        await ctx.db.delete(row)
    return ok()


@router.delete("/v1/access_tokens", summary="Revoke all my tokens")
async def revoke_all(ctx: AuthCtx) -> dict[str, Any]:
    """Revoke every token of the calling user, including this one."""
    me = _person(ctx.me)
    await service.revoke_all(ctx.db, me.user_id or 0)
    return ok()


@router.delete("/v1/access_tokens/{token}", summary="Revoke a token")
async def revoke_token(token: str, ctx: AnyCtx) -> Response:
    """Revoke by the token's value (no other credential needed: holding it is proof), or by
    its `id` from the token list (then a bearer token of the same user is required)."""
    if len(token) == 40 and all(c in "0123456789abcdef" for c in token.lower()):
        if await service.revoke_by_value(ctx.db, token.lower()) is None:
            raise NotFound("Token not found")
        return JSONResponse(ok())
    me = _person(ctx.me)
    if await service.revoke_by_id(ctx.db, me, token) is None:
        raise NotFound("Token not found")
    return JSONResponse(ok())
