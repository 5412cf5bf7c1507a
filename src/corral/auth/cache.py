"""Short-lived, revocation-aware caches of who the caller is and what they may do (one of
each per process).

:class:`SubjectCache`, token → subject: resolving a bearer token costs a database round trip
on every authenticated request, and the answer changes only when a token, its user, its
customer or its OAuth client changes. :class:`TenantCache`, (caller, product) → the product,
the caller's role on it and the tenant checks' facts (``corral.products.access``): a product
route's guard reads them in one query, and they change only when a product, an
organization, a membership or a table a tenant check reads (the billing subscription)
changes. The tenant cache answers reads only (GET and HEAD): a write is always judged on
the role the database holds at that moment.

Entries are kept for ``CORRAL_TOKEN_CACHE_S`` / ``CORRAL_TENANT_CACHE_S`` seconds (default
10; 0 turns a cache off), and a cache is dropped at once when anything it was built from
changes:

* every transaction that writes a table a cache is built from marks itself — ORM objects or
  bulk statements, through any session — and when it commits, the process clears that
  cache (in SQLAlchemy's ``after_commit`` event, before the request answers) and tells the
  other nodes over the bus (``auth.changed``, naming the caches), whose caches clear when it
  arrives. The subject cache: an update or delete of ``access_tokens``, ``users``,
  ``customers`` or ``oauth_clients``, or the deletion of a product or an organization (the
  database's cascades remove their tokens). The tenant cache: an insert, update or delete of
  ``products``, ``organizations``, ``memberships`` or a tenant check's tables, or the
  deletion of a user (cascades remove their memberships). Revoking a token, signing out,
  changing a password, changing an API user's scopes, removing a user, a customer or an
  OAuth client, granting, changing or removing a team member's role, renaming a product,
  locking a subscription: all are such writes.
* a subject entry also carries the token's own expiry, checked on every hit.
* a lookup that read the database before a clear cannot store its (possibly stale) answer
  after it: entries are stored only if no clear happened since the lookup began
  (:attr:`TtlCache.generation`).

What the caches cannot see is a write that bypasses corral's sessions (SQL typed into the
database by hand, another process's CLI command): that is seen when the entry expires.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

from corral.auth.subject import Subject
from corral.kit import clock

AUTH_TABLES = frozenset({"access_tokens", "users", "customers", "oauth_clients"})
# what a guard reads with a tenant (the product, the caller's memberships, the organization:
# deleting one of the owners also removes tokens by the database's cascades, which no session
# sees), and the tables the tenant checks read (watch_tenant_tables): any write clears
TENANT_TABLES: set[str] = {"products", "organizations", "memberships"}
# the caches a write makes stale
SUBJECTS, TENANTS = "subjects", "tenants"
NOTHING: frozenset[str] = frozenset()
SUBJECTS_ONLY, TENANTS_ONLY = frozenset({SUBJECTS}), frozenset({TENANTS})
BOTH = SUBJECTS_ONLY | TENANTS_ONLY
OWNERS = frozenset({"products", "organizations"})  # deleting one deletes tokens (cascades)
CHANGED = "auth_changed"  # session.info: the caches this transaction's writes made stale
# session.info (from the sessionmaker): called with them after such a commit
HOOK = "auth_changed_hook"


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    until: float  # time.monotonic() deadline
    expires_at: dt.datetime | None  # the entry's own expiry (a token's), if any


class TtlCache(Generic[K, V]):
    """key → value, for ``ttl_s`` seconds, at most ``max_entries``; :meth:`clear` drops
    everything and bumps :attr:`generation`, so an answer read before a clear is not
    stored after it."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.generation = 0  # bumped by every clear
        self.hits = 0
        self.misses = 0
        self._entries: dict[K, _Entry[V]] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.until <= time.monotonic() or (
                entry.expires_at is not None and entry.expires_at <= clock.now()):
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self.hits += 1
        return entry.value

    def put(self, key: K, value: V, expires_at: dt.datetime | None,
            generation: int) -> None:
        """Store ``value`` unless the cache was cleared since ``generation`` was read."""
        if not self.enabled or generation != self.generation:
            return
        if len(self._entries) >= self.max_entries:  # full: drop the oldest tenth
            for old in list(itertools.islice(self._entries, self.max_entries // 10 + 1)):
                del self._entries[old]
        self._entries[key] = _Entry(value, time.monotonic() + self.ttl_s, expires_at)

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1


class SubjectCache(TtlCache[str, Subject]):
    """token digest → :class:`Subject` (an entry also ends with its token)."""


class TenantCache(TtlCache[tuple[Any, ...], tuple[Any, ...]]):
    """(caller, tenant key) → what a guard read of the tenant and the caller's role on it
    (``corral.products.access``); used for reads only (GET and HEAD)."""


def watch_tenant_tables(*names: str) -> None:
    """Writes to ``names`` also clear the tenant cache: a tenant check reads them (registered
    with :func:`corral.auth.guards.add_tenant_check`)."""
    TENANT_TABLES.update(names)


# --- noticing the writes that change a subject or a tenant --------------------------------

def _table(obj: Any) -> Any:
    return getattr(obj, "__tablename__", None)


def _changes(name: Any, write: str) -> frozenset[str]:
    """The caches a committed ``write`` ("insert", "update", "delete") to table ``name``
    makes stale. Deletes cascade: an owner's deletion removes tokens, a user's deletion
    their memberships."""
    if name in TENANT_TABLES:
        return BOTH if write == "delete" and name in OWNERS else TENANTS_ONLY
    if name in AUTH_TABLES and write != "insert":
        return BOTH if write == "delete" else SUBJECTS_ONLY
    return NOTHING


def _mark(info: dict[str, Any], caches: frozenset[str]) -> None:
    if caches:
        info[CHANGED] = info.get(CHANGED, NOTHING) | caches


@event.listens_for(Session, "after_flush")
def _flushed(session: Session, _ctx: Any) -> None:
    for objs, write in ((session.new, "insert"), (session.dirty, "update"),
                        (session.deleted, "delete")):
        for o in objs:
            _mark(session.info, _changes(_table(o), write))


@event.listens_for(Session, "do_orm_execute")
def _executed(state: ORMExecuteState) -> None:
    write = ("insert" if state.is_insert else "update" if state.is_update
             else "delete" if state.is_delete else None)
    if write is not None:
        name = getattr(getattr(state.statement, "table", None), "name", None)
        _mark(state.session.info, _changes(name, write))


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    caches: frozenset[str] | None = session.info.pop(CHANGED, None)
    if caches:
        hook: Callable[[dict[str, Any], frozenset[str]], None] | None = session.info.get(HOOK)
        if hook is not None:
            hook(session.info, caches)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(CHANGED, None)
