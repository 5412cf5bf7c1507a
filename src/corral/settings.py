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
    firmware_max_bytes: int = Field(default=8 * 1_048_576, ge=1024)  # one firmware binary

    # --- firmware delivery (corral.firmware.delivery)
    firmware_max_transfers: int = Field(default=50, ge=1)  # transfers at once on one node
    firmware_max_attempts: int = Field(default=5, ge=1)  # per update; then it is failed
    firmware_retry_backoff_s: float = Field(default=30.0, ge=0)  # doubles per attempt
    firmware_retry_backoff_max_s: float = Field(default=3600.0, ge=0)
    firmware_download_ttl_s: int = Field(default=900, ge=10)  # MQTT download links
    firmware_download_chunk_bytes: int = Field(default=1_048_576, ge=1024)  # Range size offered
    firmware_transfer_timeout_s: float = Field(default=300.0, gt=0)  # MQTT: silence allowed
    # HMAC key of download links; default: a random key kept in data_dir/firmware/
    firmware_download_secret: str | None = None

    # --- device transports (the device-session core serves both)
    mqtt_port: int = Field(default=1883, ge=0, le=65535, description="MQTT (plain); 0 = off")
    mqtt_tls_port: int = Field(default=8883, ge=0, le=65535, description="MQTT over TLS; 0 = off")
    mqtt_tls_cert: Path | None = Field(
        default=None, description="Server certificate (PEM) for MQTT/TLS; default: "
        "a self-signed one created in data_dir")
    mqtt_tls_key: Path | None = None
    mqtt_max_packet_bytes: int = Field(default=65_536, ge=1024)
    mqtt_connect_timeout_s: float = Field(default=10.0, gt=0)  # CONNECT must arrive within
    mqtt_max_keepalive_s: int = Field(default=1200, ge=10)  # keep-alive the server grants at most
    mqtt_session_expiry_s: int = Field(default=3600, ge=0)  # persistent sessions kept at most
    particle_port: int = Field(default=5683, ge=0, le=65535,
                               description="Particle device protocol (TCP); 0 = off")
    particle_handshake_timeout_s: float = Field(default=20.0, gt=0)  # each handshake step
    particle_max_handshakes: int = Field(default=128, ge=1)  # in progress at once; others wait
    particle_ping_interval_s: float = Field(default=30.0, gt=0)  # ping a device silent this long
    particle_keepalive_timeout_s: float = Field(default=60.0, gt=0)  # drop one silent this long
    # connections the kernel holds for a device listener before it accepts them (capped by
    # net.core.somaxconn). A fleet reconnecting at once overflows a short queue, and a
    # connection dropped there waits out SYN-ACK retransmissions (~1 min) before it gets in.
    device_listen_backlog: int = Field(default=4096, ge=1)

    # --- device traffic rules (per product overrides in product settings)
    event_data_max_bytes: int = Field(default=1024, ge=1, le=16_384)
    event_rate_per_s: float = Field(default=1.0, gt=0)  # average publishes per device
    event_rate_burst: int = Field(default=4, ge=1)
    event_retention_days: int = Field(default=30, ge=1)
    device_call_timeout_s: float = Field(default=30.0, gt=0)  # functions and variables
    function_arg_max_bytes: int = Field(default=1024, ge=1)
    max_functions: int = Field(default=20, ge=1)
    max_variables: int = Field(default=20, ge=1)
    presence_flush_s: float = Field(default=1.0, gt=0)  # last_heard batching
    # usage gate refresh (plans, limits, pause); also at once after a plan change
    metering_refresh_s: float = Field(default=5.0, gt=0)
    sse_keepalive_s: float = Field(default=9.0, gt=0)
    sse_queue_max: int = Field(default=1000, ge=1)  # events a slow SSE client may lag behind

    # --- e-mail outbox backend
    email_backend: Literal["log", "smtp"] = "log"
    email_from: str = "corral@localhost"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False

    # --- billing: subscriptions and payments (corral.billing)
    payment_provider: Literal["fake", "stripe"] = "fake"
    stripe_api_key: str | None = None
    billing_currency: str = Field(default="usd", min_length=3, max_length=3)
    # per team member per month, by plan code ("default": any other plan); an annual
    # interval charges 12 months at once. Env: JSON, e.g. {"default": 4900, "plus": 9900}
    billing_seat_price_cents: dict[str, int] = Field(default_factory=lambda: {"default": 4900})
    billing_retry_interval_s: int = Field(default=3 * 86_400, ge=1)  # between charge retries
    billing_max_retries: int = Field(default=3, ge=0)  # after the first attempt; then locked
    billing_tick_s: float = Field(default=300.0, gt=0)  # renewals, retries, seat counts

    # --- the CLI's client side
    api_url: str = "http://127.0.0.1:8080"
    token: str | None = None
    # where `corral login` keeps its token: $XDG_CONFIG_HOME/corral/config.json
    xdg_config_home: Path | None = Field(default=None, validation_alias="XDG_CONFIG_HOME")

    # --- `corral serve --demo`: an owner account, an organization and a product to try things
    demo: bool = False
    demo_username: str = "demo@corral.example"  # .local is refused as an e-mail domain
    demo_password: str = "corral-demo"
    demo_simulated_devices: int = Field(default=5, ge=0)  # live MQTT devices `serve --demo` runs

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
