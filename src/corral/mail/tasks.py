"""The outbox deliverer: sends due rows, retries with backoff, survives restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.kit import clock
from corral.mail.backends import MailBackend
from corral.mail.models import OutboxMail
from corral.mail.service import backoff

log = logging.getLogger("corral.mail")
MAX_ATTEMPTS = 8


class Mailer:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], backend: MailBackend,
                 *, poll_s: float = 5.0) -> None:
        self.sessionmaker = sessionmaker
        self.backend = backend
        self.poll_s = poll_s
        self.woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self.woken.set()

    async def deliver_due(self, limit: int = 100) -> int:
        """Send what is due now; returns how many were sent."""
        sent = 0
        async with self.sessionmaker() as db:
            now = clock.now()
            rows = (await db.execute(
                select(OutboxMail)
                .where(OutboxMail.sent_at.is_(None), OutboxMail.next_attempt_at <= now,
                       OutboxMail.attempts < MAX_ATTEMPTS)
                .order_by(OutboxMail.id).limit(limit)
                # several nodes may run a deliverer: each row is claimed by one (PostgreSQL;
                # SQLite has a single writer and ignores this)
                .with_for_update(skip_locked=True)
            )).scalars().all()
            for mail in rows:
                mail.attempts += 1
                try:
                    await self.backend.send(mail.to_addr, mail.subject, mail.body)
                except Exception as exc:
                    mail.last_error = repr(exc)[:2000]
                    mail.next_attempt_at = clock.now() + backoff(mail.attempts)
                    log.warning("mail delivery failed", extra={"to": mail.to_addr,
                                                               "error": mail.last_error})
                else:
                    mail.sent_at = clock.now()
                    sent += 1
            await db.commit()
        return sent

    async def _run(self) -> None:
        while True:
            try:
                await self.deliver_due()
            except Exception:
                log.exception("mail outbox pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.woken.wait(), self.poll_s)
            self.woken.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mail-outbox")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
