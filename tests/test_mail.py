"""The e-mail outbox: rows written with the change, delivered after commit, retried on
failure; the SMTP backend speaks real SMTP (to a minimal sink on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from corral.kit import clock
from corral.mail.backends import SmtpBackend
from corral.mail.models import OutboxMail
from corral.mail.service import enqueue
from corral.mail.tasks import Mailer
from corral.settings import Settings


class SmtpSink:
    """Just enough SMTP (RFC 5321) to accept messages: records the DATA of each one."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        data: list[str] | None = None
        while line := await reader.readline():
            text = line.decode()
            if data is not None:
                if text == ".\r\n":
                    self.messages.append("".join(data))
                    data = None
                    writer.write(b"250 queued\r\n")
                else:
                    data.append(text)
                continue
            verb = text[:4].upper()
            if verb in ("EHLO", "HELO"):
                writer.write(b"250 sink\r\n")
            elif verb == "DATA":
                data = []
                writer.write(b"354 go on\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:  # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def smtp_sink() -> AsyncIterator[tuple[SmtpSink, int]]:
    sink = SmtpSink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield sink, port
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


async def test_smtp_backend_delivers(app, smtp_sink):
    sink, port = smtp_sink
    settings = Settings(smtp_host="127.0.0.1", smtp_port=port, email_from="corral@example.com")
    mailer = Mailer(app.state.sessionmaker, SmtpBackend(settings))
    async with app.state.sessionmaker() as db:
        enqueue(db, to="ops@example.com", subject="Hello", body="Body text", kind="test")
        await db.commit()
    assert await asyncio.wait_for(mailer.deliver_due(), 20) == 1
    assert len(sink.messages) == 1
    msg = sink.messages[0]
    assert "To: ops@example.com" in msg and "Subject: Hello" in msg and "Body text" in msg
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(OutboxMail))).scalar_one()
        assert row.sent_at is not None and row.attempts == 1


async def test_failed_delivery_is_retried_with_backoff(app, manual_clock):
    class Down:
        calls = 0

        async def send(self, to: str, subject: str, body: str) -> None:
            Down.calls += 1
            raise ConnectionRefusedError("smtp down")

    mailer = Mailer(app.state.sessionmaker, Down())
    async with app.state.sessionmaker() as db:
        enqueue(db, to="ops@example.com", subject="S", body="B", kind="test")
        await db.commit()
    assert await mailer.deliver_due() == 0
    assert await mailer.deliver_due() == 0  # not due yet: backoff
    assert Down.calls == 1
    manual_clock.advance(11)
    await mailer.deliver_due()
    assert Down.calls == 2
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(OutboxMail))).scalar_one()
        assert row.sent_at is None and row.attempts == 2 and "smtp down" in row.last_error
        assert row.next_attempt_at > clock.now()


async def test_nothing_is_sent_for_a_rolled_back_change(app, mailbox):
    async with app.state.sessionmaker() as db:
        enqueue(db, to="ops@example.com", subject="S", body="B", kind="test")
        await db.rollback()
    await app.state.runtime.mailer.deliver_due()
    assert mailbox.sent == []
