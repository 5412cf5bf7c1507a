"""Map every error to JSON in Particle's shapes. Nothing leaves as HTML or plain text."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.kit.errors import CorralError

log = logging.getLogger("corral.web")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


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
    async def _corral(_: Request, exc: CorralError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg")} for e in errors[:20]
        ]
        return JSONResponse(
            {"ok": False, "error": "invalid_request",
             "error_description": _describe_validation(list(errors)), "errors": details},
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "error")
        desc = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404 and desc == "Not Found":
            desc = "Unknown API endpoint"
        return JSONResponse({"ok": False, "error": code, "error_description": desc},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(
            {"ok": False, "error": "server_error", "error_description": "Internal server error"},
            status_code=500,
        )
