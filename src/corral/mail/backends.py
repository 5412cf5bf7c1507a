"""E-mail backends, chosen by ``CORRAL_EMAIL_BACKEND``: ``log`` (default) or ``smtp``."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage
from typing import Protocol

from corral.settings import Settings

log = logging.getLogger("corral.mail")


class MailBackend(Protocol):
    async def send(self, to: str, subject: str, body: str) -> None: ...


class LogBackend:
    """Writes each message to the log (and keeps it for inspection in-process)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    async def send(self, to: str, subject: str, body: str) -> None:
        self.sent.append((to, subject, body))
        log.info("mail", extra={"to": to, "subject": subject, "body": body})


class SmtpBackend:
    def __init__(self, settings: Settings) -> None:
        self.s = settings

    def _send_sync(self, to: str, subject: str, body: str) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = self.s.email_from, to, subject
        msg.set_content(body)
        with smtplib.SMTP(self.s.smtp_host, self.s.smtp_port, timeout=30) as smtp:
            if self.s.smtp_starttls:
                smtp.starttls()
            if self.s.smtp_username:
                smtp.login(self.s.smtp_username, self.s.smtp_password or "")
            smtp.send_message(msg)

    async def send(self, to: str, subject: str, body: str) -> None:
        await asyncio.to_thread(self._send_sync, to, subject, body)


def make_backend(settings: Settings) -> MailBackend:
    return SmtpBackend(settings) if settings.email_backend == "smtp" else LogBackend()
