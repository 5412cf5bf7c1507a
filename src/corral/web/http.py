"""The HTTP port's header-read timeout, as a uvicorn protocol.

uvicorn limits idle keep-alive time but not how long a connection may take to send its
(first) request's headers, so a client can hold a connection forever with no request or a
trickle of one. :func:`header_timeout_protocol` gives each connection ``timeout_s`` to finish
its request headers (again after every response): when that passes, the connection is closed
without an answer. No 408: a browser's preconnected socket that never sent a byte is closed
quietly, and the browser simply opens another.
"""

from __future__ import annotations

import asyncio
from typing import Any


def header_timeout_protocol(base: type[Any], timeout_s: float) -> type[Any]:
    """``base`` (a uvicorn HTTP protocol class) with the header-read timeout."""

    class HeaderTimeout(base):  # type: ignore[misc,valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _head_timeout(self) -> None:
            self._head_timer = None
            # no request is being answered: none has completed its headers since the
            # connection opened (or since the last response)
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    HeaderTimeout.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeout


def http_protocol(timeout_s: float) -> type[Any] | str:
    """What ``corral serve`` passes as uvicorn's ``http``: the protocol uvicorn would pick
    ("auto": httptools when installed, else h11), with the timeout unless it is 0."""
    if timeout_s <= 0:
        return "auto"
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return header_timeout_protocol(AutoHTTPProtocol, timeout_s)
