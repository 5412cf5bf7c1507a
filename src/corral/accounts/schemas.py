"""Request and answer models of accounts: sign-up, the user profile, access tokens."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from corral.kit.body import Flag, Int, JsonText, RequestModel
from corral.kit.responses import Answer, OkAnswer

# --- requests ------------------------------------------------------------------------------


class AccountInfo(RequestModel):
    first_name: str | None = Field(None, max_length=100)
    last_name: str | None = Field(None, max_length=100)
    business_account: Flag | None = None


class SignUp(RequestModel):
    ERROR_CODES = {"password": "invalid_password"}

    username: str = Field(max_length=254, description="An e-mail address")
    password: str = Field(max_length=1000)
    account_info: Annotated[AccountInfo, JsonText] | None = None


class UserChange(RequestModel):
    """``account_info``; or ``username`` and/or ``password`` with ``current_password``."""

    ERROR_CODES = {"password": "invalid_password"}

    account_info: Annotated[AccountInfo, JsonText] | None = None
    username: str | None = Field(None, max_length=254)
    password: str | None = Field(None, max_length=1000)
    current_password: str | None = Field(None, max_length=1000)
    invalidate_tokens: Flag = Field(False, description="With a new password: revoke every "
                                    "other token of the user")


class PasswordConfirm(RequestModel):
    password: str | None = Field(None, max_length=1000)


class TokenRequest(RequestModel):
    """OAuth 2 token request (form-encoded). The client may authenticate with HTTP Basic
    instead of ``client_id``/``client_secret``."""

    grant_type: Literal["password", "refresh_token", "client_credentials"]
    username: str | None = Field(None, max_length=254)
    password: str | None = Field(None, max_length=1000)
    refresh_token: str | None = Field(None, max_length=200)
    client_id: str | None = Field(None, max_length=200)
    client_secret: str | None = Field(None, max_length=200)
    scope: str | None = Field(None, max_length=1000)
    expires_in: Int | None = Field(None, ge=0, description="Seconds; 0: never expires")
    expires_at: str | None = Field(None, max_length=64, description="ISO 8601 time")


# --- answers -------------------------------------------------------------------------------


class TokenAnswer(Answer):
    token_type: str
    access_token: str
    expires_in: int
    refresh_token: str | None = None
    scope: str | None = None


class MessageAnswer(OkAnswer):
    message: str | None = None


class UserOrgSubscription(Answer):
    plan: str
    status: str


class UserOrg(Answer):
    id: int
    name: str
    slug: str
    personal: bool
    subscription: UserOrgSubscription | None = None  # plan and status (null: none)


class UserAnswer(Answer):
    username: str
    subscription_ids: list[int]
    account_info: dict[str, str | bool | None]
    mfa: dict[str, bool]
    scim_provisioned: bool
    no_password: bool
    wifi_device_count: int
    cellular_device_count: int
    orgs: list[UserOrg]


class AccessTokenInfo(Answer):
    id: str
    client: str | None
    expires_at: str | None
    created_at: str | None
    scopes: list[str]
    current: bool


class CurrentToken(Answer):
    expires_at: str | None
    client: str | None
    scopes: list[str]
    orgs: list[str]
