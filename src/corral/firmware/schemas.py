"""Request and answer models of product firmware: upload, edit, release, impact, signing keys."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, ConfigDict, Field

from corral.devices.schemas import GroupNames
from corral.kit.body import Flag, Int, JsonText, RequestModel
from corral.kit.responses import Answer, OkAnswer, Paging
from corral.rollouts.schemas import RolloutShares

MAX_VERSION = 65_535  # PRODUCT_VERSION is a u16 in the module suffix
MAX_TITLE = 200
MAX_DESCRIPTION = 5_000

Version = Annotated[Int, Field(ge=1, le=MAX_VERSION)]


class FirmwareFields(RequestModel):
    """The form fields of an upload (the binary is read by the route, streamed and limited)."""

    model_config = ConfigDict(extra="forbid")

    version: Version = Field(description="Greater than every earlier version")
    title: str = Field(max_length=MAX_TITLE)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    mandatory: Flag = False
    signature: str | None = Field(None, max_length=200,
                                  description="Base64 Ed25519 signature of the binary")
    signing_key_id: str | None = Field(None, max_length=64)


class FirmwareUpload(FirmwareFields):
    """``multipart/form-data``: the binary in ``binary`` (or ``file``, as particle-api-js
    sends it), and the fields."""

    binary: Any = Field(None, json_schema_extra={"type": "string", "format": "binary"})
    file: Any = Field(None, json_schema_extra={"type": "string", "format": "binary"})


class FirmwareChange(RequestModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=MAX_TITLE)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    mandatory: Flag | None = None


class Release(RequestModel):
    """Release a version: as the product default and/or to ``groups`` (the release is
    absolute for this firmware); ``intelligent`` flashes online devices now; corral adds
    ``rollout`` (``{"percent": n}`` or ``{"count": n}``) and ``dry_run``."""

    model_config = ConfigDict(extra="forbid")

    version: Version
    product_default: Flag = False
    groups: GroupNames | None = None
    intelligent: Flag = False
    rollout: Annotated[RolloutShares, JsonText] | None = None
    dry_run: Flag = False


class ReleasePage(RequestModel):
    """The page of a dry run's device list."""

    page: Int = Field(1, ge=1, le=1_000_000)
    per_page: Int = Field(100, ge=1, le=1000, validation_alias=AliasChoices("per_page", "perPage"))


class ImpactQuery(RequestModel):
    action: Literal["edit_groups_for_firmware"] | None = None
    firmware_version: Version = Field(validation_alias=AliasChoices("firmware_version", "version"))
    groups: GroupNames | None = None
    product_default: Flag = False


class SigningKeyCreate(RequestModel):
    """No ``public_key``: corral makes a key pair and signs uploads with it. With
    ``public_key`` (base64, hex or PEM): uploads must carry a signature by its private half."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=100)
    public_key: str | None = Field(None, max_length=10_000)


# --- answers -------------------------------------------------------------------------------


class Firmware(Answer):
    id_: str = Field(alias="_id")
    id: int
    version: int
    title: str
    description: str | None
    name: str
    size: int
    product_id: int
    product_default: bool
    current: bool
    groups: list[str]
    intelligent: bool
    mandatory: bool
    device_count: int
    uploaded_on: str | None
    sha256: str
    signature: str | None
    signing_key_id: str | None
    module: dict[str, Any] | None


class Impact(Answer):
    devices: dict[str, Any]


class DryRun(OkAnswer):
    dry_run: bool
    version: int
    impact: Impact
    devices: list[dict[str, Any]]
    meta: Paging


class Adoption(Answer):
    version: int
    device_count: int
    updates: dict[str, int]
    success_rate: float | None
    failure_reasons: list[dict[str, Any]]
    timeline: list[dict[str, Any]]


class SigningKey(Answer):
    key_id: str
    algorithm: str
    name: str | None
    public_key: str
    can_sign: bool
    active: bool
    created_at: str | None
    created_by: str | None
    revoked_at: str | None


class SigningKeyAnswer(Answer):
    signing_key: SigningKey


class SigningKeysAnswer(Answer):
    signing_keys: list[SigningKey]


class DeviceUpdate(Answer):
    id: int
    device_id: str
    firmware_id: int | None  # product firmware; null for a binary flashed to the device
    binary_id: int | None = None  # a binary flashed to the device (trigger binary)
    version: int
    state: str
    attempts: int
    bytes_sent: int


class DeviceUpdatesAnswer(OkAnswer):
    device_id: str
    firmware_version: int | None
    updates: list[DeviceUpdate]
