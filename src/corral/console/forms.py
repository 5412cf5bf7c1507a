"""Console forms: read a submitted form, run the service call, and on a refusal roll the
transaction back and say what was wrong next to the field it concerns.

The service (or, where a domain has them, its request model) decides what is valid; the
console only places the message. A message goes next to a field when the error names it
(``field`` in the error, a request model's ``loc``, or the field name the description
starts with, as in "name is required"); otherwise at the top of the form.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import UploadFile

from corral.kit.body import check_no_nul
from corral.kit.errors import BadRequest, CorralError

T = TypeVar("T")

_LEADING_WORD = re.compile(r"^[`'\"]?([A-Za-z_][A-Za-z0-9_.\[\]]*)[`'\"]?\b")


@dataclass
class FormErrors:
    """Messages by field name, and the ones that belong to the whole form."""

    fields: dict[str, str] = field(default_factory=dict)
    general: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fields or self.general)

    def get(self, name: str) -> str | None:
        return self.fields.get(name)


def _aliases(name: str) -> list[str]:
    return [name, name.replace("_", " "), name.split(".")[-1]]


def errors_from(exc: CorralError | ValidationError, fields: Iterable[str]) -> FormErrors:
    """Place an error's message(s) on the form's ``fields`` where they name one."""
    known = list(fields)
    out = FormErrors()
    if isinstance(exc, ValidationError):
        items = [{"loc": [str(x) for x in e.get("loc", ())],
                  "msg": "This is required" if e.get("type") == "missing"
                  else e.get("msg", "invalid")} for e in exc.errors()]
    else:
        items = exc.extra.get("errors") if isinstance(exc.extra.get("errors"), list) else None
        if not items or not all(isinstance(i, dict) for i in items):
            items = None
    if items:
        for item in items:
            loc = [x for x in item.get("loc", []) if x not in ("body", "query", "form")]
            target = next((x for x in reversed(loc) if x in known), None)
            msg = str(item.get("msg", "invalid"))
            if target and target not in out.fields:
                out.fields[target] = msg
            else:
                out.general.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        return out
    assert isinstance(exc, CorralError)
    text = exc.description
    named = exc.extra.get("field")
    if isinstance(named, str) and named in known:
        out.fields[named] = text
        return out
    m = _LEADING_WORD.match(text)
    if m:
        word = m.group(1).lower()
        for name in known:
            if word in (a.lower() for a in _aliases(name)):
                out.fields[name] = text
                return out
        for name in known:  # "Password must be...", "Organization name is required"
            if name.lower() in text.lower().split(" is ")[0].split(" must ")[0].lower():
                out.fields[name] = text
                return out
    out.general.append(text)
    return out


async def read_form(request: Request) -> dict[str, Any]:
    """The submitted fields (repeated ones as lists, files as ``UploadFile``), without the
    CSRF token; text with NUL characters is refused as ``/v1`` refuses it."""
    from corral.console.session import CSRF_FIELD

    form = await request.form()
    out: dict[str, Any] = {}
    for key in form:
        if key == CSRF_FIELD:
            continue
        values = form.getlist(key)
        out[key] = values[0] if len(values) == 1 else list(values)
    check_no_nul({k: v for k, v in out.items()
                  if isinstance(v, str) or (isinstance(v, list)
                                            and all(isinstance(x, str) for x in v))})
    return out


def text(form: dict[str, Any], name: str) -> str:
    """One text field ('' when absent; the last value when repeated)."""
    value = form.get(name)
    if isinstance(value, list):
        value = value[-1] if value else ""
    if isinstance(value, UploadFile) or value is None:
        return ""
    return str(value)


def values(form: dict[str, Any], name: str) -> list[str]:
    """A repeated field (checkboxes, multi-selects) as a list of strings."""
    value = form.get(name)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [str(v) for v in items if isinstance(v, str) and v != ""]


def checked(form: dict[str, Any], name: str) -> bool:
    return text(form, name) in ("on", "true", "1", "yes")


async def attempt(db: AsyncSession, fields: Iterable[str],
                  action: Callable[[], Awaitable[T]]) -> tuple[T | None, FormErrors]:
    """Run ``action``; on a refusal roll back everything it wrote and return the errors
    (nothing is half-written: the request's transaction is the only one)."""
    try:
        return await action(), FormErrors()
    except (CorralError, ValidationError) as exc:
        await undo(db)
        if isinstance(exc, CorralError) and (exc.status >= 500 or exc.status == 401):
            raise
        return None, errors_from(exc, fields)


async def undo(db: AsyncSession) -> None:
    """Roll the transaction back and reload the objects the page still shows (a rollback
    expires them, and an expired attribute cannot load lazily under asyncio)."""
    await db.rollback()
    for obj in list(db.identity_map.values()):
        try:
            await db.refresh(obj)
        except InvalidRequestError:  # gone (it was created by the undone work)
            db.expunge(obj)


def require(value: str, name: str, label: str | None = None) -> str:
    """A required text field (the services check the rest)."""
    if not value.strip():
        raise BadRequest(f"{label or name} is required", field=name)
    return value
