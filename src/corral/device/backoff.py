"""Reconnect delays: exponential with "equal jitter", capped."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """The n-th delay is uniform in ``[d/2, d]`` with ``d = min(maximum, initial * factor**n)``.

    Half of the delay is random so that many devices dropped at once (a server restart) do
    not come back in lock-step; the other half keeps each device from retrying too soon.
    """

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, factor: float = 2.0,
                 rng: Callable[[], float] = random.random) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.attempt = 0
        self._rng = rng

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # min() first: factor**attempt may overflow a float after many failures
        exp = min(self.attempt, 1024)
        try:
            d = self.initial * self.factor**exp
        except OverflowError:
            d = self.maximum
        return min(self.maximum, d)

    def next(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        d = self.ceiling()
        self.attempt += 1
        return d / 2 + self._rng() * d / 2

    def reset(self) -> None:
        """Start again from ``initial`` (after a connection that worked)."""
        self.attempt = 0
