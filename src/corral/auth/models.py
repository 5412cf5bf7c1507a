"""Identity tables: users (people and API users), access tokens, memberships, OAuth clients."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps


class User(Timestamps, Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(254), unique=True)  # lowercased e-mail
    password_hash: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(10), default="user")  # user | api
    first_name: Mapped[str | None] = mapped_column(String(100))
    last_name: Mapped[str | None] = mapped_column(String(100))
    business_account: Mapped[bool] = mapped_column(default=False)
    # API users only: a product-scoped programmatic identity with explicit scopes
    friendly_name: Mapped[str | None] = mapped_column(String(100))
    api_product_id: Mapped[int | None] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    api_scopes: Mapped[list[str]] = mapped_column(default=list)


class AccessToken(Base):
    __tablename__ = "access_tokens"
    __table_args__ = (Index("ix_access_tokens_user_created", "user_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(16), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    refresh_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # the OAuth client the token was issued through ("particle-api", "particle-cli", a product client)
    client: Mapped[str] = mapped_column(String(64))
    oauth_client_id: Mapped[int | None] = mapped_column(
        ForeignKey("oauth_clients.id", ondelete="CASCADE"), index=True
    )
    customer_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="CASCADE"), index=True
    )
    scopes: Mapped[list[str]] = mapped_column(default=list)
    expires_at: Mapped[dt.datetime | None]
    refresh_expires_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    created_ip: Mapped[str | None] = mapped_column(String(64))


class Membership(Timestamps, Base):
    """A role at organization scope (product_id NULL) or product scope."""

    __tablename__ = "memberships"
    __table_args__ = (
        UniqueConstraint("user_id", "org_id", "product_id", name="uq_memberships_scope"),
        Index("ix_memberships_org_product", "org_id", "product_id"),
        # NULLs are distinct in the constraint above: one org-scope role per user and org
        Index("uq_memberships_org_scope", "user_id", "org_id", unique=True,
              sqlite_where=text("product_id IS NULL"), postgresql_where=text("product_id IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    product_id: Mapped[int | None] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(20))


class OAuthClient(Timestamps, Base):
    __tablename__ = "oauth_clients"

    id: Mapped[int] = mapped_column(primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    type: Mapped[str] = mapped_column(String(20))  # installed | web
    redirect_uri: Mapped[str | None] = mapped_column(String(500))
    scope: Mapped[str | None] = mapped_column(String(500))
    product_id: Mapped[int | None] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    owner_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )


class Customer(Timestamps, Base):
    """An end customer of one product (e-mail + password, or a password-less shadow customer).

    An identity like a user, so it lives with the other credentials; the customers package
    holds the rules."""

    __tablename__ = "customers"
    __table_args__ = (UniqueConstraint("product_id", "email", name="uq_customers_product_email"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(254))
    password_hash: Mapped[str | None] = mapped_column(String(200))  # None: shadow customer
