"""The request's transaction: one per request, committed by the boundary, never by services.

Work to run only if the transaction commits (e-mail wake-ups, bus publishes) is queued with
:func:`after_commit`; it is dropped on rollback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
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


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency (use with ``scope="function"``): commit on success, else roll back."""
    async with request.app.state.sessionmaker() as db:
        try:
            yield db
        except BaseException:
            await db.rollback()
            db.info.pop("after_commit", None)
            raise
        else:
            if db.new or db.dirty or db.deleted or db.info.pop("wrote", False):
                await commit(db)
            # a read-only request ends with close() (a rollback): one round trip, not two
