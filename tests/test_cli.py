"""The ``corral`` CLI: admin commands on a local database, client commands over real HTTP.

The client tests talk to a real uvicorn server in a thread on a free 127.0.0.1 port, with
its own SQLite data directory (the CLI is an HTTP adapter; the database behind it does not
matter here, and the shared test database stays untouched).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner, Result

from corral.cli.main import app
from corral.kit.passwords import verify_password
from corral.settings import Settings
from corral.web.app import create_app

PASSWORD = "correct horse battery"
FAST_HASH = {"CORRAL_ARGON2_TIME_COST": "1", "CORRAL_ARGON2_MEMORY_KIB": "8"}
# variables from the developer's shell that would change what the CLI talks to
CLEAN_ENV: dict[str, str | None] = {"CORRAL_API_URL": None, "CORRAL_TOKEN": None,
                                    "CORRAL_DATABASE_URL": None, "CORRAL_DATA_DIR": None}

Cli = Callable[..., Result]


def invoke(args: list[str], env: dict[str, str | None], input: str | None = None) -> Result:
    return CliRunner().invoke(app, args, env={**CLEAN_ENV, **env}, input=input,
                              catch_exceptions=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- admin ------------------------------------------------------------------------------

def test_admin_create_user_then_list_users(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    env: dict[str, str | None] = {**FAST_HASH}

    r = invoke(["admin", "create-user", "Ada@Example.com", "--password", PASSWORD, *data], env)
    assert r.exit_code == 0, r.output
    assert "ada@example.com" in r.output
    assert (tmp_path / "data" / "corral.db").is_file()

    r = invoke(["admin", "create-user", "bob@example.com", "--password", PASSWORD, *data], env)
    assert r.exit_code == 0, r.output

    r = invoke(["admin", "list-users", "--json", *data], env)
    assert r.exit_code == 0, r.output
    users = json.loads(r.stdout)
    assert [(u["username"], u["kind"]) for u in users] == [
        ("ada@example.com", "user"), ("bob@example.com", "user")]

    r = invoke(["admin", "list-users", *data], env)
    assert r.exit_code == 0 and "bob@example.com" in r.output


def test_admin_errors_exit_1_with_the_reason(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    env: dict[str, str | None] = {**FAST_HASH}
    assert invoke(["admin", "create-user", "ada@example.com", "--password", PASSWORD, *data],
                  env).exit_code == 0

    r = invoke(["admin", "create-user", "ada@example.com", "--password", PASSWORD, *data], env)
    assert r.exit_code == 1
    assert "already taken" in r.output and "Traceback" not in r.output

    r = invoke(["admin", "create-user", "not-an-email", "--password", PASSWORD, *data], env)
    assert r.exit_code == 1 and "e-mail" in r.output

    r = invoke(["admin", "set-password", "ada@example.com", "--password", "short", *data], env)
    assert r.exit_code == 1 and "at least 8" in r.output

    r = invoke(["admin", "set-password", "nobody@example.com", "--password", PASSWORD, *data],
               env)
    assert r.exit_code == 1 and "No user" in r.output


def test_admin_set_password_and_migrate(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    env: dict[str, str | None] = {**FAST_HASH}
    r = invoke(["admin", "migrate", *data], env)
    assert r.exit_code == 0, r.output
    assert invoke(["admin", "create-user", "ada@example.com", "--password", PASSWORD, *data],
                  env).exit_code == 0

    # prompted (hidden, twice) when --password is missing
    r = invoke(["admin", "set-password", "ada@example.com", *data], env,
               input="a new passphrase\na new passphrase\n")
    assert r.exit_code == 0, r.output
    assert "a new passphrase" not in r.output
    with sqlite3.connect(tmp_path / "data" / "corral.db") as db:
        (hashed,) = db.execute("SELECT password_hash FROM users WHERE username = ?",
                               ("ada@example.com",)).fetchone()
    assert verify_password(hashed, "a new passphrase")
    assert not verify_password(hashed, PASSWORD)


# --- client commands against a live server ----------------------------------------------

@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """``create_app(settings)`` served by uvicorn in a thread on a free 127.0.0.1 port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None,
                                           access_log=False, ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # a busy machine imports slowly
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail("the test server did not start within 60 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop within 15 s"


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("live"), database_url=None,
                        argon2_time_cost=1, argon2_memory_kib=8, log_format="text")
    with serving(settings) as url:
        yield url


@pytest.fixture
def config_home(tmp_path: Path) -> Path:
    return tmp_path / "xdg"


@pytest.fixture
def cli(live_server: str, config_home: Path) -> Cli:
    """Run the CLI with its own config home, pointed at the live server."""

    def run(*args: str, env: dict[str, str | None] | None = None,
            input: str | None = None) -> Result:
        return invoke(list(args), {"XDG_CONFIG_HOME": str(config_home),
                                   "CORRAL_API_URL": live_server, **(env or {})}, input)

    return run


_users = iter(range(1_000_000))


@pytest.fixture
def user(live_server: str) -> str:
    """A fresh account on the live server."""
    username = f"user{next(_users)}@example.com"
    r = httpx.post(f"{live_server}/v1/users", json={"username": username, "password": PASSWORD},
                   timeout=10)
    assert r.status_code == 200, r.text
    return username


def login(cli: Cli, username: str) -> None:
    r = cli("login", "--username", username, "--password", PASSWORD)
    assert r.exit_code == 0, r.output


def test_login_stores_a_private_config_and_whoami(cli: Cli, user: str, live_server: str,
                                                  config_home: Path) -> None:
    login(cli, user)
    path = config_home / "corral" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["api_url"] == live_server and stored["username"] == user
    assert len(stored["token"]) == 40

    r = cli("whoami")
    assert r.exit_code == 0, r.output
    assert user in r.output and "(personal)" in r.output

    r = cli("whoami", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["username"] == user

    # the stored server is used when nothing else names one
    r = cli("whoami", env={"CORRAL_API_URL": None})
    assert r.exit_code == 0 and user in r.output


def test_login_prompts_for_missing_credentials(cli: Cli, user: str) -> None:
    r = cli("login", input=f"{user}\n{PASSWORD}\n")
    assert r.exit_code == 0, r.output
    assert PASSWORD not in r.output
    assert cli("whoami").exit_code == 0


def test_token_from_the_environment_or_option(cli: Cli, user: str, live_server: str) -> None:
    token = httpx.post(f"{live_server}/oauth/token", data={
        "grant_type": "password", "username": user, "password": PASSWORD,
        "client_id": "corral-cli", "client_secret": "corral-cli"}, timeout=10).json()["access_token"]
    r = cli("whoami", env={"CORRAL_TOKEN": token})
    assert r.exit_code == 0 and user in r.output
    r = cli("--token", token, "whoami")
    assert r.exit_code == 0 and user in r.output


def test_orgs_create_and_list(cli: Cli, user: str) -> None:
    login(cli, user)
    r = cli("orgs", "create", "Acme Corp")
    assert r.exit_code == 0, r.output
    assert "acme-corp" in r.output

    r = cli("orgs", "list")
    assert r.exit_code == 0, r.output
    assert "Acme Corp" in r.output
    assert "subscription" in r.output and "none" in r.output  # no subscription yet

    r = cli("orgs", "list", "--json")
    assert r.exit_code == 0, r.output
    orgs = json.loads(r.stdout)["organizations"]
    assert sorted((o["name"], o["personal"]) for o in orgs) == [
        ("Acme Corp", False), (f"{user.split('@')[0]} (personal)", True)]


def test_products_and_team(cli: Cli, user: str, live_server: str) -> None:
    login(cli, user)
    org = json.loads(cli("orgs", "create", "Gadgets", "--json").stdout)["organization"]["slug"]

    r = cli("products", "create", "Widget", "--org", org, "--platform-id", "12",
            "--description", "A test product", "--json")
    assert r.exit_code == 0, r.output
    product = json.loads(r.stdout)["product"]
    assert (product["name"], product["platform_id"], product["organization"]) == (
        "Widget", 12, org)

    r = cli("products", "create", "Personal Thing")
    assert r.exit_code == 0, r.output
    assert "personal-thing" in r.output

    r = cli("products", "list")
    assert r.exit_code == 0, r.output
    assert "Widget" in r.output and "Personal Thing" in r.output

    r = cli("products", "list", "--org", org, "--json")
    assert [p["name"] for p in json.loads(r.stdout)["products"]] == ["Widget"]

    r = cli("products", "get", product["slug"])
    assert r.exit_code == 0, r.output
    assert "A test product" in r.output

    r = cli("team", "invite", "friend@example.com", "--product", product["slug"],
            "--role", "Developer")
    assert r.exit_code == 0, r.output
    assert "friend@example.com" in r.output

    r = cli("team", "list", "--product", product["slug"], "--json")
    assert r.exit_code == 0, r.output
    assert user in [m["username"] for m in json.loads(r.stdout)["team"]]
    r = cli("team", "list", "--product", product["slug"])
    assert r.exit_code == 0 and user in r.output

    r = cli("team", "invite", "friend@example.com", "--product", product["slug"],
            "--role", "Emperor")
    assert r.exit_code == 1, r.output
    assert "role" in r.output.lower() and "Traceback" not in r.output


def test_api_errors_print_the_servers_message_and_exit_1(cli: Cli, user: str) -> None:
    r = cli("login", "--username", user, "--password", "wrong password")
    assert r.exit_code == 1
    assert "User credentials are invalid" in r.output

    r = cli("whoami")
    assert r.exit_code == 1 and "Not logged in" in r.output

    r = cli("--token", "0" * 40, "whoami")
    assert r.exit_code == 1
    assert "The access token provided is invalid" in r.output and "corral login" in r.output

    login(cli, user)
    r = cli("products", "get", "no-such-product")
    assert r.exit_code == 1 and "(HTTP 404)" in r.output
    assert "Traceback" not in r.output


def test_connection_refused_gives_a_hint(cli: Cli) -> None:
    r = cli("--api-url", f"http://127.0.0.1:{closed_port()}", "login", "-u", "a@example.com",
            "-p", PASSWORD)
    assert r.exit_code == 1
    assert "Cannot reach corral" in r.output and "corral serve" in r.output
    assert "Traceback" not in r.output


def test_stored_token_is_only_sent_to_its_server(cli: Cli, user: str) -> None:
    login(cli, user)
    r = cli("--api-url", f"http://127.0.0.1:{closed_port()}", "whoami")
    assert r.exit_code == 1 and "Not logged in" in r.output


def test_logout_revokes_the_token(cli: Cli, user: str, live_server: str,
                                  config_home: Path) -> None:
    login(cli, user)
    path = config_home / "corral" / "config.json"
    token = json.loads(path.read_text())["token"]

    r = cli("logout")
    assert r.exit_code == 0, r.output
    stored = json.loads(path.read_text())
    assert "token" not in stored and stored["api_url"] == live_server
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    r2 = httpx.get(f"{live_server}/v1/user", headers={"Authorization": f"Bearer {token}"},
                   timeout=10)
    assert r2.status_code == 401

    r = cli("whoami")
    assert r.exit_code == 1 and "Not logged in" in r.output
