"""Injected time. Code asks ``clock.now()``; tests move a :class:`ManualClock`."""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class ManualClock:
    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, seconds: float = 0, **kw: float) -> None:
        self._now += dt.timedelta(seconds=seconds, **kw)

    def set(self, when: dt.datetime) -> None:
        self._now = when


_clock: Clock = SystemClock()


def now() -> dt.datetime:
    """The current UTC time, from the installed clock."""
    return _clock.now()


def install(clock: Clock) -> Clock:
    """Install a clock (tests); returns the previous one."""
    global _clock
    previous, _clock = _clock, clock
    return previous


def iso(when: dt.datetime | None) -> str | None:
    """Particle's timestamp format: ISO 8601 UTC with milliseconds and ``Z``."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def aware(when: dt.datetime | None) -> dt.datetime | None:
    """Make a datetime read back from SQLite (naive) timezone-aware UTC."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=dt.UTC)
