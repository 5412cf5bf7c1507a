"""What crosses the bus between the API side and the node that holds a device's session.

Every node runs the same code; in the embedded mode the "bus" is in-process, scaled out it
is NATS. Nothing here knows which. Subjects (tokens are ``[A-Za-z0-9_-]``):

``device.<id>.request``
    API -> session. Request/reply. Payload ``{"kind": "function", "name", "arg"}`` or
    ``{"kind": "variable", "name"}``, plus ``"timeout"`` (seconds the caller waits).
    Reply: ``{"ok": true, "return_value": int}`` / ``{"ok": true, "result": value, "type"}``
    or ``{"ok": false, "status": int, "error": code, "error_description": text}``.
    No responders means no node holds a session for the device: it is offline.

``device.<id>.control``
    Anyone -> session. ``{"op": "kick", "session": sid}`` closes every session of the
    device except ``sid`` (a device that reconnects replaces its old session, on whichever
    node that one lives). ``{"op": "refresh"}`` reloads the device's tenancy (claim,
    unclaim, product move). ``{"op": "disconnect", "reason"}`` closes it.

``ev.<org>.<product>.<owner>.<customer>.<device>``
    The event fan-out, published after the event's row is committed. ``0`` stands for "none"
    in the numeric tokens, ``api`` for a cloud-published event's device token. Payload:
    :func:`event_payload`. Streams subscribe with wildcards (a product stream is
    ``ev.*.<product>.*.*.*``) and filter the event *name* prefix themselves, because names
    may contain characters subjects cannot.
"""

from __future__ import annotations

from typing import Any

from corral.devices.signals import control_subject
from corral.kit import clock

REQUEST = "device.{}.request"
NONE_TOKEN = "0"
API_TOKEN = "api"


def request_subject(device_id: str) -> str:
    return REQUEST.format(device_id.lower())


def _t(value: int | None) -> str:
    return NONE_TOKEN if value is None else str(int(value))


def event_subject(*, org_id: int | None, product_id: int | None, owner_user_id: int | None,
                  customer_id: int | None, device_id: str | None) -> str:
    """The subject an event is fanned out on."""
    dev = device_id.lower() if device_id else API_TOKEN
    return f"ev.{_t(org_id)}.{_t(product_id)}.{_t(owner_user_id)}.{_t(customer_id)}.{dev}"


def stream_pattern(*, org_id: int | None = None, product_id: int | None = None,
                   owner_user_id: int | None = None, customer_id: int | None = None,
                   device_id: str | None = None) -> str:
    """The subscription pattern for "events with all these tenancy facts" (``*`` elsewhere)."""

    def tok(v: int | None) -> str:
        return "*" if v is None else str(int(v))

    dev = "*" if device_id is None else device_id.lower()
    return f"ev.{tok(org_id)}.{tok(product_id)}.{tok(owner_user_id)}.{tok(customer_id)}.{dev}"


def event_payload(e: Any) -> dict[str, Any]:
    """The fan-out payload of a stored event: Particle's stream JSON plus routing facts."""
    from corral.events.service import coreid

    return {
        "id": e.id,
        "name": e.name,
        "data": e.data,
        "ttl": e.ttl,
        "published_at": clock.iso(e.published_at),
        "coreid": coreid(e),
        "private": e.private,
        "source": e.source,
        "device_id": e.device_id,
        "product_id": e.product_id,
        "org_id": e.org_id,
        "owner_user_id": e.owner_user_id,
        "customer_id": e.customer_id,
    }


def stream_json(payload: dict[str, Any]) -> dict[str, Any]:
    """The SSE ``data:`` object (Particle's shape) from a fan-out payload."""
    return {"data": payload["data"], "ttl": payload["ttl"],
            "published_at": payload["published_at"], "coreid": payload["coreid"]}


def name_matches(prefix: str | None, name: str) -> bool:
    """Particle's subscription rule: a literal, case-sensitive prefix of the event name."""
    return not prefix or name.startswith(prefix)


__all__ = ["API_TOKEN", "NONE_TOKEN", "control_subject", "event_payload", "event_subject",
           "name_matches", "request_subject", "stream_json", "stream_pattern"]
