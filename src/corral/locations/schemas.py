"""Request and answer models of location queries (Particle's shapes)."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field

from corral.kit.body import Int, RequestModel
from corral.kit.responses import Answer

MAX_PER_PAGE = 100


class TrackQuery(RequestModel):
    date_range: str | None = Field(None, max_length=100,
                                   description="`<ISO start>,<ISO end>`")


class LocationsQuery(TrackQuery):
    ERROR_CODES = {"device_id": "invalid_device_id"}

    page: Int = Field(1, ge=1, le=1_000_000)
    per_page: Int = Field(20, ge=1, le=MAX_PER_PAGE,
                          validation_alias=AliasChoices("per_page", "perPage"))
    device_id: str | None = Field(None, pattern="^[0-9a-fA-F]{24}$")


class Geometry(Answer):
    type: str
    coordinates: list[Any]


class Point(Answer):
    device_id: str
    product_id: int | None
    timestamps: list[str | None]
    geometry: Geometry


class LocationsAnswer(Answer):
    locations: list[Point]
    meta: dict[str, Any]


class TrackAnswer(Answer):
    location: Point
    meta: dict[str, Any]
