"""Request and answer models of devices: the product inventory (list, change, batch, remove,
import), device groups and a user's own devices."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BeforeValidator, ConfigDict, Field, StringConstraints

from corral.kit.body import Flag, Int, JsonText, RequestModel
from corral.kit.responses import Answer, Paging
from corral.products.schemas import MAX_TAG_LEN, Tags

MAX_NOTES = 1000
MAX_PER_PAGE = 1000
DEFAULT_PER_PAGE = 25
MAX_BATCH = 10_000
MAX_GROUPS_PER_DEVICE = 100
MAX_GROUP_DESCRIPTION = 500

Short = Annotated[str, StringConstraints(max_length=64)]
GroupNames = Annotated[list[Short], BeforeValidator(lambda v: _comma(v)),
                       Field(max_length=MAX_GROUPS_PER_DEVICE)]


def _comma(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _null_text(value: Any) -> Any:
    return None if value == "null" else value


# --- requests ------------------------------------------------------------------------------


class DeviceListQuery(RequestModel):
    """Particle's device-list parameters (``per_page`` and ``perPage`` both work)."""

    page: Int = Field(1, ge=1, le=10_000_000)
    per_page: Int = Field(DEFAULT_PER_PAGE, ge=1, le=MAX_PER_PAGE,
                          validation_alias=AliasChoices("per_page", "perPage"))
    device_id: Short | None = Field(None, alias="deviceId", description="An ID prefix")
    device_name: Short | None = Field(None, alias="deviceName")
    serial_number: Short | None = Field(None, alias="serialNumber")
    firmware_version: Int | None = Field(None, alias="firmwareVersion", ge=0, le=2**31 - 1)
    search: Short | None = Field(None, description="An ID, name or serial number prefix")
    groups: GroupNames | None = Field(None, validation_alias=AliasChoices("groups", "group"),
                                      description="Devices in any of these groups (static "
                                      "or dynamic)")
    tags: Tags | None = Field(None, description="Devices carrying every one of these tags "
                              "(a list or `a,b`)")
    cohort: Short | None = Field(None, description="Devices in this cohort")
    quarantined: Flag | None = None
    online: Flag | None = None
    development: Flag | None = None
    sort_attr: Literal["deviceId", "deviceName", "firmwareVersion", "lastConnection"] = Field(
        "lastConnection", alias="sortAttr")
    sort_dir: Annotated[Literal["asc", "desc"], BeforeValidator(_lower)] = Field(
        "desc", alias="sortDir")


class DeviceChange(RequestModel):
    """A user's own device: ``name``, ``notes``, ``firmware_updates_forced``; or, as
    ``multipart/form-data``, a binary in ``file`` to flash to it (alone; particle-cli adds
    ``latest=true`` or ``build_target_version``, and ``file_type=binary``, which corral
    accepts and does not need: it flashes binaries only, it compiles nothing)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="1-64 letters, digits, '-' or '_'")
    notes: str | None = Field(None, max_length=MAX_NOTES)
    firmware_updates_forced: Flag | None = None
    file: Any = Field(None, description="A firmware binary to flash to the device "
                      "(multipart/form-data)",
                      json_schema_extra={"type": "string", "format": "binary"})
    file_type: Literal["binary"] | None = None
    latest: Flag | None = None
    build_target_version: str | None = Field(None, max_length=32)

    FLASH_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"file", "file_type", "latest", "build_target_version"})

    def changes(self) -> set[str]:
        """The fields sent that change the device (not the flash request's)."""
        return set(self.model_fields_set) - self.FLASH_FIELDS


class ProductDeviceChange(DeviceChange):
    """A product's device: also ``development``, ``groups`` and ``tags`` (absolute lists),
    ``quarantined: false`` (approve), and a firmware lock (``desired_firmware_version``;
    ``null`` unlocks) with ``flash`` (update now)."""

    development: Flag | None = None
    groups: GroupNames | None = None
    tags: Tags | None = None
    quarantined: Flag | None = None
    desired_firmware_version: Annotated[Int | None, BeforeValidator(_null_text)] = Field(
        None, ge=1, le=65_535)
    flash: Flag | None = None


Names = Annotated[list[Annotated[str, StringConstraints(max_length=MAX_TAG_LEN)]],
                  BeforeValidator(lambda v: _comma(v)), Field(max_length=MAX_GROUPS_PER_DEVICE)]


class BatchDelta(RequestModel):
    """Group names (``action: groups``) or tags (``action: tags``) to add and remove."""

    model_config = ConfigDict(extra="forbid")

    add: Names | None = None
    remove: Names | None = None


class BatchChange(RequestModel):
    """``{"action": "groups" | "tags", "devices": [ids], "metadata": {"add": [...],
    "remove": [...]}}``."""

    action: Literal["groups", "tags"]
    devices: Annotated[list[Short], BeforeValidator(_comma), Field(max_length=MAX_BATCH)]
    metadata: Annotated[BatchDelta, JsonText]


class DenyFlag(RequestModel):
    deny: Flag | None = Field(None, description="Deny the device instead of removing it "
                              "(it is then refused when it connects)")


class GroupQuery(RequestModel):
    name: Short | None = Field(None, description="A part of the group's name")


class GroupCreate(RequestModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 lowercase letters, digits, '-' or '_'")
    color: str | None = Field(None, description="#rrggbb (default: one per name)")
    description: str | None = Field(None, max_length=MAX_GROUP_DESCRIPTION)
    query: Any = Field(None, description="A dynamic group's filter, e.g. "
                       "`tag = \"north\" and online` (see the README, Groups)")


class GroupChange(RequestModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    color: str | None = None
    description: str | None = Field(None, max_length=MAX_GROUP_DESCRIPTION)
    query: Any = Field(None, description="A filter (the group becomes dynamic), or null "
                       "(static again)")


class GroupPreview(RequestModel):
    model_config = ConfigDict(extra="forbid")

    query: Any = Field(description="The filter to try")
    per_page: Int = Field(25, ge=1, le=100, validation_alias=AliasChoices("per_page",
                                                                          "perPage"))


class DeviceImport(RequestModel):
    """``id`` or ``ids`` (a list, or IDs separated by commas or spaces), or a multipart
    ``file`` (a text file, one ID per line). ``import_sims``/``claim_user`` are refused."""

    model_config = ConfigDict(extra="forbid")

    id: str | list[str] | None = None
    ids: str | list[str] | None = None
    file: Any = Field(None, json_schema_extra={"type": "string", "format": "binary"})
    force: Flag = Field(False, description="Take devices that are in another product you "
                        "administer")
    import_sims: Flag = False
    claim_user: str | None = None


# --- answers -------------------------------------------------------------------------------


class DeviceObject(Answer):
    id: str
    name: str | None
    last_ip_address: str | None
    last_heard: str | None
    last_handshake_at: str | None = None
    online: bool
    connected: bool
    platform_id: int | None
    product_id: int | None
    cellular: bool | None = None
    notes: str | None
    functions: list[str]
    variables: dict[str, str]
    status: str
    serial_number: str | None
    development: bool
    quarantined: bool
    denied: bool
    groups: list[str] | None = None
    firmware_version: int | None = None
    desired_firmware_version: int | None = None
    targeted_firmware_release_version: int | None = None


class DeviceCustomer(Answer):
    id: int
    username: str


class DevicePaging(Paging):
    total_is_estimate: bool = Field(
        False, description="Present (true) when `total` is not an exact count of now: more "
        "than 10,000 devices match and `total` is the exact count of up to 30 s ago, or, in "
        "a product of 100,000 devices or more, a filter matching more than 30,000 is "
        "estimated from a sample of 5,000 devices")


class DevicePageAnswer(Answer):
    devices: list[DeviceObject]
    customers: list[DeviceCustomer]
    meta: DevicePaging


class DeviceChanged(Answer):
    id: str
    updated_at: str | None


class FlashStarted(Answer):
    """A binary is on its way to the device (``spark/flash/status`` events follow)."""

    id: str
    status: str = Field(examples=["Update started"])


class Group(Answer):
    id: int
    name: str
    description: str | None
    color: str | None
    fw_version: int | None
    device_count: int
    device_count_is_estimate: bool = Field(
        False, description="Present (true) when `device_count` is an estimate: a dynamic "
        "group matching more than 30,000 devices of a product of 100,000 or more (from a "
        "sample of 5,000 devices), or more than 10,000 counted up to 30 s ago")
    dynamic: bool
    query: str | None
    created_at: str | None
    updated_at: str | None


class GroupAnswer(Answer):
    group: Group


class GroupsAnswer(Answer):
    groups: list[Group]


class GroupPreviewAnswer(Answer):
    query: str
    device_count: int
    device_count_is_estimate: bool
    devices: list[DeviceObject]
    meta: Paging


class ImportAnswer(Answer):
    updated: int
    updatedDeviceIds: list[str]
    existingDeviceIds: list[str]
    invalidDeviceIds: list[str]
    nonmemberDeviceIds: list[str]




# --- claiming --------------------------------------------------------------------------------

class ClaimRequest(RequestModel):
    id: str | None = Field(None, max_length=64, description="The 24-character hex device ID")
    request_transfer: Flag = False


class ClaimCodeRequest(RequestModel):
    iccid: str | None = Field(None, max_length=32, description="The code becomes this ICCID")
    imei: str | None = Field(None, max_length=32, description="The code becomes this IMEI")


class Claimed(Answer):
    ok: bool
    deviceID: str
    claimed: bool


class ClaimCodeAnswer(Answer):
    claim_code: str
    device_ids: list[str]


# --- credentials -----------------------------------------------------------------------------

MAX_KEY_FIELD = 64 * 1024
MAX_CERT_FIELD = 256 * 1024


class PublicKeyUpload(RequestModel):
    """The key as text (``publicKey`` or ``public_key``), or a multipart ``file``."""

    deviceID: str | None = Field(None, max_length=64,
                                 validation_alias=AliasChoices("deviceID", "deviceId"))
    publicKey: str | None = Field(None, max_length=MAX_KEY_FIELD,
                                  validation_alias=AliasChoices("publicKey", "public_key"))
    algorithm: str | None = Field(None, max_length=20, description="rsa or ecc")
    file: str | None = Field(None, max_length=MAX_KEY_FIELD,
                             description="The key (PEM or DER) as an uploaded file")


class BulkKeys(RequestModel):
    """``{"keys": [{device_id, public_key}]}``, or the same JSON as a multipart ``file``."""

    keys: list[Any] | str | None = None
    file: str | None = Field(None, description="The JSON document as an uploaded file")


class CaCreate(RequestModel):
    certificate: str | None = Field(None, max_length=MAX_CERT_FIELD,
                                    description="The CA certificate (PEM)")
    file: str | None = Field(None, max_length=MAX_CERT_FIELD,
                             description="The certificate (PEM or DER) as an uploaded file")
    jitp: Annotated[dict[str, Any], JsonText] | None = Field(
        None, description="What a device it provisions gets: groups, tags, development")
    active: Flag | None = None


class CaChange(RequestModel):
    model_config = ConfigDict(extra="forbid")

    active: Flag | None = None
    jitp: Annotated[dict[str, Any], JsonText] | None = None


class OkDevice(Answer):
    ok: bool
    device_id: str


class PublicKeyAnswer(OkDevice):
    public_key: dict[str, Any]


class ClearedAnswer(OkDevice):
    cleared: bool


class SecretAnswer(OkDevice):
    mqtt_secret: str


class CountAnswer(Answer):
    ok: bool
    updated: int


class CredentialsAnswer(Answer):
    device_id: str
    public_key: dict[str, Any] | None
    mqtt_secret: dict[str, Any]
    certificate_fingerprint: str | None
    credentials_version: int


class CertificateAuthority(Answer):
    id: int
    product_id: int
    fingerprint: str
    subject: str
    not_after: str | None
    active: bool
    jitp: dict[str, Any]


class CaAnswer(Answer):
    certificate_authority: CertificateAuthority


class CasAnswer(Answer):
    certificate_authorities: list[CertificateAuthority]
