"""Request models of products, the product team (people and API users) and OAuth clients.

Bodies are read by :func:`corral.kit.body.body` (JSON or form, particle-cli's
``{"product": {...}}`` included); the rules that need the database stay in the service.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StringConstraints

from corral.kit.body import Flag, Int, JsonText, Number, RequestModel
from corral.kit.responses import Answer, OkAnswer
from corral.orgs.schemas import Invited, TeamMember

MAX_NAME = 100
MAX_DESCRIPTION = 2000
MAX_TAGS = 50
MAX_TAG_LEN = 100
MAX_PLATFORM_ID = 2**31 - 1

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_NAME)]


def _words(value: object) -> object:
    """Scopes as a JSON list, repeated form fields, or one string split on commas or spaces."""
    if isinstance(value, str):
        sep = "," if "," in value else None
        return [v.strip() for v in value.split(sep) if v.strip()]
    return value


def _tags(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


Tag = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TAG_LEN)]
Tags = Annotated[list[Tag], BeforeValidator(_tags), Field(max_length=MAX_TAGS)]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ApiScopes = Annotated[list[Scope], BeforeValidator(_words), Field(max_length=200)]


class LocationSetting(RequestModel):
    opt_in: Flag = False


class ProductSettings(RequestModel):
    """Known product settings; others are ignored. Sent ones are merged into the stored."""

    quarantine: Flag | None = Field(None, description="Admit unknown devices into quarantine")
    event_data_max_bytes: Int | None = Field(None, ge=1, le=16_384)
    event_rate_burst: Int | None = Field(None, ge=1, le=1000)
    event_rate_per_s: Number | None = Field(None, ge=0.01, le=1000)
    location: Annotated[LocationSetting, JsonText] | None = None


class ProductFields(RequestModel):
    """A product's fields, flat or nested under ``product`` (particle-cli)."""

    NEST = "product"

    name: Name | None = None
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    tags: Tags | None = None
    platform_id: Int | None = Field(None, ge=0, le=MAX_PLATFORM_ID)
    settings: Annotated[ProductSettings, JsonText] | None = None


class ProductCreate(ProductFields):
    name: Name


class ProductChange(ProductFields):
    """Only the fields sent change (``settings`` are merged)."""


class TeamAdd(RequestModel):
    """``{username, role}`` invites a person (role defaults to View-only);
    ``{friendly_name, scopes}`` creates an API user."""

    ERROR_CODES = {"role": "invalid_role", "scopes": "invalid_scope"}

    username: str | None = Field(None, max_length=320, description="A person's e-mail")
    role: str | None = Field(None, max_length=40)
    friendly_name: str | None = Field(None, max_length=MAX_NAME)
    scopes: ApiScopes | None = None

    def wants_api_user(self) -> bool:
        """An API user when it carries ``friendly_name``/``scopes`` rather than a person's
        ``username``."""
        if self.sent("friendly_name") and self.sent("scopes"):
            return True
        return not self.sent("username") and self.sent("friendly_name", "scopes")


class TeamChange(RequestModel):
    """A person's product ``role``; an API user's ``friendly_name`` and/or ``scopes``."""

    ERROR_CODES = {"role": "invalid_role", "scopes": "invalid_scope"}

    role: str | None = Field(None, max_length=40)
    friendly_name: str | None = Field(None, max_length=MAX_NAME)
    scopes: ApiScopes | None = None


ClientScope = Annotated[str | list[Scope], Field(
    description="Space-separated scopes (or a list); `none` clears")]


class ClientCreate(RequestModel):
    ERROR_CODES = {"scope": "invalid_scope"}

    name: Name
    type: Literal["installed", "web"]
    redirect_uri: str | None = Field(None, max_length=500,
                                     description="Required for web clients")
    scope: ClientScope | None = None


class ClientChange(RequestModel):
    ERROR_CODES = {"scope": "invalid_scope"}

    name: Name | None = None
    scope: ClientScope | None = None


# --- answers -------------------------------------------------------------------------------


class StoredSettings(Answer):
    """The product's settings as stored (the known keys of ProductSettings, and others)."""


class Product(Answer):
    id: int
    product_id: int
    platform_id: int
    name: str
    slug: str
    description: str
    tags: list[str]
    organization: str
    org_id: int
    subscription_id: int | None
    user: Any
    groups: list[Any]
    settings: StoredSettings
    requires_activation_codes: bool
    device_protection: str
    created_at: str | None
    updated_at: str | None


class ProductAnswer(OkAnswer):
    product: Product


class ProductGet(Answer):
    product: Product


class ProductsAnswer(Answer):
    products: list[Product]


class Token(Answer):
    token: str


class ApiUser(Answer):
    username: str
    friendly_name: str | None
    scopes: list[str]
    is_programmatic: bool
    product_id: int | None = None
    tokens: list[Token] | None = None


class ProductTeamMember(TeamMember):
    scope: str | None = Field(None, description="organization | product")


class ProductTeamAnswer(OkAnswer):
    team: list[ProductTeamMember | ApiUser]


class TeamAdded(OkAnswer):
    created: ApiUser | None = Field(None, description="An API user, with its one token")
    invited: Invited | None = Field(None, description="A person, invited")


class MemberUpdated(OkAnswer):
    updated: ProductTeamMember | ApiUser


class TokenRotated(Answer):
    username: str
    tokens: list[Token]


class TokenRotatedAnswer(OkAnswer):
    updated: TokenRotated


class Client(Answer):
    name: str
    type: str
    id: str
    secret: str | None = Field(None, description="Only in the answer that created it")
    redirect_uri: str | None
    scope: str | None
    product_id: int | None = None


class ClientAnswer(OkAnswer):
    client: Client


class ClientsAnswer(OkAnswer):
    clients: list[Client]
