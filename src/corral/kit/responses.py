"""Response helpers shared by every domain's api.py, and the answers a route documents.

A route names the shape of its success and the errors its rules can raise (the ones its
dependencies imply, 400/401/402/403/404/413, are added by ``corral.web.openapi``)::

    @router.put("/v1/products/{product}", responses=answers(ProductAnswer, 409))

Answers are documented, not re-validated per request: routes return plain dicts (cheap), and
the schemathesis run (tests/test_api_contract.py) checks them against the document.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

ERROR_TEXT: dict[int, str] = {
    400: "The request is not valid (body, query or path), or the token was sent in more than "
         "one way",
    401: "No access token, or it is invalid, expired or revoked (OAuth's error shape)",
    402: "The organization's subscription is inactive or locked (billing)",
    403: "The caller's role or scopes do not allow this",
    404: "Not found, or not visible to the caller",
    405: "The method is not allowed here",
    408: "The device did not answer in time",
    409: "Conflicts with the current state",
    413: "The request body is too large",
    416: "The range is not satisfiable",
    422: "The document does not match the ledger's JSON Schema (``violations`` lists where)",
    429: "Too many requests (rate limited, or too many failed logins)",
    502: "The device or an upstream service failed",
    503: "A needed service is not available",
}


class Answer(BaseModel):
    """The base of documented answers. Fields beyond those listed may appear (Particle's
    objects grow); the listed ones always have the listed types."""

    model_config = ConfigDict(extra="allow")


class OkAnswer(Answer):
    """Particle's ``{"ok": true, ...}`` envelope."""

    ok: bool = True


class Paging(Answer):
    total: int
    page: int
    per_page: int
    total_pages: int


def answers(model: Any = None, *errors: int, status: int = 200,
            description: str = "Success") -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: its success ``model`` (or None) at ``status``, and the
    extra error statuses its rules can answer."""
    out: dict[int | str, dict[str, Any]] = {}
    if model is not None:
        out[status] = {"model": model, "description": description}
    for e in errors:
        out[e] = {"description": ERROR_TEXT[e]}
    return out


def ok(**extra: Any) -> dict[str, Any]:
    return {"ok": True, **extra}


def paging(page: int, per_page: int, total: int) -> dict[str, Any]:
    pages = max(1, -(-total // per_page)) if per_page else 1
    return {"total": total, "page": page, "per_page": per_page, "total_pages": pages}
