"""The device object in Particle's wire shape (sandbox and product variants)."""

from __future__ import annotations

from typing import Any

from corral.devices.models import Device
from corral.kit import clock


def device_json(d: Device, *, groups: list[str] | None = None, owner: str | None = None,
                product: bool = False, targeted: int | None = None,
                cohort: str | None = None) -> dict[str, Any]:
    """``product=True`` adds the product fields (groups, firmware targeting, quarantine...);
    ``targeted`` is the version the firmware precedence rules give the device."""
    out: dict[str, Any] = {
        "id": d.id,
        "name": d.name,
        "last_ip_address": d.last_ip_address,
        "last_heard": clock.iso(d.last_heard),
        "last_handshake_at": clock.iso(d.last_handshake_at),
        "first_online_at": clock.iso(d.first_online_at),
        "product_id": d.product_id if d.product_id is not None else d.platform_id,
        "online": d.online,
        "connected": d.online,
        "platform_id": d.platform_id,
        "cellular": d.cellular,
        "notes": d.notes,
        "functions": list(d.functions or []),
        "variables": dict(d.variables or {}),
        "status": "normal",
        "serial_number": d.serial_number,
        "iccid": d.iccid,
        "imei": d.imei,
        "system_firmware_version": d.system_firmware_version,
        "firmware_updates_enabled": d.firmware_updates_enabled,
        "firmware_updates_forced": d.firmware_updates_forced,
        "last_disconnect_at": clock.iso(d.last_disconnect_at),
        "last_disconnect_reason": d.last_disconnect_reason,
        "transport": d.transport,
        "owner": owner,
        "development": d.development,
        "quarantined": d.quarantined,
        "denied": d.denied,
        "tags": list(d.tags or []),
    }
    if product:
        out.update({
            "groups": sorted(groups or []),
            "cohort": cohort,
            "firmware_version": d.firmware_version,
            "desired_firmware_version": d.desired_firmware_version,
            "targeted_firmware_release_version": targeted,
            "firmware_product_id": d.product_id,
        })
    return out
