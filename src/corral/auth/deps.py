"""FastAPI dependencies: the caller's token, subject and a per-request context."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.cache import SubjectCache
from corral.auth.subject import Subject, resolve_token
from corral.db.session import REQUEST_SCOPED, get_db
from corral.kit.errors import OAuthError, Unauthorized
from corral.settings import Settings

_BEARER = re.compile(r"^Bearer\s+(\S+)\s*$", re.IGNORECASE)

Db = Annotated[AsyncSession, Depends(get_db)]


async def token_from_request(request: Request) -> str | None:
    """Find the token in exactly one of: Authorization header, query, form body."""
    found: list[str] = []
    header = request.headers.get("authorization")
    if header and not header.lower().startswith("basic "):
        m = _BEARER.match(header)
        if not m:
            raise OAuthError("Malformed auth header", code="invalid_request")
        found.append(m.group(1))
    if "access_token" in request.query_params:
        found.append(request.query_params["access_token"])
    ctype = request.headers.get("content-type", "")
    if request.method != "GET" and ctype.startswith("application/x-www-form-urlencoded"):
        form = await request.form()
        value = form.get("access_token")
        if isinstance(value, str):
            found.append(value)
    if len(found) > 1:
        raise OAuthError(
            "Only one method may be used to authenticate at a time (Auth header,  GET or POST).",
            code="invalid_request",
        )
    return found[0] if found else None


def basic_credentials(request: Request) -> tuple[str | None, str | None]:
    """``(client_id, secret)`` from an HTTP Basic header, or ``(None, None)`` without one."""
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None, None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError("Malformed auth header", code="invalid_client", status=401) from exc
    cid, _, secret = raw.partition(":")
    return cid, secret


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@dataclass
class Ctx:
    """What a route hands to a service: the transaction, the caller, settings, the source IP."""

    db: AsyncSession
    settings: Settings
    ip: str
    subject: Subject | None
    request: Request

    @property
    def me(self) -> Subject:
        if self.subject is None:
            raise Unauthorized("The access token was not found")
        return self.subject

    @property
    def runtime(self) -> Any:
        return self.request.app.state.runtime


_CTX = "corral.ctx"  # the request's Ctx, in its ASGI scope once made (until the route ends)
REQUEST_SCOPED.add(_CTX)


async def optional_ctx(request: Request) -> Ctx:
    """The request's context, its caller resolved from the token when there is one.

    It takes the request's session from :func:`get_db` itself rather than as a dependency,
    and :func:`auth_ctx` calls it rather than depending on it: FastAPI's dependency solving
    costs ~30-40 us of CPU per node of a route's dependency tree (bench/README B1), and these
    three nodes were under every authenticated route. Made once per request (kept in the
    scope, as FastAPI's dependency cache would), so a route depending on it twice resolves
    its token once."""
    ctx: Ctx | None = request.scope.get(_CTX)
    if ctx is None:
        db = await get_db(request)
        token = await token_from_request(request)
        subject = await resolve_token(db, token, _cache(request)) if token else None
        ctx = request.scope[_CTX] = Ctx(db=db, settings=request.app.state.settings,
                                        ip=client_ip(request), subject=subject,
                                        request=request)
    return ctx


def _cache(request: Request) -> SubjectCache | None:
    runtime = getattr(request.app.state, "runtime", None)
    cache: SubjectCache | None = getattr(runtime, "subject_cache", None)
    return cache if cache is not None and cache.enabled else None


async def public_ctx(request: Request) -> Ctx:
    """A context for a route that needs no authentication (``/oauth/token``, sign-up): any
    token the client sends is ignored, not judged. particle-cli logs in with
    ``Authorization: Bearer null``; refusing that as an invalid token would lock it out."""
    db = await get_db(request)
    return Ctx(db=db, settings=request.app.state.settings, ip=client_ip(request),
               subject=None, request=request)


async def auth_ctx(request: Request) -> Ctx:
    """A context whose caller is authenticated: 401 without a token."""
    ctx = await optional_ctx(request)
    ctx.me  # noqa: B018 - raises when no token was given
    return ctx


PublicCtx = Annotated[Ctx, Depends(public_ctx)]
AuthCtx = Annotated[Ctx, Depends(auth_ctx)]
