"""Request and answer models of product customers."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from corral.kit.body import Flag, Int, RequestModel
from corral.kit.responses import Answer, Paging


class CustomerCreate(RequestModel):
    """``email`` + ``password`` (a team token or the product's client credentials), or
    ``no_password=true`` (a shadow customer: client credentials only). The client may send
    its credentials here (``client_id``/``client_secret``) instead of HTTP Basic."""

    ERROR_CODES = {"password": "invalid_password"}

    email: str = Field(max_length=254)
    password: str | None = Field(None, max_length=1000)
    no_password: Flag = False
    client_id: str | None = Field(None, max_length=200)
    client_secret: str | None = Field(None, max_length=200)


class CustomerPassword(RequestModel):
    ERROR_CODES = {"password": "invalid_password"}

    password: str | None = Field(None, max_length=1000)


class CustomerPage(RequestModel):
    page: Int = Field(1, ge=1, le=1_000_000)
    per_page: Int = Field(25, ge=1, le=1000, validation_alias=AliasChoices("per_page", "perPage"))


class Customer(Answer):
    id: int
    username: str
    devices: list[str]


class CustomersAnswer(Answer):
    customers: list[Customer]
    meta: Paging
