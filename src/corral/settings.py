"""Typed settings. The only module that reads the environment (prefix ``CORRAL_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORRAL_", env_nested_delimiter="__", extra="ignore"
    )

    # --- where and how to serve
    data_dir: Path = Field(default=Path("corral-data"), description="Directory for SQLite and keys")
    host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = Field(
        default=None, description="External base URL used in links (e-mails); default http://host:port"
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default: SQLite in data_dir"
    )
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # --- credentials
    token_lifetime_s: int = 7_776_000  # Particle default: 90 days
    refresh_token_lifetime_s: int = 1_209_600  # 14 days beyond the access token
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65_536
    login_max_failures: int = 10
    login_lockout_s: int = 1_800
    invite_lifetime_s: int = 14 * 86_400

    # --- HTTP input limits
    max_body_bytes: int = 1_048_576
    max_import_bytes: int = 16 * 1_048_576  # device-ID imports and key uploads

    # --- e-mail outbox backend
    email_backend: Literal["log", "smtp"] = "log"
    email_from: str = "corral@localhost"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False

    # --- the CLI's client side
    api_url: str = "http://127.0.0.1:8080"
    token: str | None = None
    # where `corral login` keeps its token: $XDG_CONFIG_HOME/corral/config.json
    xdg_config_home: Path | None = Field(default=None, validation_alias="XDG_CONFIG_HOME")

    # --- `corral serve --demo`: an owner account, an organization and a product to try things
    demo: bool = False
    demo_username: str = "demo@corral.example"  # .local is refused as an e-mail domain
    demo_password: str = "corral-demo"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'corral.db').resolve()}"

    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.http_port}"

    def cli_config_path(self) -> Path:
        """Where ``corral login`` keeps its token: ``$XDG_CONFIG_HOME/corral/config.json``."""
        xdg = self.xdg_config_home  # the XDG spec ignores an empty or relative value
        base = xdg if xdg and xdg.is_absolute() else Path.home() / ".config"
        return base / "corral" / "config.json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
