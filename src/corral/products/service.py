"""Product rules: products, the product team (people and API users) and OAuth clients.

Services never commit (the request boundary does); they validate, change rows, flush when an
id is needed, and write one audit entry per change. Secrets (API-user tokens, client
secrets) are returned to the caller once and stored only as digests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from sqlalchemy import bindparam, delete, literal, null, or_, select, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.accounts import service as accounts
from corral.accounts.service import IssuedToken
from corral.audit import service as audit
from corral.auth.models import AccessToken, Membership, OAuthClient, User
from corral.auth.policy import API_USER_SCOPES, Role
from corral.auth.subject import Subject
from corral.billing import locks as billing_locks
from corral.db.lean import LeanRead
from corral.db.slugs import unique_slug
from corral.kit.errors import BadRequest, Conflict, CorralError, NotFound
from corral.kit.secrets import digest, new_secret, new_short_id
from corral.kit.text import slugify
from corral.orgs import service as orgs
from corral.orgs.models import Invitation, Organization
from corral.products.models import Product
from corral.products.schemas import (
    ClientChange,
    ClientCreate,
    ProductChange,
    ProductCreate,
    ProductSettings,
    TeamAdd,
    TeamChange,
)
from corral.settings import Settings

API_USER_DOMAIN = "api.corral.local"
API_USER_CLIENT = "corral-api-user"
CLIENT_TYPES = ("installed", "web")
CLIENT_SCOPES = API_USER_SCOPES | {"customers:create", "*:*"}

DeleteCheck = Callable[[AsyncSession, Product], Awaitable[str | None]]

DELETE_CHECKS: list[DeleteCheck] = []
"""Checks run before a product is deleted; each returns ``None`` (fine) or the reason for a
refusal, which becomes 409 ``product_not_empty`` with that reason as ``error_description``.

Other domains register theirs at import time, e.g. the devices feature appends a check that
refuses "while the product still has devices" (Particle: deleting a product requires
removing all its devices first). Checks must only read; they run inside the request's
transaction.
"""


class ProductView(NamedTuple):
    """A product with the slug of its organization (the ``organization`` field in JSON)."""

    product: Product
    org_slug: str


@dataclass(frozen=True, slots=True)
class TeamMember:
    """A person on a product team: their strongest role and where it comes from."""

    id: int
    username: str
    no_password: bool
    role: str
    scope: str  # organization | product


@dataclass(frozen=True, slots=True)
class TeamApiUser:
    """An API user of the product, as the team lists it (no secret, no digest)."""

    username: str
    friendly_name: str | None
    api_scopes: list[str]
    api_product_id: int | None


@dataclass
class ProductTeam:
    people: list[TeamMember]
    api_users: list[TeamApiUser]


# --- settings ------------------------------------------------------------------------------

def merge_settings(sent: ProductSettings, current: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings sent, merged into ``current``."""
    out = dict(current or {})
    fields = sent.model_fields_set
    if "quarantine" in fields:
        out["quarantine"] = bool(sent.quarantine)
    for key in ("event_data_max_bytes", "event_rate_burst"):
        if key in fields:
            out[key] = getattr(sent, key)
    if "event_rate_per_s" in fields:
        if sent.event_rate_per_s is None:
            raise BadRequest("settings.event_rate_per_s must be a number from 0.01 to 1000",
                             code="invalid_request")
        out["event_rate_per_s"] = sent.event_rate_per_s
    if "location" in fields:
        out["location"] = {"opt_in": bool(sent.location and sent.location.opt_in)}
    return out


def _clean_tags(tags: list[str] | None) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in tags or () if t.strip()))


# --- products ------------------------------------------------------------------------------

async def _flush_or(db: AsyncSession, conflict: CorralError) -> None:
    """Flush; a constraint lost to a concurrent request becomes ``conflict`` (not a 500).
    The boundary then rolls the whole transaction back."""
    try:
        await db.flush()
    except IntegrityError as exc:
        raise conflict from exc


async def _check_name_free(db: AsyncSession, org_id: int, name: str,
                           exclude_id: int | None = None) -> None:
    q = select(Product.id).where(Product.org_id == org_id, Product.name_key == name.lower())
    if exclude_id is not None:
        q = q.where(Product.id != exclude_id)
    if (await db.execute(q)).first():
        raise Conflict(f"A product named {name!r} already exists in this organization",
                       code="name_taken")


async def view(db: AsyncSession, product: Product, org_slug: str | None = None
               ) -> ProductView:
    """``org_slug``: the organization's slug when the caller has it (the product guard
    reads it), else read here."""
    if org_slug is None:
        org = await orgs.get_org(db, str(product.org_id))
        org_slug = org.slug if org else ""
    return ProductView(product, org_slug)


async def _views(db: AsyncSession, products: list[Product]) -> list[ProductView]:
    slugs: dict[int, str] = {}
    for org_id in {p.org_id for p in products}:
        org = await orgs.get_org(db, str(org_id))
        slugs[org_id] = org.slug if org else ""
    return [ProductView(p, slugs[p.org_id]) for p in products]


async def create_product(db: AsyncSession, *, actor: Subject, org: Organization,
                         req: ProductCreate, ip: str) -> ProductView:
    """Create a product in ``org`` (the caller's role is checked)."""
    name = req.name
    await _check_name_free(db, org.id, name)
    settings: dict[str, Any] = {"quarantine": True}
    if req.settings is not None:
        settings = merge_settings(req.settings, settings)
    product = Product(
        org_id=org.id, name=name, name_key=name.lower(), slug=await unique_slug(db, Product.slug, name),
        description=req.description or "", tags=_clean_tags(req.tags),
        platform_id=req.platform_id or 0, settings=settings,
    )
    db.add(product)
    await _flush_or(db, Conflict(f"A product named {name!r} already exists in this "
                                 "organization (or its slug was just taken); try again",
                                 code="name_taken"))
    audit.record(db, actor=actor, ip=ip, action="product.created", org_id=org.id,
                 product_id=product.id, target_type="product", target_id=product.id,
                 details={"name": name, "slug": product.slug})
    return ProductView(product, org.slug)


async def create_personal_product(db: AsyncSession, *, actor: Subject, req: ProductCreate,
                                  ip: str) -> ProductView:
    """Create a product in the caller's personal organization (people only)."""
    assert actor.user_id is not None
    org = await orgs.personal_org(db, actor.user_id)
    return await create_product(db, actor=actor, org=org, req=req, ip=ip)


async def _open_only(db: AsyncSession, products: list[Product]) -> list[Product]:
    """Leave out the products of organizations whose subscription is locked or inactive:
    opening one answers 402 (billing's lock check in the guards), so a list does not offer
    it (docs/billing.md, "Locked and inactive organizations in lists")."""
    shut = await billing_locks.shut_statuses(db, {p.org_id for p in products})
    return [p for p in products if p.org_id not in shut]


async def visible_products(db: AsyncSession, subject: Subject) -> list[ProductView]:
    """Every product ``subject`` can see.

    People: all products of organizations where they hold an org-scope role, plus products
    where they hold a product-scope role. API users and client tokens: their own product, if
    their scopes include ``products:get`` (the same rule as ``GET /v1/products/{product}``).
    Products of a locked or inactive organization are left out.
    """
    if subject.kind != "user":
        if subject.product_id is None or "products:get" not in subject.scopes:
            return []
        row = await db.get(Product, subject.product_id)
        return await _views(db, await _open_only(db, [row] if row else []))
    org_ids = select(Membership.org_id).where(Membership.user_id == subject.user_id,
                                              Membership.product_id.is_(None))
    product_ids = select(Membership.product_id).where(Membership.user_id == subject.user_id,
                                                      Membership.product_id.is_not(None))
    q = (select(Product).where(or_(Product.org_id.in_(org_ids), Product.id.in_(product_ids)))
         .order_by(Product.id))
    return await _views(db, await _open_only(db, list((await db.execute(q)).scalars())))


async def org_products(db: AsyncSession, org: Organization) -> list[ProductView]:
    q = select(Product).where(Product.org_id == org.id).order_by(Product.id)
    return [ProductView(p, org.slug) for p in (await db.execute(q)).scalars()]


async def update_product(db: AsyncSession, *, actor: Subject, product: Product,
                         req: ProductChange, ip: str) -> ProductView:
    """Change name, description, tags, platform_id and/or settings (merged)."""
    fields = req.model_fields_set
    changed: list[str] = []
    if "name" in fields:
        name = req.name
        if name is None:
            raise BadRequest("name is required", code="invalid_request")
        if name != product.name:
            await _check_name_free(db, product.org_id, name, exclude_id=product.id)
            product.name, product.name_key = name, name.lower()
        changed.append("name")
    if "description" in fields:
        product.description = req.description or ""
        changed.append("description")
    if "tags" in fields:
        product.tags = _clean_tags(req.tags)
        changed.append("tags")
    if "platform_id" in fields:
        product.platform_id = req.platform_id or 0
        changed.append("platform_id")
    if "settings" in fields:
        if req.settings is None:
            raise BadRequest("settings must be an object", code="invalid_request")
        product.settings = merge_settings(req.settings, product.settings)
        changed.append("settings")
    if not changed:
        raise BadRequest("Nothing to update: send name, description, tags, platform_id or "
                         "settings", code="invalid_request")
    await _flush_or(db, Conflict("A product with this name already exists in this organization",
                                 code="name_taken"))
    audit.record(db, actor=actor, ip=ip, action="product.updated", org_id=product.org_id,
                 product_id=product.id, target_type="product", target_id=product.id,
                 details={"fields": changed})
    return await view(db, product)


async def delete_product(db: AsyncSession, *, actor: Subject, product: Product, ip: str) -> None:
    """Delete a product with its API users, OAuth clients (and their tokens) and product-scope
    memberships, after every check in :data:`DELETE_CHECKS` passed. Pending product
    invitations go with it through their cascading foreign key."""
    for check in DELETE_CHECKS:
        reason = await check(db, product)
        if reason is not None:
            raise Conflict(reason, code="product_not_empty")
    api_users = select(User.id).where(User.kind == "api", User.api_product_id == product.id)
    clients = select(OAuthClient.id).where(OAuthClient.product_id == product.id)
    await db.execute(delete(AccessToken).where(or_(AccessToken.user_id.in_(api_users),
                                                   AccessToken.oauth_client_id.in_(clients)))
                     .execution_options(synchronize_session=False))
    await db.execute(delete(User).where(User.kind == "api", User.api_product_id == product.id)
                     .execution_options(synchronize_session=False))
    await db.execute(delete(OAuthClient).where(OAuthClient.product_id == product.id)
                     .execution_options(synchronize_session=False))
    await db.execute(delete(Membership).where(Membership.product_id == product.id)
                     .execution_options(synchronize_session=False))
    audit.record(db, actor=actor, ip=ip, action="product.deleted", org_id=product.org_id,
                 product_id=product.id, target_type="product", target_id=product.id,
                 details={"name": product.name, "slug": product.slug})
    await db.delete(product)
    # a device added meanwhile trips the RESTRICT foreign key: refuse like a check would
    await _flush_or(db, Conflict("The product changed while it was being deleted (it is not "
                                 "empty); try again", code="product_not_empty"))


# --- the product team ------------------------------------------------------------------------

async def product_team(db: AsyncSession, product: Product) -> ProductTeam:
    """People (org-scope members of the product's org and product-scope members, each once
    with their strongest role) and the product's API users, in one statement of plain rows."""
    best: dict[int, TeamMember] = {}
    api_users: list[TeamApiUser] = []
    rows = await _TEAM.rows(db, org_id=product.org_id, product_id=product.id)
    for part, _, _, user_id, username, no_password, friendly, scopes, api_product, role, \
            member_product in rows:
        if part:
            api_users.append(TeamApiUser(username, friendly, list(scopes or []), api_product))
            continue
        current = best.get(user_id)
        if current is None or Role.parse(role) > Role.parse(current.role):
            best[user_id] = TeamMember(user_id, username, bool(no_password), role,
                                       "organization" if member_product is None else "product")
    return ProductTeam(people=list(best.values()), api_users=api_users)


def _team_statement() -> Any:
    """The team as one UNION ALL, built once (building a statement and its compiled-cache key
    cost more CPU than running it: bench/README B1b), the product and its organization as
    parameters: part 0 the people (both membership scopes: the organization's members first,
    then the product's, each by username), part 1 the API users by id."""
    people = (select(literal(0).label("part"),
                     Membership.product_id.is_not(None).label("product_scope"),
                     User.username.label("sort_name"), User.id, User.username,
                     User.password_hash.is_(None).label("no_password"), User.friendly_name,
                     User.api_scopes, User.api_product_id, Membership.role,
                     Membership.product_id)
              .join(Membership, Membership.user_id == User.id)
              .where(Membership.org_id == bindparam("org_id"),
                     or_(Membership.product_id.is_(None),
                         Membership.product_id == bindparam("product_id"))))
    api = (select(literal(1), literal(False), null(), User.id, User.username,
                  literal(False), User.friendly_name, User.api_scopes, User.api_product_id,
                  null(), null())
           .where(User.kind == "api", User.api_product_id == bindparam("product_id")))
    both = union_all(people, api).subquery()
    return select(both).order_by(both.c.part, both.c.product_scope, both.c.sort_name, both.c.id)


_TEAM = LeanRead(_team_statement())


@dataclass
class TeamAddition:
    """What a team POST made: an API user with its token, or an invitation."""

    api_user: User | None = None
    token: IssuedToken | None = None
    invitation: Invitation | None = None


async def add_team_member(db: AsyncSession, settings: Settings, *, actor: Subject,
                          product: Product, req: TeamAdd, ip: str) -> TeamAddition:
    """``{friendly_name, scopes}`` creates an API user; ``{username, role}`` invites a person."""
    if req.wants_api_user():
        user, token = await create_api_user(db, settings, actor=actor, product=product,
                                            friendly_name=req.friendly_name, scopes=req.scopes,
                                            ip=ip)
        return TeamAddition(api_user=user, token=token)
    return TeamAddition(invitation=await invite_to_product(
        db, settings, actor=actor, product=product, username=req.username, role=req.role,
        ip=ip))


def clean_api_scopes(value: list[str] | None) -> list[str]:
    scopes = list(dict.fromkeys(value or ()))
    if not scopes:
        raise BadRequest("scopes must list at least one scope", code="invalid_scope")
    unknown = [s for s in scopes if s not in API_USER_SCOPES]
    if unknown:
        raise BadRequest(f"Scopes not available to API users: {', '.join(unknown)}",
                         code="invalid_scope", invalid_scopes=unknown)
    return scopes


def _clean_friendly_name(name: str | None) -> str:
    if name is None or not name.strip():
        raise BadRequest("friendly_name is required", code="invalid_request")
    return name.strip()


async def _new_api_username(db: AsyncSession, friendly_name: str) -> str:
    base = slugify(friendly_name, max_len=40)
    while True:
        username = f"{base}+{new_short_id(3)}@{API_USER_DOMAIN}"
        if await accounts.find_user(db, username) is None:
            return username


def _issue_api_token(db: AsyncSession, settings: Settings, user: User, ip: str) -> IssuedToken:
    return accounts.issue_token(db, settings, user_id=user.id, client=API_USER_CLIENT,
                                expires_at=None, refresh=False, ip=ip)


async def create_api_user(db: AsyncSession, settings: Settings, *, actor: Subject,
                          product: Product, friendly_name: str | None,
                          scopes: list[str] | None, ip: str) -> tuple[User, IssuedToken]:
    """Create an API user of ``product`` with explicit scopes and one non-expiring token."""
    friendly_name = _clean_friendly_name(friendly_name)
    scopes = clean_api_scopes(scopes)
    user = User(username=await _new_api_username(db, friendly_name), password_hash=None,
                kind="api", friendly_name=friendly_name, api_product_id=product.id,
                api_scopes=scopes)
    db.add(user)
    await db.flush()
    issued = _issue_api_token(db, settings, user, ip)
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="apiuser.created", org_id=product.org_id,
                 product_id=product.id, target_type="api_user", target_id=user.username,
                 details={"friendly_name": friendly_name, "scopes": scopes})
    return user, issued


async def invite_to_product(db: AsyncSession, settings: Settings, *, actor: Subject,
                            product: Product, username: str | None, role: str | None,
                            ip: str) -> Invitation:
    """Invite a person (``username`` = e-mail) to the product team; ``role`` defaults to
    View-only (particle-api-js sends only ``username``). Owner is an organization role only."""
    email = orgs.normalize_email(username)
    parsed = orgs.parse_role(role, default=Role.VIEW_ONLY)
    return await orgs.invite(db, settings, inviter=actor, org=await _org_of(db, product),
                             product_id=product.id, product_name=product.name, email=email,
                             role=parsed, ip=ip)


async def _org_of(db: AsyncSession, product: Product) -> Organization:
    org = await orgs.get_org(db, str(product.org_id))
    if org is None:  # pragma: no cover - products.org_id is a RESTRICT foreign key
        raise NotFound("Organization not found")
    return org


async def find_team_user(db: AsyncSession, product: Product, username: str) -> User:
    """A user by username; API users of another product do not exist here (404)."""
    user = await accounts.find_user(db, username.strip())
    if user is None or (user.kind == "api" and user.api_product_id != product.id):
        raise NotFound("Team member not found")
    return user


async def _find_api_user(db: AsyncSession, product: Product, username: str) -> User:
    user = await find_team_user(db, product, username)
    if user.kind != "api":
        raise NotFound("API user not found")
    return user


async def _rotate(db: AsyncSession, settings: Settings, user: User, ip: str) -> IssuedToken:
    await db.execute(delete(AccessToken).where(AccessToken.user_id == user.id)
                     .execution_options(synchronize_session=False))
    issued = _issue_api_token(db, settings, user, ip)
    await db.flush()
    return issued


async def _require_product_role(db: AsyncSession, product: Product, user: User) -> None:
    """404 unless ``user`` holds a product-scope role here; the message tells someone with
    only an organization role where that role is managed."""
    rows = (await db.execute(select(Membership.product_id).where(
        Membership.user_id == user.id,
        or_(Membership.product_id == product.id,
            (Membership.org_id == product.org_id) & Membership.product_id.is_(None)),
    ))).scalars().all()
    if product.id in rows:
        return
    if rows:
        raise NotFound(f"{user.username} has an organization role, not a product role; "
                       "manage org roles in the organization", code="not_found")
    raise NotFound("Team member not found")


@dataclass
class MemberUpdate:
    """The result of a team update: a person's membership or an API user (and its new
    token when the scopes changed)."""

    user: User
    membership: Membership | None = None
    token: IssuedToken | None = None


async def update_team_member(db: AsyncSession, settings: Settings, *, actor: Subject,
                             actor_role: Role | None, product: Product, username: str,
                             req: TeamChange, ip: str) -> MemberUpdate:
    """API user: change ``friendly_name`` and/or ``scopes`` (a scope change rotates its token).
    Person: change their product-scope ``role``."""
    user = await find_team_user(db, product, username)
    if user.kind != "api":
        if actor_role is None:  # pragma: no cover - API users never hold teams.users:update
            raise NotFound("Team member not found")
        role = orgs.parse_role(req.role)
        await _require_product_role(db, product, user)
        membership = await orgs.change_role(
            db, actor=actor, actor_role=actor_role, org=await _org_of(db, product),
            product_id=product.id, username=user.username, role=role, ip=ip)
        return MemberUpdate(user, membership=membership)
    changed: list[str] = []
    token = None
    if req.sent("friendly_name"):
        user.friendly_name = _clean_friendly_name(req.friendly_name)
        changed.append("friendly_name")
    if req.sent("scopes"):
        scopes = clean_api_scopes(req.scopes)
        if set(scopes) != set(user.api_scopes or ()):
            user.api_scopes = scopes
            token = await _rotate(db, settings, user, ip)
        changed.append("scopes")
    if not changed:
        raise BadRequest("Nothing to update: send friendly_name or scopes", code="invalid_request")
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="apiuser.updated", org_id=product.org_id,
                 product_id=product.id, target_type="api_user", target_id=user.username,
                 details={"fields": changed, "scopes": list(user.api_scopes),
                          "token_rotated": token is not None})
    return MemberUpdate(user, token=token)


async def rotate_api_user_token(db: AsyncSession, settings: Settings, *, actor: Subject,
                                product: Product, username: str,
                                ip: str) -> tuple[User, IssuedToken]:
    """Replace every token of an API user of ``product`` with one new non-expiring token."""
    user = await _find_api_user(db, product, username)
    issued = await _rotate(db, settings, user, ip)
    audit.record(db, actor=actor, ip=ip, action="apiuser.token_rotated", org_id=product.org_id,
                 product_id=product.id, target_type="api_user", target_id=user.username)
    return user, issued


async def remove_team_member(db: AsyncSession, *, actor: Subject, actor_role: Role | None,
                             product: Product, username: str, ip: str) -> None:
    """Delete an API user of the product, or remove a person's product-scope membership
    (an organization role is managed in the organization, not here)."""
    user = await find_team_user(db, product, username)
    if user.kind == "api":
        await db.execute(delete(AccessToken).where(AccessToken.user_id == user.id)
                         .execution_options(synchronize_session=False))
        audit.record(db, actor=actor, ip=ip, action="apiuser.deleted", org_id=product.org_id,
                     product_id=product.id, target_type="api_user", target_id=user.username,
                     details={"friendly_name": user.friendly_name})
        await db.delete(user)
        await db.flush()
        return
    await _require_product_role(db, product, user)
    if actor_role is None:  # pragma: no cover - API users never hold teams.users:remove
        raise NotFound("Team member not found")
    await orgs.remove_member(db, actor=actor, actor_role=actor_role,
                             org=await _org_of(db, product), product_id=product.id,
                             username=user.username, ip=ip)


# --- OAuth clients ---------------------------------------------------------------------------

def clean_client_scope(value: str | list[str] | None) -> str | None:
    """Space-separated scopes (a JSON list is accepted too); ``none`` or empty clears."""
    if value is None:
        return None
    items = value if isinstance(value, list) else value.split()
    if len(items) > 200:
        raise BadRequest("scope has more than 200 scopes", code="invalid_scope")
    if items in ([], ["none"]):
        return None
    items = list(dict.fromkeys(items))
    unknown = [s for s in items if s not in CLIENT_SCOPES]
    if unknown:
        raise BadRequest(f"Unknown scopes: {', '.join(unknown)}", code="invalid_scope",
                         invalid_scopes=unknown)
    scope = " ".join(items)
    if len(scope) > 500:
        raise BadRequest("scope is too long", code="invalid_scope")
    return scope


def _clean_redirect_uri(uri: str | None, *, required: bool) -> str | None:
    if uri is None:
        if required:
            raise BadRequest("redirect_uri is required", code="invalid_request")
        return None
    parts = urlsplit(uri.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in uri.strip()):
        raise BadRequest("redirect_uri must be an http(s) URL", code="invalid_request")
    return uri.strip()


async def _new_client_id(db: AsyncSession, name: str) -> str:
    base = slugify(name, max_len=33)
    while True:
        cid = f"{base}-{new_short_id(3)}"
        exists = (await db.execute(select(OAuthClient.id).where(OAuthClient.client_id == cid))
                  ).first()
        if not exists:
            assert accounts.CLIENT_ID_RE.match(cid)
            return cid


async def list_clients(db: AsyncSession, *, product: Product | None = None,
                       owner: Subject | None = None) -> list[OAuthClient]:
    """A product's clients, or the personal (product-less) clients of ``owner``."""
    q = select(OAuthClient).order_by(OAuthClient.id)
    if product is not None:
        q = q.where(OAuthClient.product_id == product.id)
    else:
        assert owner is not None
        q = q.where(OAuthClient.product_id.is_(None), OAuthClient.owner_user_id == owner.user_id)
    return list((await db.execute(q)).scalars())


async def get_client(db: AsyncSession, client_id: str, *, product: Product | None = None,
                     owner: Subject | None = None) -> OAuthClient:
    """A client of ``product`` (or a personal client of ``owner``); 404 otherwise."""
    row = (await db.execute(select(OAuthClient).where(OAuthClient.client_id == client_id))
           ).scalar_one_or_none()
    if row is None:
        raise NotFound("OAuth client not found")
    if product is not None:
        if row.product_id != product.id:
            raise NotFound("OAuth client not found")
    elif owner is None or row.product_id is not None or row.owner_user_id != owner.user_id:
        raise NotFound("OAuth client not found")
    return row


async def create_client(db: AsyncSession, *, actor: Subject, product: Product | None,
                        req: ClientCreate, ip: str) -> tuple[OAuthClient, str]:
    """Register an OAuth client; returns it and its secret (shown only this once)."""
    name, kind = req.name, req.type
    redirect_uri = _clean_redirect_uri(req.redirect_uri, required=kind == "web")
    scope = clean_client_scope(req.scope)
    secret = new_secret()
    row = OAuthClient(client_id=await _new_client_id(db, name), secret_hash=digest(secret),
                      name=name.strip(), type=kind, redirect_uri=redirect_uri, scope=scope,
                      product_id=product.id if product else None, owner_user_id=actor.user_id)
    db.add(row)
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="client.created",
                 org_id=product.org_id if product else None,
                 product_id=product.id if product else None, target_type="oauth_client",
                 target_id=row.client_id,
                 details={"name": row.name, "type": kind, "scope": scope})
    return row, secret


async def update_client(db: AsyncSession, *, actor: Subject, client_id: str,
                        product: Product | None, req: ClientChange, ip: str) -> OAuthClient:
    """Rename a client of ``product`` (or a personal client of ``actor`` when ``product`` is
    None) and/or change its scope (``none`` clears it; a scope change revokes the client's
    tokens, which were issued with the old scopes)."""
    client = await get_client(db, client_id, product=product, owner=actor)
    changed: list[str] = []
    if req.sent("name"):
        if req.name is None:
            raise BadRequest("name is required", code="invalid_request")
        client.name = req.name
        changed.append("name")
    if req.sent("scope"):
        scope = clean_client_scope(req.scope)
        if scope != client.scope:
            # tokens carry the scopes they were issued with; a changed scope must not leave
            # tokens with the old (possibly wider) scopes behind
            await db.execute(delete(AccessToken).where(AccessToken.oauth_client_id == client.id)
                             .execution_options(synchronize_session=False))
            client.scope = scope
        changed.append("scope")
    if not changed:
        raise BadRequest("Nothing to update: send name or scope", code="invalid_request")
    await db.flush()
    audit.record(db, actor=actor, ip=ip, action="client.updated",
                 org_id=product.org_id if product else None,
                 product_id=product.id if product else None, target_type="oauth_client",
                 target_id=client.client_id, details={"fields": changed, "scope": client.scope})
    return client


async def delete_client(db: AsyncSession, *, actor: Subject, client_id: str,
                        product: Product | None, ip: str) -> None:
    """Delete a client of ``product`` (or a personal client of ``actor``) and every token
    issued through it."""
    client = await get_client(db, client_id, product=product, owner=actor)
    await db.execute(delete(AccessToken).where(AccessToken.oauth_client_id == client.id)
                     .execution_options(synchronize_session=False))
    audit.record(db, actor=actor, ip=ip, action="client.deleted",
                 org_id=product.org_id if product else None,
                 product_id=product.id if product else None, target_type="oauth_client",
                 target_id=client.client_id, details={"name": client.name})
    await db.delete(client)
    await db.flush()
