"""Shared test helpers: sign up, log in, authenticated requests."""

from __future__ import annotations

from typing import Any

import httpx

PASSWORD = "correct horse battery"


async def signup(client: httpx.AsyncClient, username: str, password: str = PASSWORD) -> None:
    r = await client.post("/v1/users", json={"username": username, "password": password})
    assert r.status_code == 200, r.text


async def login(client: httpx.AsyncClient, username: str, password: str = PASSWORD,
                **extra: Any) -> str:
    form = {"grant_type": "password", "username": username, "password": password,
            "client_id": "particle-api", "client_secret": "particle-api", **extra}
    r = await client.post("/oauth/token", data=form)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def new_user(client: httpx.AsyncClient, username: str) -> str:
    """Sign up and log in; returns a bearer token."""
    await signup(client, username)
    return await login(client, username)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
