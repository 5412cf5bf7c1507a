"""Password hashing with argon2id. Cost comes from settings (tests use a cheap one)."""

from __future__ import annotations

from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


@lru_cache(maxsize=4)
def _hasher(time_cost: int, memory_kib: int) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)


def hash_password(password: str, *, time_cost: int = 3, memory_kib: int = 65_536) -> str:
    return _hasher(time_cost, memory_kib).hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    if not stored:
        return False
    try:
        return _hasher(1, 8).verify(stored, password)  # parameters are read from the hash
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
