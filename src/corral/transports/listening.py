"""What every device listener does the same way (shared by the transports)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Protocol


class Closable(Protocol):
    async def shutdown(self, reason: str) -> None: ...


SHUTDOWN_REASON = "The server is shutting down"


async def close_server(server: asyncio.AbstractServer, connections: Iterable[Closable], *,
                       wait_s: float = 5.0) -> None:
    """Stop accepting, end every open connection (reason: shutdown), then wait (bounded)
    for the listening socket to close."""
    server.close()
    await asyncio.gather(*(c.shutdown(SHUTDOWN_REASON) for c in list(connections)),
                         return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            await server.wait_closed()


__all__ = ["SHUTDOWN_REASON", "Closable", "close_server"]
