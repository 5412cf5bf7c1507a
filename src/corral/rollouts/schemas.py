"""Request and answer models of phased rollouts."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from corral.kit.body import Int, Number, RequestModel
from corral.kit.responses import Answer

MAX_COUNT = 10_000_000


class RolloutShares(RequestModel):
    """How far a rollout reaches (``percent`` or ``count``, one of them) and when it pauses
    itself (``failure_threshold_percent``; ``null`` clears, ``failure_min_attempts``)."""

    model_config = ConfigDict(extra="forbid")

    percent: Number | None = Field(None, ge=0, le=100)
    count: Int | None = Field(None, ge=0, le=MAX_COUNT)
    failure_threshold_percent: Number | None = Field(None, ge=0, le=100)
    failure_min_attempts: Int | None = Field(None, ge=1, le=MAX_COUNT)


class RolloutStart(RolloutShares):
    version: Int = Field(ge=1, le=65_535, description="A released firmware version")


class RolloutAction(RequestModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=500)


class Rollout(Answer):
    id: int
    product_id: int
    version: int
    firmware_id: int
    percent: float | None
    count: int | None
    state: str
    state_reason: str | None
    progress: dict[str, Any] | None = None


class RolloutAnswer(Answer):
    rollout: Rollout


class RolloutsAnswer(Answer):
    rollouts: list[Rollout]
