"""The request's transaction: one per request, committed by the boundary, never by services.

Work to run only if the transaction commits (e-mail wake-ups, bus publishes) is queued with
:func:`after_commit`; it is dropped on rollback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session

from corral.kit.errors import Conflict

log = logging.getLogger(__name__)


@event.listens_for(Session, "after_flush")
def _flushed(session: Session, _ctx: Any) -> None:
    session.info["wrote"] = True


@event.listens_for(Session, "do_orm_execute")
def _executed(state: ORMExecuteState) -> None:
    if not state.is_select:  # core insert/update/delete through the session
        state.session.info["wrote"] = True


AWAIT_AFTER_COMMIT = "await_after_commit"  # session.info: tasks a commit waits for


def after_commit(db: AsyncSession, fn: Callable[[], Any]) -> None:
    db.info.setdefault("after_commit", []).append(fn)


async def commit(db: AsyncSession) -> None:
    """Commit, map a lost uniqueness race to 409, then run the after-commit hooks."""
    try:
        await db.commit()
    except IntegrityError as exc:
        await db.rollback()
        db.info.pop("after_commit", None)
        raise Conflict("That conflicts with an existing record") from exc
    db.info.pop("wrote", None)
    for fn in db.info.pop("after_commit", []):
        try:
            fn()
        except Exception:  # a side effect must not turn a committed write into an error
            log.exception("after-commit hook failed")
    # work started by commit events that must be done before the caller hears of the
    # commit (the other nodes told to drop cached tokens: corral.auth.cache)
    for task in db.info.pop(AWAIT_AFTER_COMMIT, []):
        try:
            await task
        except Exception:
            log.exception("after-commit task failed")


async def release(db: AsyncSession) -> None:
    """End the request's transaction early (committing what it wrote, if anything) so its
    pooled connection is not held during a long wait that needs no database, such as a
    device call or the event writer's commit. The session stays usable afterwards."""
    if db.new or db.dirty or db.deleted or db.info.get("wrote"):
        await commit(db)
    else:
        await db.close()


# request.scope keys: the request's session, and the mark of a handler that ends it
_SESSION = "corral.db"
_ENDS_SESSION = "corral.db.ended_by_route"
# scope keys of other objects made once per request that refer back to the request (the
# caller's context: corral.auth.deps), dropped when the route ends: left in the scope they
# form a cycle with it, which only the garbage collector frees, and the scope holds the
# request's whole graph (its session, FastAPI's exit stacks, ~56 objects). Collected that
# way, 20,000 allocations at a time, they paused a node 13-32 ms every ~0.4 s under load
# (bench/README B1); dropped here, reference counting frees them as the request ends.
REQUEST_SCOPED: set[str] = set()
# the same for attributes of ``request.state`` (kept in the scope's "state" dict)
REQUEST_STATE: set[str] = set()


async def get_db(request: Request) -> AsyncSession:
    """FastAPI dependency: the request's session. A :class:`TransactionRoute` ends it:
    commits when the route answered after writing, rolls back when it raised, and closes it
    in both cases, before the response is sent."""
    if _ENDS_SESSION not in request.scope:  # nothing would end it: a leaked connection
        raise RuntimeError(f"{request.url.path}: a route taking the request's session must be "
                           "a corral.db.session.TransactionRoute (APIRouter(route_class=...))")
    db: AsyncSession | None = request.scope.get(_SESSION)
    if db is None:
        db = request.scope[_SESSION] = request.app.state.sessionmaker()
    return db


async def _end(db: AsyncSession, failed: bool) -> None:
    try:
        if failed:
            db.info.pop("after_commit", None)
            await db.rollback()
        elif db.new or db.dirty or db.deleted or db.info.pop("wrote", False):
            await commit(db)
        # a read-only request ends with close() (a rollback): one round trip, not two
    finally:
        await db.close()


class TransactionRoute(APIRoute):
    """The route class of every router whose routes take the request's session
    (:func:`get_db`): its handler ends the session the route opened.

    What a ``yield`` dependency did, without FastAPI's machinery for one (an exit stack and
    a shielded cancel scope per request: ~7 % of a cached-token ``GET /v1/user``'s CPU,
    bench/README B1)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            scope = request.scope
            scope[_ENDS_SESSION] = True
            try:
                try:
                    response = await handler(request)
                except BaseException:
                    db = scope.pop(_SESSION, None)
                    if db is not None:  # cancelled or not, the connection goes back clean
                        await asyncio.shield(_end(db, failed=True))
                    raise
                db = scope.pop(_SESSION, None)
                if db is not None:
                    await _end(db, failed=False)
                return response
            finally:
                for key in REQUEST_SCOPED:
                    scope.pop(key, None)
                state = scope.get("state")
                if state:
                    for key in REQUEST_STATE:
                        state.pop(key, None)

        return handle
