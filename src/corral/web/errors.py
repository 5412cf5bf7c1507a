"""Map every error to JSON in Particle's shapes; under a path registered with
:func:`add_html_errors` (the web console) to that renderer's HTML page instead."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.kit.errors import CorralError

log = logging.getLogger("corral.web")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

HtmlErrorRenderer = Callable[[Request, CorralError], Awaitable[Response]]
_html_renderers: list[tuple[Callable[[str], bool], HtmlErrorRenderer]] = []


def add_html_errors(matches: Callable[[str], bool], renderer: HtmlErrorRenderer) -> None:
    """Errors of requests whose path ``matches`` are rendered by ``renderer`` (once)."""
    if all(r is not renderer for _, r in _html_renderers):
        _html_renderers.append((matches, renderer))


async def _as_html(request: Request, err: CorralError) -> Response | None:
    path = request.url.path
    for matches, renderer in _html_renderers:
        if matches(path):
            try:
                return await renderer(request, err)
            except Exception:  # the error page itself failed: fall back to JSON
                log.exception("error page failed", extra={"path": path})
    return None


def error_response(err: CorralError) -> JSONResponse:
    headers = dict(NO_STORE) if err.oauth else {}
    if err.code == "invalid_client" and err.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="Service"'
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _describe_validation(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form"))
        msg = e.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(CorralError)
    async def _corral(request: Request, exc: CorralError) -> Response:
        return await _as_html(request, exc) or error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        html = await _as_html(request, CorralError(_describe_validation(list(errors)),
                                                   code="invalid_request", status=400))
        if html is not None:
            return html
        details = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg")} for e in errors[:20]
        ]
        return JSONResponse(
            {"ok": False, "error": "invalid_request",
             "error_description": _describe_validation(list(errors)), "errors": details},
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "error")
        desc = exc.detail if isinstance(exc.detail, str) else code
        html = await _as_html(request, CorralError(
            "There is no such page" if desc == "Not Found" else desc, code=code,
            status=exc.status_code))
        if html is not None:
            return html
        if exc.status_code == 404 and desc == "Not Found":
            desc = "Unknown API endpoint"
        return JSONResponse({"ok": False, "error": code, "error_description": desc},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        html = await _as_html(request, CorralError(
            "Something went wrong on our side; it has been logged.", code="server_error",
            status=500))
        if html is not None:
            return html
        return JSONResponse(
            {"ok": False, "error": "server_error", "error_description": "Internal server error"},
            status_code=500,
        )
