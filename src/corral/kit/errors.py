"""One error tree. The web layer maps these to Particle's JSON shapes; transports to closes.

Body on /v1: ``{"ok": false, "error": <code>, "error_description": <text>}`` plus extras.
OAuth errors (token endpoint and bearer check) use ``{"error", "error_description"}`` only.
Never put the words "access token" in a description unless the token really is bad:
particle-cli deletes its stored token when it sees them.
"""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    status: int = 400
    code: str = "bad_request"
    oauth: bool = False  # OAuth shape: no "ok" key, no-store headers

    def __init__(self, description: str | None = None, *, code: str | None = None,
                 status: int | None = None, **extra: Any) -> None:
        self.description = description or self.__class__.__doc__ or self.code
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra = extra
        super().__init__(self.description)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {} if self.oauth else {"ok": False}
        body["error"] = self.code
        body["error_description"] = self.description
        body.update(self.extra)
        return body


class BadRequest(CorralError):
    """The request is not valid."""

    status = 400
    code = "bad_request"


class Unauthorized(CorralError):
    """The access token provided is invalid."""

    status = 401
    code = "invalid_token"
    oauth = True


class Forbidden(CorralError):
    """You do not have permission to do this."""

    status = 403
    code = "forbidden"


class NotFound(CorralError):
    """Not found."""

    status = 404
    code = "not_found"


class Conflict(CorralError):
    """The request conflicts with the current state."""

    status = 409
    code = "conflict"


class PayloadTooLarge(CorralError):
    """The request body is too large."""

    status = 413
    code = "payload_too_large"


class RateLimited(CorralError):
    """Too many requests."""

    status = 429
    code = "rate_limit_exceeded"


class OAuthError(CorralError):
    """OAuth token endpoint error (400 unless stated)."""

    status = 400
    code = "invalid_request"
    oauth = True


class LoginLocked(RateLimited):
    """Too many failed logins from this address."""

    oauth = True
