"""``GET /v1/device_endpoints``: where devices connect to this cloud (a corral extension).

Clients that run devices (``corral simulate``, the SDK's tools) ask the server instead of
assuming the default ports: ``corral serve`` moves a default device port that another program
holds (a local Mosquitto on 1883) to a free one, and an operator may choose any port.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter

from corral.auth.deps import AuthCtx
from corral.db.session import TransactionRoute
from corral.kit.responses import Answer, OkAnswer, answers, ok
from corral.settings import Settings

router = APIRouter(tags=["devices"], route_class=TransactionRoute)

WILDCARDS = ("", "0.0.0.0", "::")


class Endpoint(Answer):
    host: str
    port: int


class DeviceEndpoints(Answer):
    mqtt: Endpoint | None
    mqtts: Endpoint | None
    particle_tcp: Endpoint | None
    particle_udp: Endpoint | None


class DeviceEndpointsAnswer(OkAnswer):
    endpoints: DeviceEndpoints


def device_host(settings: Settings, request_host: str | None) -> str:
    """The address devices use: the configured public URL's host, else the listening address
    (the host the client reached the API by when corral listens on every interface)."""
    if settings.public_url:
        host = urlsplit(settings.public_url).hostname
        if host:
            return host
    if settings.host not in WILDCARDS:
        return settings.host
    return request_host or "127.0.0.1"


def endpoints(settings: Settings, request_host: str | None) -> dict[str, Any]:
    host = device_host(settings, request_host)

    def at(port: int) -> dict[str, Any] | None:
        return {"host": host, "port": port} if port else None

    return {"mqtt": at(settings.mqtt_port), "mqtts": at(settings.mqtt_tls_port),
            "particle_tcp": at(settings.particle_port),
            "particle_udp": at(settings.particle_udp_port)}


@router.get("/v1/device_endpoints", summary="Where devices connect",
            responses=answers(DeviceEndpointsAnswer))
async def device_endpoints(ctx: AuthCtx) -> dict[str, Any]:
    """The device transports' addresses (`mqtt`, `mqtts`, `particle_tcp`, `particle_udp`:
    `{host, port}`, or null when that transport is off). Any signed-in caller."""
    return ok(endpoints=endpoints(ctx.settings, ctx.request.url.hostname))
