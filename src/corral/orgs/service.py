"""Organization rules: organizations, their team (org- or product-scope memberships) and
invitations. Services never commit; the boundary does.

Team functions take ``product_id``: ``None`` means organization scope, a product id means that
product's own (product-scope) memberships only. The products team routes reuse them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.models import Membership, User
from corral.auth.policy import Role, api_users_not_allowed, assignable_roles
from corral.auth.subject import Subject
from corral.billing import locks as billing_locks
from corral.db.slugs import unique_slug
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, Forbidden, NotFound
from corral.kit.ids import path_id
from corral.kit.secrets import digest, new_token
from corral.mail import service as mail
from corral.orgs.models import Invitation, Organization
from corral.products.models import Product
from corral.settings import Settings

PENDING = "pending"


# --- organizations ------------------------------------------------------------------------

def clean_org_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("Organization name is required", code="invalid_name")
    name = name.strip()
    if len(name) > 100:
        raise BadRequest("Organization name is at most 100 characters", code="invalid_name")
    return name


async def create_org(db: AsyncSession, owner: User, name: str, *, personal: bool = False
                     ) -> Organization:
    """Create an organization with ``owner`` as its Owner."""
    name = clean_org_name(name)
    org = Organization(name=name, slug=await unique_slug(db, Organization.slug, name), personal=personal,
                       owner_user_id=owner.id if personal else None)
    db.add(org)
    await db.flush()
    db.add(Membership(user_id=owner.id, org_id=org.id, product_id=None, role=Role.OWNER.label))
    await db.flush()
    return org


async def personal_org(db: AsyncSession, user_id: int) -> Organization:
    org = (await db.execute(
        select(Organization).where(Organization.personal.is_(True),
                                   Organization.owner_user_id == user_id)
    )).scalar_one_or_none()
    if org is None:
        raise NotFound("Personal organization not found")
    return org


async def get_org(db: AsyncSession, key: str) -> Organization | None:
    """By numeric id or slug."""
    if (oid := path_id(key)) is not None:
        org = await db.get(Organization, oid)
        if org is not None:
            return org
    return (await db.execute(select(Organization).where(Organization.slug == key.lower()))
            ).scalar_one_or_none()


def _person(subject: Subject) -> int:
    """The user id of a person; API users and client tokens are refused."""
    if subject.kind != "user" or subject.user_id is None:
        raise api_users_not_allowed()
    return subject.user_id


def org_json(org: Organization, role: Role | None) -> dict[str, Any]:
    return {"id": org.id, "name": org.name, "slug": org.slug, "personal": org.personal,
            "role": role.label if role else None, "created_at": clock.iso(org.created_at)}


async def my_orgs_json(db: AsyncSession, *, actor: Subject) -> list[dict[str, Any]]:
    """``actor``'s organizations as list items with their ``subscription`` (plan and status,
    or null); one whose subscription is locked or inactive is kept (its billing page stays
    reachable) and marked ``subscription_status``."""
    rows = await list_orgs(db, actor=actor)
    shut = await billing_locks.shut_statuses(db, (org.id for org, _ in rows))
    subs = await billing_locks.subscriptions(db, (org.id for org, _ in rows))
    return [billing_locks.mark({**org_json(org, role), "subscription": subs.get(org.id)},
                               shut.get(org.id)) for org, role in rows]


async def list_orgs(db: AsyncSession, *, actor: Subject) -> list[tuple[Organization, Role]]:
    """Organizations where ``actor`` holds an organization-scope role, with that role."""
    user_id = _person(actor)
    rows = (await db.execute(
        select(Organization, Membership.role)
        .join(Membership, Membership.org_id == Organization.id)
        .where(Membership.user_id == user_id, Membership.product_id.is_(None))
        .order_by(Organization.id)
    )).all()
    return [(org, Role.parse(role)) for org, role in rows]


async def new_org(db: AsyncSession, *, actor: Subject, name: Any, ip: str) -> Organization:
    """Create a shared organization; the caller becomes its Owner."""
    user_id = _person(actor)
    user = await db.get(User, user_id)
    if user is None:
        raise NotFound("User not found")
    org = await create_org(db, user, clean_org_name(name))
    audit.record(db, actor=actor, ip=ip, action="org.created", org_id=org.id,
                 target_type="org", target_id=org.id, details={"name": org.name})
    return org


async def rename_org(db: AsyncSession, *, actor: Subject, org: Organization, name: Any,
                     ip: str) -> Organization:
    """Change the display name; the slug (and so every URL) stays."""
    new = clean_org_name(name)
    old = org.name
    if new != old:
        org.name = new
        audit.record(db, actor=actor, ip=ip, action="org.renamed", org_id=org.id,
                     target_type="org", target_id=org.id, details={"from": old, "to": new})
        await db.flush()
    return org


async def delete_org(db: AsyncSession, *, actor: Subject, org: Organization, ip: str) -> None:
    """Delete an empty shared organization (memberships and invitations go with it)."""
    if org.personal:
        raise BadRequest("A personal organization cannot be deleted; delete the account instead",
                         code="personal_org")
    has_products = (await db.execute(
        select(Product.id).where(Product.org_id == org.id).limit(1))).first()
    if has_products:
        raise Conflict("This organization still has products; delete or move them first",
                       code="has_products")
    audit.record(db, actor=actor, ip=ip, action="org.deleted", org_id=org.id,
                 target_type="org", target_id=org.id, details={"name": org.name, "slug": org.slug})
    # no flush here: a product created concurrently makes the delete fail at commit, which the
    # boundary maps to 409 (products.org_id is ON DELETE RESTRICT)
    await db.delete(org)


# --- input rules shared by the org and product team routes -----------------------------

def parse_role(value: Any, *, default: Role | None = None) -> Role:
    """A role from its label (``View-only``, ``Administrator``...) or id; 400 otherwise."""
    if value is None or value == "":
        if default is not None:
            return default
        raise BadRequest("role is required", code="invalid_role")
    if not isinstance(value, str):
        raise BadRequest("role must be a string", code="invalid_role")
    try:
        return Role.parse(value)
    except ValueError as exc:
        raise BadRequest(str(exc).capitalize(), code="invalid_role") from exc


def normalize_email(value: Any, *, field: str = "username") -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{field} (an e-mail address) is required", code="invalid_request")
    if len(value) > 254:
        raise BadRequest(f"{field} is at most 254 characters", code="invalid_request")
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise BadRequest(f"{field} must be an e-mail address: {exc}",
                         code="invalid_request") from exc


def _check_scope_role(product_id: int | None, role: Role) -> None:
    if product_id is not None and role == Role.OWNER:
        raise BadRequest("Owner is an organization role; a product team member can be at most "
                         "Administrator", code="invalid_role")


def _check_grant(actor_role: Role | None, role: Role) -> None:
    """Only an Owner grants Owner; Administrators grant up to Administrator."""
    if actor_role is not None and role in assignable_roles(actor_role):
        return
    if role == Role.OWNER and actor_role is not None and actor_role >= Role.ADMINISTRATOR:
        raise Forbidden("Only an Owner may grant or revoke the Owner role", code="forbidden")
    label = actor_role.label if actor_role else "caller's"
    raise Forbidden(f"The {label} role may not grant the {role.label} role", code="forbidden")


def _scope(product_id: int | None) -> Any:
    if product_id is None:
        return Membership.product_id.is_(None)
    return Membership.product_id == product_id


async def _user_by_username(db: AsyncSession, username: str) -> User | None:
    return (await db.execute(select(User).where(User.username == username.strip().lower()))
            ).scalar_one_or_none()


async def _membership(db: AsyncSession, user_id: int, org_id: int, product_id: int | None
                      ) -> Membership | None:
    return (await db.execute(select(Membership).where(
        Membership.user_id == user_id, Membership.org_id == org_id, _scope(product_id))
        .order_by(Membership.id).limit(1))).scalars().first()


async def _actor_role(db: AsyncSession, actor: Subject, org: Organization,
                      product_id: int | None) -> Role | None:
    """The inviter's effective role: org scope, or the stronger of org and product scope."""
    where: ColumnElement[bool] = Membership.product_id.is_(None)
    if product_id is not None:
        where = where | (Membership.product_id == product_id)
    rows = (await db.execute(select(Membership.role).where(
        Membership.user_id == actor.user_id, Membership.org_id == org.id, where))).scalars().all()
    return max((Role.parse(r) for r in rows), default=None)


async def _keep_an_owner(db: AsyncSession, org_id: int) -> None:
    """Refuse to take away the last Owner. The owner rows are locked (PostgreSQL) so two
    Owners demoting each other at once cannot both succeed."""
    owners = (await db.execute(
        select(Membership.id).where(Membership.org_id == org_id, Membership.product_id.is_(None),
                                    Membership.role == Role.OWNER.label).with_for_update()
    )).scalars().all()
    if len(owners) <= 1:
        raise Conflict("An organization must keep at least one Owner; make another member "
                       "Owner first", code="last_owner")


# --- team ---------------------------------------------------------------------------------

async def list_team(db: AsyncSession, *, org_id: int, product_id: int | None
                    ) -> list[tuple[User, Membership]]:
    """Members at exactly this scope (org scope when ``product_id`` is None), by username."""
    rows = (await db.execute(
        select(User, Membership).join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org_id, _scope(product_id))
        .order_by(User.username)
    )).all()
    return [(u, m) for u, m in rows]


def team_member_json(user: User, membership: Membership) -> dict[str, Any]:
    return member_json(user.id, user.username, membership.role, user.password_hash is None)


def member_json(user_id: int, username: str, role: str, no_password: bool) -> dict[str, Any]:
    """A team member in Particle's shape (from a user and membership, or from plain rows)."""
    label = Role.parse(role).label
    return {"_id": str(user_id), "username": username,
            "role": {"id": label.lower(), "name": label},
            "no_mfa": True, "scim_provisioned": False, "no_password": no_password}


async def _find_member(db: AsyncSession, org_id: int, product_id: int | None, username: str
                       ) -> tuple[User, Membership]:
    user = await _user_by_username(db, username)
    member = await _membership(db, user.id, org_id, product_id) if user else None
    if user is None or member is None:
        raise NotFound("Team member not found", code="not_found")
    return user, member


async def change_role(db: AsyncSession, *, actor: Subject, actor_role: Role, org: Organization,
                      product_id: int | None, username: str, role: Role, ip: str) -> Membership:
    """Give a member another role at this scope."""
    _check_scope_role(product_id, role)
    _check_grant(actor_role, role)
    user, member = await _find_member(db, org.id, product_id, username)
    current = Role.parse(member.role)
    if current > actor_role:
        raise Forbidden(f"Only an Owner may change the role of an {current.label}",
                        code="forbidden")
    if current == role:
        return member
    if current == Role.OWNER and product_id is None:
        await _keep_an_owner(db, org.id)
    member.role = role.label
    audit.record(db, actor=actor, ip=ip, action="team.role_changed", org_id=org.id,
                 product_id=product_id, target_type="user", target_id=user.id,
                 details={"username": user.username, "from": current.label, "to": role.label})
    await db.flush()
    return member


async def remove_member(db: AsyncSession, *, actor: Subject, actor_role: Role,
                        org: Organization, product_id: int | None, username: str,
                        ip: str) -> None:
    """Take a member off the team at this scope (their other memberships stay)."""
    if not assignable_roles(actor_role):
        raise Forbidden(f"The {actor_role.label} role may not remove team members",
                        code="forbidden")
    user, member = await _find_member(db, org.id, product_id, username)
    current = Role.parse(member.role)
    if current > actor_role:
        raise Forbidden(f"Only an Owner may remove an {current.label}", code="forbidden")
    if current == Role.OWNER and product_id is None:
        await _keep_an_owner(db, org.id)
    audit.record(db, actor=actor, ip=ip, action="team.removed", org_id=org.id,
                 product_id=product_id, target_type="user", target_id=user.id,
                 details={"username": user.username, "role": current.label})
    await db.delete(member)
    await db.flush()


# --- invitations --------------------------------------------------------------------------

def _invite_mail(settings: Settings, *, org: Organization, product_name: str | None,
                 inviter: str, role: Role, code: str, expires_at: dt.datetime,
                 invitation_id: int) -> tuple[str, str]:
    url = settings.resolved_public_url()
    where = (f'the product "{product_name}" in the organization "{org.name}"' if product_name
             else f'the organization "{org.name}"')
    subject = (f"Invitation to join {product_name} ({org.name})" if product_name
               else f"Invitation to join {org.name}")
    body = (
        f"{inviter} invited you to join {where} as {role.label}.\n\n"
        f"Your invitation code: {code}\n"
        f"It expires at {clock.iso(expires_at)}.\n\n"
        f"To accept, sign in to {url} with this e-mail address (sign up first with\n"
        f"POST {url}/v1/users if you have no account) and send the code:\n\n"
        f"  curl -X POST {url}/v1/invitations/accept \\\n"
        f'       -H "Authorization: Bearer <your access token>" -d code={code}\n\n'
        f"Or review your invitations with GET {url}/v1/user/invitations and answer with\n"
        f"POST {url}/v1/user/invitations/{invitation_id}/accept (or /decline).\n\n"
        f"If you did not expect this invitation you can ignore this message.\n"
    )
    return subject, body


async def invite(db: AsyncSession, settings: Settings, *, inviter: Subject, org: Organization,
                 product_id: int | None, product_name: str | None, email: str, role: Role,
                 ip: str) -> Invitation:
    """Invite ``email`` to the team at this scope and queue the e-mail with the accept code.

    A pending invitation for the same address and scope is replaced (new code, role and
    expiry) and sent again rather than duplicated."""
    _person(inviter)
    address = normalize_email(email)
    _check_scope_role(product_id, role)
    if product_id is None and org.personal:
        raise BadRequest("A personal organization has no team; create an organization, or "
                         "invite people to one of its products", code="personal_org")
    if product_id is not None:
        product_org = (await db.execute(select(Product.org_id).where(Product.id == product_id))
                       ).scalar_one_or_none()
        if product_org != org.id:
            raise NotFound("Product not found")
    _check_grant(await _actor_role(db, inviter, org, product_id), role)
    invitee = await _user_by_username(db, address)
    if invitee is not None:
        if invitee.kind != "user":
            raise BadRequest("API users cannot be invited", code="invalid_username")
        if await _membership(db, invitee.id, org.id, product_id):
            raise Conflict(f"{address} is already a member of this team", code="already_member")

    inv = (await db.execute(select(Invitation).where(
        Invitation.org_id == org.id,
        Invitation.product_id.is_(None) if product_id is None
        else Invitation.product_id == product_id,
        Invitation.email == address, Invitation.status == PENDING,
    ).order_by(Invitation.id).limit(1).with_for_update())).scalar_one_or_none()
    resent = inv is not None
    if inv is None:
        inv = Invitation(org_id=org.id, product_id=product_id, email=address, status=PENDING)
        db.add(inv)
    code = new_token()
    inv.role = role.label
    inv.code_hash = digest(code)
    inv.invited_by_id = inviter.user_id
    inv.expires_at = clock.now() + dt.timedelta(seconds=settings.invite_lifetime_s)
    inv.responded_at = None
    await db.flush()

    subject, body = _invite_mail(settings, org=org, product_name=product_name,
                                 inviter=inviter.label, role=role, code=code,
                                 expires_at=inv.expires_at, invitation_id=inv.id)
    mail.enqueue(db, to=address, subject=subject, body=body,
                 kind="product.invite" if product_id is not None else "org.invite")
    audit.record(db, actor=inviter, ip=ip, action="team.invited", org_id=org.id,
                 product_id=product_id, target_type="invitation", target_id=inv.id,
                 details={"email": address, "role": role.label, "resent": resent})
    return inv


def _expired(inv: Invitation) -> bool:
    return inv.expires_at <= clock.now()


async def list_invitations(db: AsyncSession, *, org_id: int, product_id: int | None = None,
                           every_scope: bool = False) -> list[Invitation]:
    """Pending invitations (expired ones included, flagged in the JSON) at this scope, or of
    the whole organization and its products with ``every_scope``."""
    q = select(Invitation).where(Invitation.org_id == org_id, Invitation.status == PENDING)
    if not every_scope:
        q = q.where(Invitation.product_id.is_(None) if product_id is None
                    else Invitation.product_id == product_id)
    return list((await db.execute(q.order_by(Invitation.id))).scalars())


async def invitations_json(db: AsyncSession, rows: list[Invitation]) -> list[dict[str, Any]]:
    """Invitations with their organization, product and inviter spelled out."""
    org_ids = {i.org_id for i in rows}
    product_ids = {i.product_id for i in rows if i.product_id is not None}
    user_ids = {i.invited_by_id for i in rows if i.invited_by_id is not None}
    orgs = {o.id: o for o in (await db.execute(
        select(Organization).where(Organization.id.in_(org_ids)))).scalars()} if org_ids else {}
    products = {p.id: p for p in (await db.execute(
        select(Product).where(Product.id.in_(product_ids)))).scalars()} if product_ids else {}
    users = {uid: name for uid, name in (await db.execute(
        select(User.id, User.username).where(User.id.in_(user_ids)))).all()} if user_ids else {}
    out = []
    for i in rows:
        org = orgs.get(i.org_id)
        product = products.get(i.product_id) if i.product_id is not None else None
        out.append({
            "id": i.id, "username": i.email, "role": i.role, "status": i.status,
            "organization": ({"id": org.id, "name": org.name, "slug": org.slug}
                             if org else None),
            "product": ({"id": product.id, "name": product.name, "slug": product.slug}
                        if product else None),
            "invited_by": users.get(i.invited_by_id) if i.invited_by_id else None,
            "created_at": clock.iso(i.created_at), "expires_at": clock.iso(i.expires_at),
            "expired": _expired(i),
        })
    return out


async def revoke_invitation(db: AsyncSession, *, actor: Subject, actor_role: Role,
                            org: Organization, invitation_id: int, product_id: int | None = None,
                            every_scope: bool = False, ip: str) -> Invitation:
    """Withdraw a pending invitation of this scope (any scope of ``org`` with ``every_scope``)."""
    iid = path_id(invitation_id)
    inv = await db.get(Invitation, iid) if iid is not None else None
    if (inv is None or inv.org_id != org.id
            or (not every_scope and inv.product_id != product_id)):
        raise NotFound("Invitation not found", code="not_found")
    if inv.status != PENDING:
        raise NotFound(f"This invitation is no longer pending (it was {inv.status})",
                       code="invitation_not_pending")
    if Role.parse(inv.role) > actor_role:
        raise Forbidden("Only an Owner may grant or revoke the Owner role", code="forbidden")
    inv.status = "revoked"
    inv.responded_at = clock.now()
    audit.record(db, actor=actor, ip=ip, action="invite.revoked", org_id=org.id,
                 product_id=inv.product_id, target_type="invitation", target_id=inv.id,
                 details={"email": inv.email, "role": inv.role})
    await db.flush()
    return inv


async def user_invitations(db: AsyncSession, *, actor: Subject) -> list[Invitation]:
    """Pending, unexpired invitations addressed to the caller's username."""
    _person(actor)
    rows = (await db.execute(select(Invitation).where(
        Invitation.email == (actor.username or "").lower(), Invitation.status == PENDING,
        Invitation.expires_at > clock.now()).order_by(Invitation.id))).scalars()
    return list(rows)


def _check_open(inv: Invitation) -> None:
    if inv.status != PENDING:
        raise NotFound(f"This invitation is no longer pending (it was {inv.status})",
                       code="invitation_not_pending")
    if _expired(inv):
        raise BadRequest("This invitation has expired; ask for a new one",
                         code="invitation_expired")


async def _own_invitation(db: AsyncSession, actor: Subject, invitation_id: int) -> Invitation:
    iid = path_id(invitation_id)
    inv = await db.get(Invitation, iid) if iid is not None else None
    if inv is None or inv.email != (actor.username or "").lower():
        raise NotFound("Invitation not found", code="not_found")
    return inv


async def accept_invitation(db: AsyncSession, *, actor: Subject, invitation_id: int | None = None,
                            code: str | None = None, ip: str) -> Membership:
    """Join the team the invitation names, by its id (listed to the invitee) or by the secret
    code from the e-mail. A lower existing role is raised; a higher one is kept.

    Sign-up does not prove the e-mail address, so an account created after the invitation was
    sent must present the code (which only the mailbox has) rather than just the id."""
    user_id = _person(actor)
    if code is not None:
        inv = (await db.execute(select(Invitation).where(Invitation.code_hash == digest(code)))
               ).scalar_one_or_none()
        if inv is None:
            raise NotFound("No invitation has this code", code="not_found")
        if inv.email != (actor.username or "").lower():
            raise Forbidden("This invitation was sent to another e-mail address; sign in as "
                            "that user to accept it", code="wrong_user")
    elif invitation_id is not None:
        inv = await _own_invitation(db, actor, invitation_id)
    else:
        raise BadRequest("code is required", code="invalid_request")
    _check_open(inv)
    user = await db.get(User, user_id)
    if user is None:
        raise NotFound("User not found")
    if code is None and user.created_at > inv.created_at:
        raise Forbidden("This account was created after the invitation was sent; accept it "
                        "with the code from the e-mail (POST /v1/invitations/accept)",
                        code="code_required")

    org_id = inv.org_id
    if inv.product_id is not None:
        product_org = (await db.execute(select(Product.org_id).where(
            Product.id == inv.product_id))).scalar_one_or_none()
        if product_org is None:
            raise NotFound("The product of this invitation no longer exists")
        org_id = product_org
    role = Role.parse(inv.role)
    member = await _membership(db, user_id, org_id, inv.product_id)
    previous = Role.parse(member.role) if member else None
    if member is None:
        member = Membership(user_id=user_id, org_id=org_id, product_id=inv.product_id,
                            role=role.label)
        db.add(member)
    elif previous is not None and previous < role:
        member.role = role.label
    inv.status = "accepted"
    inv.responded_at = clock.now()
    audit.record(db, actor=actor, ip=ip, action="invite.accepted", org_id=org_id,
                 product_id=inv.product_id, target_type="invitation", target_id=inv.id,
                 details={"role": member.role,
                          "previous": previous.label if previous else None})
    await db.flush()
    return member


async def decline_invitation(db: AsyncSession, *, actor: Subject, invitation_id: int,
                             ip: str) -> Invitation:
    """Turn down an invitation addressed to the caller."""
    _person(actor)
    inv = await _own_invitation(db, actor, invitation_id)
    _check_open(inv)
    inv.status = "declined"
    inv.responded_at = clock.now()
    audit.record(db, actor=actor, ip=ip, action="invite.declined", org_id=inv.org_id,
                 product_id=inv.product_id, target_type="invitation", target_id=inv.id,
                 details={"role": inv.role})
    await db.flush()
    return inv
