"""JSON of products, team members, API users and OAuth clients (Particle's fields); their
schemas are in :mod:`corral.products.schemas`."""

from __future__ import annotations

from typing import Any

from corral.accounts.service import IssuedToken
from corral.auth.models import OAuthClient, User
from corral.kit import clock
from corral.orgs import service as orgs
from corral.products.service import (
    MemberUpdate,
    ProductTeam,
    ProductView,
    TeamAddition,
    TeamApiUser,
)

DEFAULT_SETTINGS: dict[str, Any] = {
    "location": {"opt_in": False},
    "known_application": {"opt_in": False},
    "quarantine": True,
}


def product_json(pv: ProductView) -> dict[str, Any]:
    p = pv.product
    return {
        "id": p.id,
        "product_id": p.id,
        "platform_id": p.platform_id,
        "name": p.name,
        "slug": p.slug,
        "description": p.description or "",
        "tags": list(p.tags or []),
        "organization": pv.org_slug,
        "org_id": p.org_id,
        "subscription_id": None,
        "user": None,
        "groups": [],
        "settings": {**DEFAULT_SETTINGS, **(p.settings or {})},
        "requires_activation_codes": False,
        "device_protection": "disabled",
        "created_at": clock.iso(p.created_at),
        "updated_at": clock.iso(p.updated_at),
    }


def api_user_json(user: User | TeamApiUser) -> dict[str, Any]:
    return {
        "username": user.username,
        "friendly_name": user.friendly_name,
        "scopes": list(user.api_scopes or []),
        "is_programmatic": True,
        "product_id": user.api_product_id,
    }


def tokens_json(issued: IssuedToken) -> list[dict[str, Any]]:
    return [{"token": issued.access_token}]


def team_json(team: ProductTeam) -> list[dict[str, Any]]:
    """The people, each with their scope, then the API users."""
    people = [{**orgs.member_json(m.id, m.username, m.role, m.no_password), "scope": m.scope}
              for m in team.people]
    return people + [api_user_json(u) for u in team.api_users]


def team_addition_json(added: TeamAddition) -> dict[str, Any]:
    """``created`` (an API user with its one token) or ``invited`` (a person)."""
    if added.api_user is not None:
        assert added.token is not None
        u = added.api_user
        return {"created": {"username": u.username, "friendly_name": u.friendly_name,
                            "scopes": list(u.api_scopes or []), "is_programmatic": True,
                            "tokens": tokens_json(added.token)}}
    assert added.invitation is not None
    inv = added.invitation
    return {"invited": {"username": inv.email, "role": inv.role, "id": inv.id}}


def member_update_json(res: MemberUpdate) -> dict[str, Any]:
    """A person's new product membership, or the API user (with its new token if rotated)."""
    if res.membership is not None:
        return {**orgs.team_member_json(res.user, res.membership), "scope": "product"}
    out = api_user_json(res.user)
    if res.token is not None:
        out["tokens"] = tokens_json(res.token)
    return out


def client_json(c: OAuthClient, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": c.name, "type": c.type, "id": c.client_id}
    if secret is not None:
        out["secret"] = secret
    out["redirect_uri"] = c.redirect_uri
    out["scope"] = c.scope
    if c.product_id is not None:
        out["product_id"] = c.product_id
    return out
