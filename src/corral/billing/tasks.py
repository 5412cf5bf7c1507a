"""The clock's side of billing: renewals, retries and period ends (:func:`advance` per
subscription) and the monthly statements, one organization per transaction."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.billing import statements
from corral.billing.models import ACTIVE, CANCELED, INCOMPLETE, PAST_DUE, Subscription
from corral.billing.providers import PaymentProvider
from corral.billing.service import advance
from corral.db.session import commit
from corral.kit import clock
from corral.settings import Settings

log = logging.getLogger("corral.billing")


class BillingService:
    """The clock's side of billing: :meth:`tick` brings every live subscription up to
    ``now``, one organization per transaction. Tests call it while moving a ManualClock;
    :meth:`run` is the server's loop."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings,
                 provider: PaymentProvider) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.provider = provider
        self._statements_through: dt.date | None = None  # every statement up to this month

    async def tick(self, now: dt.datetime | None = None) -> int:
        """Process every subscription that may have work; returns how many were visited."""
        now = now or clock.now()
        async with self.sessionmaker() as db:
            ids = list((await db.execute(select(Subscription.id).where(
                Subscription.status.in_((ACTIVE, PAST_DUE, CANCELED)))
                .order_by(Subscription.id))).scalars())
        for sub_id in ids:
            try:
                async with self.sessionmaker() as db:
                    sub = (await db.execute(select(Subscription).where(
                        Subscription.id == sub_id).with_for_update())).scalar_one_or_none()
                    if sub is None:
                        continue
                    await advance(db, self.settings, self.provider, sub, now)
                    await commit(db)
            except Exception:
                log.exception("billing: subscription %s failed to advance", sub_id)
        await self.statements(now)
        return len(ids)

    async def statements(self, now: dt.datetime | None = None) -> int:
        """Write the monthly statements owed at ``now`` (:mod:`corral.billing.statements`),
        one organization per transaction; a no-op until the next month closes once every
        organization is done. Returns how many were written."""
        now = now or clock.now()
        month = statements.last_closed_month(now)
        if self._statements_through == month:
            return 0
        async with self.sessionmaker() as db:
            ids = list((await db.execute(select(Subscription.id).where(
                Subscription.status != INCOMPLETE).order_by(Subscription.id))).scalars())
        written, failed = 0, False
        for sub_id in ids:
            try:
                async with self.sessionmaker() as db:
                    sub = await db.get(Subscription, sub_id)
                    if sub is None:
                        continue
                    written += len(await statements.issue_due(db, sub, now))
                    await commit(db)
            except IntegrityError:  # another server wrote the same statement first
                log.info("billing: statement of subscription %s written concurrently", sub_id)
            except Exception:
                failed = True
                log.exception("billing: statements of subscription %s failed", sub_id)
        if not failed:
            self._statements_through = month
        return written

    async def run(self) -> None:
        import asyncio

        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("billing tick failed")
            await asyncio.sleep(self.settings.billing_tick_s)
