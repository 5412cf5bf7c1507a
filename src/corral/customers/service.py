"""Customer rules: create (team or two-legged), list with devices, change password, delete.

A customer is an end user of one product, identified by e-mail within that product. A
"shadow" customer (``no_password``) has no password: only the product's backend, holding the
product's OAuth client credentials, can get tokens for them (``client_credentials`` with
``scope=customer=<email>``). Customer tokens carry ``AccessToken.customer_id`` and reach only
the devices claimed to the customer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.accounts import service as accounts
from corral.accounts.service import IssuedToken
from corral.audit import service as audit
from corral.auth.models import AccessToken, Customer, OAuthClient
from corral.auth.subject import Subject
from corral.customers.schemas import CustomerCreate, CustomerPassword
from corral.devices import claims
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.products.models import Product
from corral.settings import Settings

CUSTOMER_CLIENT = "corral-customer"  # the client name on tokens made by a team member


@dataclass
class Creator:
    """Who creates a customer: a team member (``actor``) or the product's OAuth client."""

    actor: Subject | None = None
    oauth_client: OAuthClient | None = None

    @property
    def label(self) -> str:
        if self.actor is not None:
            return self.actor.label
        assert self.oauth_client is not None
        return self.oauth_client.client_id


async def find_customer(db: AsyncSession, product: Product, email: str) -> Customer | None:
    return await accounts.find_product_customer(db, product.id, email)


async def get_customer(db: AsyncSession, product: Product, email: str) -> Customer:
    """The product's customer ``email``, or 404."""
    customer = await find_customer(db, product, email) if email.strip() else None
    if customer is None:
        raise NotFound("Customer not found")
    return customer


def _password_choice(req: CustomerCreate, *, two_legged: bool) -> str | None:
    """The new customer's password, or None for a shadow customer (two-legged only)."""
    password = req.password
    if req.no_password:
        if not two_legged:
            raise BadRequest("no_password (a shadow customer) needs the product's OAuth client "
                             "credentials, not a team member's token", code="invalid_request")
        if password is not None:
            raise BadRequest("Send password or no_password, not both", code="invalid_request")
        return None
    if password is None:
        raise BadRequest("password is required (or no_password=true with the product's client "
                         "credentials)" if two_legged else "password is required",
                         code="invalid_request")
    return accounts.check_password_rules(password)


async def create_customer(db: AsyncSession, settings: Settings, *, creator: Creator,
                          product: Product, req: CustomerCreate, ip: str) -> IssuedToken:
    """Create a customer of ``product`` and return their first token (90 days, refreshable).

    The caller was authorized by the route's guard (team member with ``customers:create`` or
    the product's own OAuth client)."""
    email = accounts.normalize_email(req.email, field="email")
    password = _password_choice(req, two_legged=creator.oauth_client is not None)
    exists = Conflict("A customer with that e-mail already exists in this product",
                      code="customer_exists")
    if await find_customer(db, product, email) is not None:
        raise exists
    customer = Customer(product_id=product.id, email=email,
                        password_hash=accounts.hash_for(settings, password) if password else None)
    db.add(customer)
    try:
        await db.flush()
    except IntegrityError as err:  # created concurrently
        raise exists from err
    client = creator.oauth_client
    issued = accounts.issue_customer_token(
        db, settings, customer, client=client.client_id if client else CUSTOMER_CLIENT,
        oauth_client_id=client.id if client else None,
        expires_at=accounts.parse_lifetime(settings, None, None), ip=ip)
    await db.flush()
    audit.record(db, actor=creator.actor, actor_label=creator.label, ip=ip,
                 action="customer.created", org_id=product.org_id, product_id=product.id,
                 target_type="customer", target_id=email,
                 details={"shadow": password is None,
                          "via": "oauth_client" if client else "team"})
    return issued


@dataclass
class CustomerPage:
    rows: list[tuple[Customer, list[str]]]  # each customer with their device ids
    total: int


async def list_customers(db: AsyncSession, product: Product, *, page: int,
                         per_page: int) -> CustomerPage:
    """One page of the product's customers (oldest first) with the ids of their devices."""
    total = int((await db.execute(select(func.count()).select_from(Customer).where(
        Customer.product_id == product.id))).scalar_one())
    customers = list((await db.execute(
        select(Customer).where(Customer.product_id == product.id).order_by(Customer.id)
        .offset((page - 1) * per_page).limit(per_page))).scalars())
    devices = await claims.customer_device_ids(db, [c.id for c in customers])
    return CustomerPage([(c, devices[c.id]) for c in customers], total)


async def update_customer(db: AsyncSession, settings: Settings, *, actor: Subject,
                          product: Product, email: str, req: CustomerPassword,
                          ip: str) -> Customer:
    """Set a customer's ``password`` (a shadow customer then gets one)."""
    customer = await get_customer(db, product, email)
    if req.password is None:
        raise BadRequest("Nothing to update: send password", code="invalid_request")
    was_shadow = customer.password_hash is None
    customer.password_hash = accounts.hash_for(settings, accounts.check_password_rules(
        req.password))
    audit.record(db, actor=actor, ip=ip, action="customer.updated", org_id=product.org_id,
                 product_id=product.id, target_type="customer", target_id=customer.email,
                 details={"fields": ["password"], "was_shadow": was_shadow})
    return customer


async def delete_customer(db: AsyncSession, *, actor: Subject, product: Product, email: str,
                          ip: str) -> None:
    """Delete a customer: their tokens and claim codes go, their devices are released
    (they stay in the product, unclaimed)."""
    customer = await get_customer(db, product, email)
    tokens = await db.execute(delete(AccessToken).where(AccessToken.customer_id == customer.id)
                              .execution_options(synchronize_session=False))
    codes, released = await claims.release_customer(db, customer.id)
    audit.record(db, actor=actor, ip=ip, action="customer.deleted", org_id=product.org_id,
                 product_id=product.id, target_type="customer", target_id=customer.email,
                 details={"tokens_revoked": _count(tokens), "claim_codes_revoked": codes,
                          "devices_released": released})
    await db.delete(customer)
    await db.flush()


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
