"""Mustache templates with Particle's webhook variables, rendered by ``chevron``.

The context of a template (Particle's webhook reference, "Variable substitution"):

* the fields of the event data when it is a JSON object (``{{{temp}}}``, ``{{{a.b}}}``,
  ``{{{c.0.d}}}``: dotted paths, list indexes);
* the predefined variables (they win over data fields of the same name):
  ``PARTICLE_DEVICE_ID``, ``PARTICLE_EVENT_NAME``, ``PARTICLE_EVENT_VALUE``,
  ``PARTICLE_PUBLISHED_AT``, ``PARTICLE_EVENT_ID``, ``PRODUCT_ID``, ``PRODUCT_USER_ID``,
  ``PRODUCT_VERSION``, ``PARTICLE_EVENT_JSON``, ``PARTICLE_EVENT_BASE64``, and the legacy
  ``SPARK_EVENT_NAME``, ``SPARK_EVENT_VALUE``, ``SPARK_CORE_ID``, ``SPARK_PUBLISHED_AT``.

``{{x}}`` HTML-escapes, ``{{{x}}}`` does not. Values print as Particle's (JavaScript)
renderer prints them: ``true``/``false``, ``21`` for 21.0, nothing for null.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import chevron  # type: ignore[import-untyped]


class TemplateError(ValueError):
    """A template that cannot be rendered (unbalanced sections, bad delimiters)."""


class _JSBool:
    """A JSON boolean: prints ``true``/``false`` and is falsy when false (chevron keeps a
    falsy scope that says so, instead of printing nothing)."""

    _CHEVRON_return_scope_when_falsy = True
    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def __bool__(self) -> bool:
        return self.value

    def __str__(self) -> str:
        return "true" if self.value else "false"


def _js(value: Any) -> Any:
    """JSON data as JavaScript would print it in a template."""
    if isinstance(value, bool):
        return _JSBool(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {str(k): _js(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_js(v) for v in value]
    return value


def parse_json(text: str | None) -> Any:
    """The event data (or a response body) as JSON, or None when it is not JSON."""
    if not text or text[0] not in "{[":
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class EventFacts:
    """What a template may say about the triggering event."""

    event_id: int | None
    name: str
    data: str | None
    published_at: str  # Particle's ISO format
    device_id: str | None  # None: published through the API
    product_id: int | None = None
    owner_user_id: int | None = None
    firmware_version: int | None = None

    @property
    def coreid(self) -> str:
        return self.device_id or "api"

    def defaults(self) -> dict[str, str]:
        """Particle's default data: ``event``, ``data``, ``published_at``, ``coreid``."""
        return {"event": self.name, "data": self.data or "",
                "published_at": self.published_at, "coreid": self.coreid}

    def context(self) -> dict[str, Any]:
        data = parse_json(self.data)
        ctx: dict[str, Any] = _js(data) if isinstance(data, dict) else {}
        whole = json.dumps({"event": self.name, "data": self.data,
                            "published_at": self.published_at, "coreid": self.coreid},
                           separators=(",", ":"))
        ctx.update({
            "PARTICLE_DEVICE_ID": self.coreid,
            "PARTICLE_EVENT_NAME": self.name,
            "PARTICLE_EVENT_VALUE": self.data or "",
            "PARTICLE_PUBLISHED_AT": self.published_at,
            "PARTICLE_EVENT_ID": "" if self.event_id is None else str(self.event_id),
            "PRODUCT_ID": "" if self.product_id is None else str(self.product_id),
            "PRODUCT_USER_ID": "" if self.owner_user_id is None else str(self.owner_user_id),
            "PRODUCT_VERSION": ("" if self.firmware_version is None
                                else str(self.firmware_version)),
            "PARTICLE_EVENT_JSON": whole,
            "PARTICLE_EVENT_BASE64": base64.b64encode(whole.encode()).decode(),
            "SPARK_EVENT_NAME": self.name,
            "SPARK_EVENT_VALUE": self.data or "",
            "SPARK_CORE_ID": self.coreid,
            "SPARK_PUBLISHED_AT": self.published_at,
        })
        return ctx


def render(template: str, context: dict[str, Any]) -> str:
    """Render one template string. Raises :class:`TemplateError`."""
    if "{{" not in template:
        return template
    try:
        return str(chevron.render(template, context))
    except (chevron.ChevronError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise TemplateError(f"template error: {exc}") from None


def render_value(value: Any, context: dict[str, Any]) -> Any:
    """Render every string (keys too) inside a JSON value."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, dict):
        return {render(str(k), context): render_value(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    return value


def check(value: Any) -> None:
    """Configuration time: every template in ``value`` must parse (rendered against an
    empty context). Raises :class:`TemplateError`."""
    render_value(value, {})


def response_context(body: str, facts: EventFacts) -> dict[str, Any]:
    """The context of a ``responseTemplate``: the response's JSON fields (an object's keys,
    or a list's indexes), plus the event's predefined variables."""
    parsed = parse_json(body)
    ctx = facts.context()
    if isinstance(parsed, dict):
        ctx.update(_js(parsed))
    elif isinstance(parsed, list):
        ctx.update({str(i): v for i, v in enumerate(_js(parsed))})
    return ctx
