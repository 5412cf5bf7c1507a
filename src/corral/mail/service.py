"""Queue e-mail in the caller's transaction; a backend delivers it after commit."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.ext.asyncio import AsyncSession

from corral.db.session import after_commit
from corral.kit import clock
from corral.mail.models import OutboxMail


def enqueue(db: AsyncSession, *, to: str, subject: str, body: str, kind: str) -> OutboxMail:
    now = clock.now()
    mail = OutboxMail(to_addr=to, subject=subject, body=body, kind=kind, created_at=now,
                      next_attempt_at=now)
    db.add(mail)
    wake = db.info.get("wake_mailer")
    if wake is not None:
        after_commit(db, wake)
    return mail


def backoff(attempts: int) -> dt.timedelta:
    return dt.timedelta(seconds=min(3600, 10 * 2 ** max(0, attempts - 1)))
