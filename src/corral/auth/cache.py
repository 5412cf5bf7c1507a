"""A short-lived, revocation-aware cache of token → subject (one per process).

Resolving a bearer token costs a database round trip on every authenticated request; the
answer changes only when a token, its user, its customer or its OAuth client changes.
So the subject is kept for ``CORRAL_TOKEN_CACHE_S`` seconds (default 10; 0 turns the cache
off), and it is dropped at once when anything it was built from changes:

* every transaction that updates or deletes a row of ``access_tokens``, ``users``,
  ``customers`` or ``oauth_clients``, or deletes a product or an organization (whose
  cascades remove tokens) — ORM objects or bulk statements, through any session — marks
  itself; when it commits, the process clears its cache (in SQLAlchemy's
  ``after_commit`` event, before the request answers) and tells the other nodes over the
  bus (``auth.changed``), whose caches clear when it arrives. Revoking a token, signing out,
  changing a password, changing an API user's scopes, removing a user, a customer or an
  OAuth client: all are such writes.
* an entry also carries the token's own expiry, checked on every hit.
* a lookup that read the database before a clear cannot store its (possibly stale) answer
  after it: entries are stored only if no clear happened since the lookup began
  (:attr:`SubjectCache.generation`).

Roles are never cached: a guard reads the caller's role with the tenant in one query on
each request (``corral.products.access``), so a role change applies to the next request.

What the cache cannot see is a write that bypasses corral's sessions (SQL typed into the
database by hand): that is seen when the entry expires.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

from corral.auth.subject import Subject
from corral.kit import clock

AUTH_TABLES = frozenset({"access_tokens", "users", "customers", "oauth_clients"})
# their owners: deleting one removes tokens by the database's cascades, which no session sees
OWNER_TABLES = frozenset({"products", "organizations"})
CHANGED = "auth_changed"  # session.info flag: this transaction wrote a table above
HOOK = "auth_changed_hook"  # session.info (from the sessionmaker): called after such a commit


@dataclass(frozen=True, slots=True)
class _Entry:
    subject: Subject
    until: float  # time.monotonic() deadline
    expires_at: dt.datetime | None  # the token's own expiry


class SubjectCache:
    """token digest → :class:`Subject`, for ``ttl_s`` seconds, at most ``max_entries``."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.generation = 0  # bumped by every clear
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, _Entry] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Subject | None:
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
        return entry.subject

    def put(self, key: str, subject: Subject, expires_at: dt.datetime | None,
            generation: int) -> None:
        """Store ``subject`` unless the cache was cleared since ``generation`` was read."""
        if not self.enabled or generation != self.generation:
            return
        if len(self._entries) >= self.max_entries:  # full: drop the oldest tenth
            for old in list(itertools.islice(self._entries, self.max_entries // 10 + 1)):
                del self._entries[old]
        self._entries[key] = _Entry(subject, time.monotonic() + self.ttl_s, expires_at)

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1


# --- noticing the writes that change a subject --------------------------------------------

def _table(obj: Any) -> Any:
    return getattr(obj, "__tablename__", None)


@event.listens_for(Session, "after_flush")
def _flushed(session: Session, _ctx: Any) -> None:
    if any(_table(o) in AUTH_TABLES for o in itertools.chain(session.dirty, session.deleted)) \
            or any(_table(o) in OWNER_TABLES for o in session.deleted):
        session.info[CHANGED] = True


@event.listens_for(Session, "do_orm_execute")
def _executed(state: ORMExecuteState) -> None:
    if state.is_update or state.is_delete:
        name = getattr(getattr(state.statement, "table", None), "name", None)
        if name in AUTH_TABLES or (state.is_delete and name in OWNER_TABLES):
            state.session.info[CHANGED] = True


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    if session.info.pop(CHANGED, False):
        hook: Callable[[dict[str, Any]], None] | None = session.info.get(HOOK)
        if hook is not None:
            hook(session.info)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(CHANGED, None)
