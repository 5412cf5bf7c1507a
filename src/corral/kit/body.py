"""Read a request body that may be JSON or form-encoded (Particle accepts both)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from corral.kit.errors import BadRequest


def check_no_nul(value: Any, depth: int = 0) -> None:
    """Text with NUL characters is refused: PostgreSQL cannot store it, and no field needs it."""
    if isinstance(value, str):
        if "\x00" in value:
            raise BadRequest("NUL characters are not allowed", code="invalid_request")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_no_nul(k, depth + 1)
            check_no_nul(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_no_nul(v, depth + 1)


async def read_body(request: Request) -> dict[str, Any]:
    """Return the body as a dict; empty for no body. 400 on malformed JSON, a non-object, or
    text containing NUL characters. Uploaded files are left to their readers."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        out: dict[str, Any] = {}
        for key in form:
            values = form.getlist(key)
            out[key] = values[0] if len(values) == 1 else list(values)
        out.pop("access_token", None)
        check_no_nul({k: v for k, v in out.items() if isinstance(v, str | list)})
        return out
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest("Request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    data.pop("access_token", None)
    check_no_nul(data)
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def as_bool(value: Any, *, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (None, ""):
        return False
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"{field} must be a boolean")


def as_str(value: Any, *, field: str, required: bool = False, max_len: int = 1000,
           default: str | None = None) -> str | None:
    if value is None or value == "":
        if required:
            raise BadRequest(f"{field} is required", code="invalid_request")
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    if len(value) > max_len:
        raise BadRequest(f"{field} is at most {max_len} characters")
    return value


def as_int(value: Any, *, field: str, required: bool = False, lo: int | None = None,
           hi: int | None = None, default: int | None = None) -> int | None:
    if value is None or value == "":
        if required:
            raise BadRequest(f"{field} is required", code="invalid_request")
        return default
    if isinstance(value, bool):
        raise BadRequest(f"{field} must be an integer")
    try:
        n = int(value) if isinstance(value, int) else int(str(value).strip(), 10)
    except ValueError as exc:
        raise BadRequest(f"{field} must be an integer") from exc
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise BadRequest(f"{field} must be between {lo} and {hi}")
    return n


def as_str_list(value: Any, *, field: str, max_items: int = 1000, max_len: int = 200) -> list[str]:
    """A list of strings from a JSON list, a repeated form field, or a comma-separated string."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise BadRequest(f"{field} must be a list of strings")
    if len(items) > max_items:
        raise BadRequest(f"{field} has more than {max_items} items")
    for it in items:
        if not isinstance(it, str) or not it or len(it) > max_len:
            raise BadRequest(f"{field} must be a list of non-empty strings")
    return list(items)
