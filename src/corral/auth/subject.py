"""Who is calling: resolved from a bearer token by :func:`resolve_token`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.models import AccessToken, Customer, OAuthClient, User
from corral.kit import clock
from corral.kit.errors import Unauthorized
from corral.kit.secrets import digest


@dataclass(frozen=True)
class Subject:
    kind: str  # user | api | client | customer
    token_id: int
    client: str
    user_id: int | None = None
    username: str | None = None
    product_id: int | None = None  # api users and client tokens are bound to one product
    scopes: frozenset[str] = field(default_factory=frozenset)
    oauth_client_id: int | None = None
    customer_id: int | None = None  # customer tokens: an end user of one product

    @property
    def is_person(self) -> bool:
        return self.kind == "user"

    @property
    def label(self) -> str:
        return self.username or self.client


class Cache(Protocol):
    """What :func:`resolve_token` needs of a cache (:class:`corral.auth.cache.SubjectCache`)."""

    generation: int

    def get(self, key: str) -> Subject | None: ...

    def put(self, key: str, subject: Subject, expires_at: dt.datetime | None,
            generation: int) -> None: ...


async def resolve_token(db: AsyncSession, token: str, cache: Cache | None = None) -> Subject:
    """The subject of ``token``, or 401. With ``cache``: from it when there, else from the
    database and then stored (unless the cache was cleared meanwhile)."""
    key = digest(token)
    if cache is None:
        return (await _resolve(db, key))[0]
    hit = cache.get(key)
    if hit is not None:
        return hit
    generation = cache.generation  # read before the database: a clear after it wins
    subject, expires_at = await _resolve(db, key)
    cache.put(key, subject, expires_at, generation)
    return subject


async def _resolve(db: AsyncSession, key: str) -> tuple[Subject, dt.datetime | None]:
    # one round trip for the common case: the token and its user together
    found = (await db.execute(
        select(AccessToken, User).outerjoin(User, User.id == AccessToken.user_id)
        .where(AccessToken.token_hash == key)
    )).first()
    if found is None:
        raise Unauthorized("The access token provided is invalid.")
    row, user = found
    if row.expires_at is not None and row.expires_at <= clock.now():
        raise Unauthorized("The access token provided has expired.", code="expired_token")
    expires = row.expires_at
    if row.user_id is not None:
        if user is None:
            raise Unauthorized("The access token provided is invalid.")
        if user.kind == "api":
            return Subject(kind="api", token_id=row.id, client=row.client, user_id=user.id,
                           username=user.username, product_id=user.api_product_id,
                           scopes=frozenset(user.api_scopes or ())), expires
        return Subject(kind="user", token_id=row.id, client=row.client, user_id=user.id,
                       username=user.username, scopes=frozenset(row.scopes or ())), expires
    client = await db.get(OAuthClient, row.oauth_client_id) if row.oauth_client_id else None
    if row.customer_id is not None:
        customer = await db.get(Customer, row.customer_id)
        if customer is None:
            raise Unauthorized("The access token provided is invalid.")
        return Subject(kind="customer", token_id=row.id, client=row.client,
                       username=customer.email, product_id=customer.product_id,
                       scopes=frozenset(), customer_id=customer.id,
                       oauth_client_id=row.oauth_client_id), expires
    if client is None:
        raise Unauthorized("The access token provided is invalid.")
    return Subject(kind="client", token_id=row.id, client=client.client_id,
                   product_id=client.product_id, scopes=frozenset(row.scopes or ()),
                   oauth_client_id=client.id), expires
