"""Accounts: sign-up, credentials, token issue/refresh/revoke, login lockout."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import and_, bindparam, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.accounts.models import LoginFailure
from corral.accounts.schemas import UserChange
from corral.audit import service as audit
from corral.auth.models import AccessToken, Customer, Membership, OAuthClient, User
from corral.auth.policy import Role
from corral.auth.subject import Subject
from corral.billing.models import Subscription
from corral.db.lean import LeanRead
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, Forbidden, LoginLocked, NotFound, OAuthError
from corral.kit.passwords import hash_password, verify_password
from corral.kit.secrets import digest, new_short_id, new_token, same
from corral.orgs import service as orgs
from corral.orgs.models import Organization
from corral.settings import Settings

CLIENT_ID_RE = re.compile(r"^[a-z0-9_-]{3,40}$", re.IGNORECASE)
MIN_PASSWORD = 8
MAX_PASSWORD = 256


def normalize_email(value: object, *, field: str = "username") -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{field} is required", code="invalid_request")
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise BadRequest(f"{field} must be an e-mail address: {exc}", code="invalid_request") from exc


def check_password_rules(password: object) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise BadRequest(f"Password must be at least {MIN_PASSWORD} characters",
                         code="invalid_password")
    if len(password) > MAX_PASSWORD:
        raise BadRequest(f"Password must be at most {MAX_PASSWORD} characters",
                         code="invalid_password")
    return password


def hash_for(settings: Settings, password: str) -> str:
    return hash_password(password, time_cost=settings.argon2_time_cost,
                         memory_kib=settings.argon2_memory_kib)


async def find_user(db: AsyncSession, username: str) -> User | None:
    return (await db.execute(select(User).where(User.username == username.lower()))
            ).scalar_one_or_none()


async def create_user(db: AsyncSession, settings: Settings, *, username: Any, password: Any,
                      account_info: dict[str, Any] | None = None, ip: str | None = None) -> User:
    """Sign up: the user, their personal organization (Owner), an audit entry."""
    email = normalize_email(username)
    check_password_rules(password)
    if await find_user(db, email):
        raise Conflict("That username is already taken", code="username_taken",
                       status=400, errors=["Username is already taken"])
    info = account_info or {}
    user = User(username=email, password_hash=hash_for(settings, password), kind="user",
                first_name=_opt_str(info.get("first_name")), last_name=_opt_str(info.get("last_name")),
                business_account=bool(info.get("business_account", False)))
    db.add(user)
    await db.flush()
    org = await orgs.create_org(db, user, f"{email.split('@')[0]} (personal)", personal=True)
    audit.record(db, actor=None, actor_label=email, ip=ip, action="user.created",
                 org_id=org.id, target_type="user", target_id=user.id)
    return user


def _opt_str(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > 100:
        raise BadRequest("account_info names must be strings of at most 100 characters")
    return v


# --- tokens -----------------------------------------------------------------------------

@dataclass
class IssuedToken:
    row: AccessToken
    access_token: str
    refresh_token: str | None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_type": "bearer", "access_token": self.access_token}
        if self.row.expires_at is None:
            out["expires_in"] = 0
        else:
            out["expires_in"] = max(0, round((self.row.expires_at - clock.now()).total_seconds()))
        if self.refresh_token:
            out["refresh_token"] = self.refresh_token
        if self.row.scopes:
            out["scope"] = " ".join(self.row.scopes)
        return out


def parse_lifetime(settings: Settings, expires_in: Any, expires_at: Any) -> dt.datetime | None:
    """``expires_in`` seconds (0 = never) or ``expires_at`` ISO time; default 90 days."""
    now = clock.now()
    if expires_in not in (None, "") and expires_at not in (None, ""):
        raise OAuthError("Use expires_in or expires_at, not both")
    if expires_at not in (None, ""):
        try:
            when = dt.datetime.fromisoformat(str(expires_at).replace("Z", "+00:00"))
        except ValueError as exc:
            raise OAuthError("expires_at must be an ISO 8601 time") from exc
        aware = clock.aware(when)
        assert aware is not None
        when = aware
        if when <= now:
            raise OAuthError("expires_at must be in the future")
        return when
    if expires_in in (None, ""):
        return now + dt.timedelta(seconds=settings.token_lifetime_s)
    try:
        seconds = int(str(expires_in))
    except ValueError as exc:
        raise OAuthError("expires_in must be a whole number of seconds") from exc
    if seconds < 0 or seconds > 100 * 365 * 86400:
        raise OAuthError("expires_in is out of range")
    return None if seconds == 0 else now + dt.timedelta(seconds=seconds)


def issue_token(db: AsyncSession, settings: Settings, *, user_id: int | None, client: str,
                expires_at: dt.datetime | None, scopes: list[str] | None = None,
                oauth_client_id: int | None = None, ip: str | None = None,
                refresh: bool = True) -> IssuedToken:
    access = new_token()
    refresh_token = new_token() if (refresh and expires_at is not None) else None
    row = AccessToken(
        public_id=new_short_id(8), token_hash=digest(access),
        refresh_hash=digest(refresh_token) if refresh_token else None,
        user_id=user_id, client=client, oauth_client_id=oauth_client_id,
        scopes=scopes or [], expires_at=expires_at,
        refresh_expires_at=(expires_at + dt.timedelta(seconds=settings.refresh_token_lifetime_s)
                            if refresh_token and expires_at else None),
        created_at=clock.now(), created_ip=ip,
    )
    db.add(row)
    return IssuedToken(row, access, refresh_token)


# --- login lockout ------------------------------------------------------------------------

async def check_lockout(db: AsyncSession, ip: str) -> None:
    row = await db.get(LoginFailure, ip)
    if row and row.locked_until and row.locked_until > clock.now():
        secs = int((row.locked_until - clock.now()).total_seconds())
        raise LoginLocked(
            f"Too many failed logins from this address; try again in {secs // 60 + 1} minutes")


async def note_failure(sessionmaker: Any, settings: Settings, ip: str) -> None:
    """Count a failed login in its own transaction (the request's will roll back)."""
    async with sessionmaker() as db:
        row = await db.get(LoginFailure, ip)
        now = clock.now()
        if row is None:
            row = LoginFailure(ip=ip, failures=0, updated_at=now)
            db.add(row)
        if row.locked_until and row.locked_until <= now:
            row.failures, row.locked_until = 0, None
        row.failures += 1
        row.updated_at = now
        if row.failures >= settings.login_max_failures:
            row.locked_until = now + dt.timedelta(seconds=settings.login_lockout_s)
        await db.commit()


async def clear_failures(db: AsyncSession, ip: str) -> None:
    await db.execute(delete(LoginFailure).where(LoginFailure.ip == ip))


@contextlib.asynccontextmanager
async def login_attempt(db: AsyncSession, sessionmaker: Any, settings: Settings,
                        ip: str) -> AsyncIterator[None]:
    """A credential check from ``ip`` (``/oauth/token`` and the console's sign-in): refused
    while the address is locked out; a failed check (``invalid_grant``/``invalid_client``)
    counts towards the lockout."""
    await check_lockout(db, ip)
    try:
        yield
    except OAuthError as exc:
        if exc.code in ("invalid_grant", "invalid_client"):
            await note_failure(sessionmaker, settings, ip)
        raise


# --- the token endpoint ----------------------------------------------------------------

async def authenticate_client(db: AsyncSession, client_id: str | None, secret: str | None,
                              *, required: bool) -> OAuthClient | None:
    """A registered client must present its secret; an unregistered id is a public client
    (Particle accepts e.g. ``particle-cli`` for personal use) unless ``required``."""
    if not client_id or not CLIENT_ID_RE.match(client_id):
        raise OAuthError("Invalid or missing client_id parameter")
    if secret is None:
        raise OAuthError("Missing client_secret parameter")
    client = (await db.execute(select(OAuthClient).where(OAuthClient.client_id == client_id))
              ).scalar_one_or_none()
    if client is None:
        if required:
            raise OAuthError("Client credentials are invalid", code="invalid_client")
        return None
    if not same(client.secret_hash, digest(secret)):
        raise OAuthError("Client credentials are invalid", code="invalid_client")
    return client


async def password_grant(db: AsyncSession, settings: Settings, *, username: str | None,
                         password: str | None, client: str, oauth_client: OAuthClient | None,
                         expires_at: dt.datetime | None, ip: str) -> IssuedToken:
    if not username or not password:
        raise OAuthError("Missing parameter: `username` and `password` are required")
    if oauth_client is not None and oauth_client.product_id is not None:
        # a product's own client: its customers log in here (people still can, below)
        issued = await customer_password_grant(
            db, settings, product_id=oauth_client.product_id, username=username,
            password=password, client=client, oauth_client_id=oauth_client.id,
            expires_at=expires_at, ip=ip)
        if issued is not None:
            return issued
    user = await find_user(db, username.strip())
    if user is None or user.kind != "user" or not verify_password(user.password_hash, password):
        raise OAuthError("User credentials are invalid", code="invalid_grant")
    await clear_failures(db, ip)
    issued = issue_token(db, settings, user_id=user.id, client=client, expires_at=expires_at,
                         oauth_client_id=None, ip=ip)
    audit.record(db, actor=None, actor_label=user.username, ip=ip, action="token.created",
                 target_type="user", target_id=user.id, details={"client": client})
    return issued


async def customer_password_grant(db: AsyncSession, settings: Settings, *, product_id: int,
                                  username: str, password: str, client: str,
                                  oauth_client_id: int | None, expires_at: dt.datetime | None,
                                  ip: str) -> IssuedToken | None:
    """A token for the customer ``username`` of the product, or None when the product has no
    such customer; a wrong password (or a shadow customer, who has none) is refused."""
    customer = await find_product_customer(db, product_id, username)
    if customer is None:
        return None
    if not verify_password(customer.password_hash, password):
        raise OAuthError("User credentials are invalid", code="invalid_grant")
    await clear_failures(db, ip)
    return issue_customer_token(db, settings, customer, client=client,
                                oauth_client_id=oauth_client_id, expires_at=expires_at, ip=ip)


async def find_product_customer(db: AsyncSession, product_id: int, email: str) -> Customer | None:
    """The customer ``email`` (any case) of the product, if any."""
    return (await db.execute(select(Customer).where(
        Customer.product_id == product_id, Customer.email == email.strip().lower()))
    ).scalar_one_or_none()


def issue_customer_token(db: AsyncSession, settings: Settings, customer: Customer, *,
                         client: str, oauth_client_id: int | None,
                         expires_at: dt.datetime | None, ip: str | None) -> IssuedToken:
    """A token that acts as ``customer`` (no user, no scopes: the customer's own devices)."""
    issued = issue_token(db, settings, user_id=None, client=client, expires_at=expires_at,
                         oauth_client_id=oauth_client_id, ip=ip)
    issued.row.customer_id = customer.id
    audit.record(db, actor=None, actor_label=customer.email, ip=ip, action="token.created",
                 product_id=customer.product_id, target_type="customer",
                 target_id=customer.email, details={"client": client})
    return issued


async def refresh_grant(db: AsyncSession, settings: Settings, *, refresh_token: str | None,
                        client: str, ip: str) -> IssuedToken:
    if not refresh_token:
        raise OAuthError("Missing parameter: `refresh_token`")
    old = (await db.execute(select(AccessToken).where(
        AccessToken.refresh_hash == digest(refresh_token)))).scalar_one_or_none()
    if old is None or (old.refresh_expires_at and old.refresh_expires_at <= clock.now()):
        raise OAuthError("Invalid refresh token", code="invalid_grant")
    if old.client != client:
        raise OAuthError("Refresh token was issued to another client", code="invalid_grant")
    lifetime = (old.expires_at - old.created_at) if old.expires_at else None
    expires = clock.now() + lifetime if lifetime else None
    issued = issue_token(db, settings, user_id=old.user_id, client=old.client, expires_at=expires,
                         scopes=list(old.scopes or []), oauth_client_id=old.oauth_client_id, ip=ip)
    issued.row.customer_id = old.customer_id  # a customer's token stays a customer's
    await db.delete(old)  # rotation: a refresh token works once
    return issued


async def client_credentials_grant(db: AsyncSession, settings: Settings, *, oauth_client: OAuthClient,
                                   scope: str | None, expires_at: dt.datetime | None,
                                   ip: str) -> IssuedToken:
    if scope and scope.strip():
        # ``customer=<email>``: a token for that customer of the client's product (shadow
        # customers included: the product's backend vouches for them)
        kind, _, email = scope.strip().partition("=")
        customer = None
        if kind == "customer" and email.strip() and oauth_client.product_id is not None:
            customer = await find_product_customer(db, oauth_client.product_id, email)
        if customer is None:
            raise OAuthError(
                "Customer-scoped tokens need a customer of this product; none matches this scope",
                code="invalid_scope")
        return issue_customer_token(db, settings, customer, client=oauth_client.client_id,
                                    oauth_client_id=oauth_client.id, expires_at=expires_at,
                                    ip=ip)
    scopes = client_scopes(oauth_client)
    issued = issue_token(db, settings, user_id=None, client=oauth_client.client_id,
                         expires_at=expires_at, scopes=scopes, oauth_client_id=oauth_client.id,
                         ip=ip)
    audit.record(db, actor=None, actor_label=oauth_client.client_id, ip=ip,
                 action="token.created", product_id=oauth_client.product_id,
                 target_type="oauth_client", target_id=oauth_client.client_id)
    return issued


def client_scopes(client: OAuthClient) -> list[str]:
    from corral.auth.policy import API_USER_SCOPES

    raw = (client.scope or "").split()
    if "*:*" in raw:
        return sorted(API_USER_SCOPES)
    return sorted(s for s in raw if s in API_USER_SCOPES)


# --- user-facing token management -------------------------------------------------------

async def list_tokens(db: AsyncSession, user_id: int) -> list[AccessToken]:
    q = select(AccessToken).where(AccessToken.user_id == user_id).order_by(AccessToken.id.desc())
    return list((await db.execute(q)).scalars())


async def revoke_by_value(db: AsyncSession, token: str) -> AccessToken | None:
    row = (await db.execute(select(AccessToken).where(AccessToken.token_hash == digest(token)))
           ).scalar_one_or_none()
    if row is not None:
        await db.delete(row)
    return row


async def revoke_by_id(db: AsyncSession, me: Subject, public_id: str) -> AccessToken | None:
    row = (await db.execute(select(AccessToken).where(
        AccessToken.public_id == public_id, AccessToken.user_id == me.user_id))).scalar_one_or_none()
    if row is not None:
        await db.delete(row)
    return row


async def revoke_all(db: AsyncSession, user_id: int) -> int:
    result = await db.execute(delete(AccessToken).where(AccessToken.user_id == user_id))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def user_orgs(db: AsyncSession, user_id: int) -> list[Organization]:
    q = (select(Organization).join(Membership, Membership.org_id == Organization.id)
         .where(Membership.user_id == user_id, Membership.product_id.is_(None))
         .order_by(Organization.id))
    return list((await db.execute(q)).scalars())


# built once: the request's user id is its parameter (building it cost more CPU than
# running it); columns, not entities: loading a User and an Organization into the session
# cost ~10 % of the request (bench/README B1)
_PROFILE = LeanRead(
    select(User.username, User.first_name, User.last_name, User.business_account,
           User.password_hash.is_(None), Organization.id, Organization.name,
           Organization.slug, Organization.personal, Subscription.plan_code,
           Subscription.status)
    .outerjoin(Membership, and_(Membership.user_id == User.id,
                                Membership.product_id.is_(None)))
    .outerjoin(Organization, Organization.id == Membership.org_id)
    .outerjoin(Subscription, Subscription.org_id == Organization.id)
    .where(User.id == bindparam("user_id")).order_by(Organization.id))


async def profile(db: AsyncSession, user_id: int | None) -> Sequence[Any]:
    """What ``GET /v1/user`` shows, in one statement (the separate reads cost a round trip
    each): rows of the user's username, first and last name, business account, whether they
    have no password, then one organization's id, name, slug, personal flag, plan and
    subscription status (None for a user in no organization), by organization id."""
    rows = await _PROFILE.rows(db, user_id=user_id)
    if not rows:
        raise NotFound("User not found")
    return rows


async def update_user(db: AsyncSession, settings: Settings, me: Subject, req: UserChange,
                      ip: str) -> str:
    user = await db.get(User, me.user_id)
    assert user is not None
    changed: list[str] = []
    if req.sent("account_info"):
        info = req.account_info
        if info is None:
            raise BadRequest("account_info must be an object")
        for key in ("first_name", "last_name"):
            if info.sent(key):
                setattr(user, key, getattr(info, key))
                changed.append(key)
        if info.sent("business_account"):
            user.business_account = bool(info.business_account)
            changed.append("business_account")
    if req.sent("username", "password"):
        if not verify_password(user.password_hash, req.current_password or ""):
            raise Forbidden("current_password is incorrect", code="invalid_password")
        if req.sent("username"):
            new = normalize_email(req.username)
            if new != user.username and await find_user(db, new):
                raise Conflict("That username is already taken", code="username_taken",
                               status=400)
            user.username = new
            changed.append("username")
        if req.sent("password"):
            user.password_hash = hash_for(settings, check_password_rules(req.password))
            changed.append("password")
            if req.invalidate_tokens:
                await db.execute(delete(AccessToken).where(AccessToken.user_id == user.id,
                                                           AccessToken.id != me.token_id))
    if not changed:
        raise BadRequest("Nothing to update: send account_info, username or password")
    audit.record(db, actor=me, ip=ip, action="user.updated", target_type="user",
                 target_id=user.id, details={"fields": changed})
    return "User updated" if changed != ["password"] else "Password updated"


async def delete_user(db: AsyncSession, me: Subject, password: Any, ip: str) -> None:
    user = await db.get(User, me.user_id)
    assert user is not None
    if not isinstance(password, str) or not verify_password(user.password_hash, password):
        raise Forbidden("password is incorrect", code="invalid_password")
    # refuse while the user is the last Owner of a shared organization
    owned = (await db.execute(
        select(Membership.org_id).join(Organization, Organization.id == Membership.org_id)
        .where(Membership.user_id == user.id, Membership.product_id.is_(None),
               Membership.role == Role.OWNER.label, Organization.personal.is_(False))
    )).scalars().all()
    for org_id in owned:
        owners = (await db.execute(select(func.count()).select_from(Membership).where(
            Membership.org_id == org_id, Membership.product_id.is_(None),
            Membership.role == Role.OWNER.label))).scalar_one()
        if owners <= 1:
            raise Conflict("You are the last Owner of an organization; transfer it first",
                           code="last_owner")
    personal = await orgs.personal_org(db, user.id)
    from corral.products.models import Product

    has_products = (await db.execute(select(Product.id).where(Product.org_id == personal.id)
                                     .limit(1))).first()
    if has_products:
        raise Conflict("Delete the products in your personal organization first",
                       code="has_products")
    audit.record(db, actor=me, ip=ip, action="user.deleted", target_type="user",
                 target_id=user.id)
    await db.delete(personal)
    await db.delete(user)


# --- operator tasks (``corral admin``) ----------------------------------------------------

async def set_password(db: AsyncSession, settings: Settings, username: str, password: str, *,
                       revoke_tokens: bool, actor_label: str) -> int:
    """Set a person's password; optionally revoke their tokens. Returns tokens revoked."""
    user = await find_user(db, username.strip())
    if user is None or user.kind != "user":
        raise NotFound(f"No user {username!r}")
    user.password_hash = hash_for(settings, check_password_rules(password))
    revoked = await revoke_all(db, user.id) if revoke_tokens else 0
    audit.record(db, actor=None, actor_label=actor_label, ip=None, action="user.updated",
                 target_type="user", target_id=user.id,
                 details={"fields": ["password"], "tokens_revoked": revoked})
    return revoked


async def list_users(db: AsyncSession) -> list[User]:
    """Every account, people and API users, oldest first."""
    return list((await db.execute(select(User).order_by(User.id))).scalars())
