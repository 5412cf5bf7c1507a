"""Typed settings. The only module that reads the environment (prefix ``CORRAL_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
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
    # PostgreSQL connections one process keeps open, and how many more it may open for a
    # burst (closed again when returned); None: corral.db.engine's PG_POOL_SIZE (30) and
    # PG_MAX_OVERFLOW (10). Nodes x (pool + overflow) must stay under max_connections.
    database_pool_size: int | None = Field(default=None, ge=1, le=1000)
    database_max_overflow: int | None = Field(default=None, ge=0, le=1000)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # --- many nodes (docs/deploy.md): NATS between the nodes, PostgreSQL for all of them
    bus_url: str | None = Field(
        default=None, description="nats://host:4222 (several: comma-separated) to run as one "
        "node of many; default: the in-process bus of a single node")
    bus_namespace: str = Field(default="corral", pattern=r"^[A-Za-z0-9_-]+$",
                               description="Subject prefix on NATS (one per corral cluster)")
    node_role: Literal["all", "api", "gateway", "worker"] = "all"
    node_heartbeat_s: float = Field(default=5.0, gt=0)  # a node's registry heartbeat
    # a node whose heartbeat is this old is dead: its devices are marked offline by another
    node_dead_after_s: float = Field(default=15.0, gt=0)
    lease_ttl_s: float = Field(default=15.0, gt=0)  # singleton work fails over after this

    # the youngest generation's collection threshold once start-up is done (kit/heap; 0 keeps
    # Python's 700): rarer young collections while requests allocate
    gc_gen0_threshold: int = Field(default=20_000, ge=0, le=10_000_000)
    # FastAPI's own OpenTelemetry spans, metrics and logs of HTTP requests, exported through
    # the providers a process configures (opentelemetry-sdk); off, a request does not look
    # the providers up (web/app)
    http_telemetry: bool = False

    # --- credentials
    token_lifetime_s: int = 7_776_000  # Particle default: 90 days
    # token -> subject kept this long per process; cleared at once on any change (auth/cache)
    token_cache_s: float = Field(default=10.0, ge=0, le=3600)
    # (caller, product) -> product, role, tenant facts, for reads; cleared likewise
    tenant_cache_s: float = Field(default=10.0, ge=0, le=3600)
    refresh_token_lifetime_s: int = 1_209_600  # 14 days beyond the access token
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65_536
    login_max_failures: int = 10
    login_lockout_s: int = 1_800
    invite_lifetime_s: int = 14 * 86_400
    console_session_s: int = Field(default=14 * 86_400, ge=60)  # a web console sign-in

    # --- HTTP input limits
    # Particle's API rate limit: requests per source address per window (0 = off)
    api_rate_limit: int = Field(default=10_000, ge=0)
    api_rate_window_s: float = Field(default=300.0, gt=0)
    # proxies whose X-Forwarded-For is believed (IPs and CIDR networks, comma-separated);
    # nobody's by default: the socket's peer is the client
    trusted_proxies: str = ""
    # a connection must finish its request headers within this long (an idle or slow one is
    # closed without an answer); 0 = no limit
    http_header_timeout_s: float = Field(default=15.0, ge=0)
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
    # binaries flashed to single devices (PUT /v1/devices/:id) are kept this long
    firmware_binary_retention_days: int = Field(default=30, ge=1)

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
    # of those, at most this many for one peer address (one host never locks others out)
    particle_max_handshakes_per_address: int = Field(default=64, ge=1)
    particle_ping_interval_s: float = Field(default=30.0, gt=0)  # ping a device silent this long
    particle_keepalive_timeout_s: float = Field(default=60.0, gt=0)  # drop one silent this long
    particle_udp_port: int = Field(default=5684, ge=0, le=65535,
                                   description="Particle Gen 3 devices (DTLS over UDP); 0 = off")
    # DTLS handshakes in progress at once (each passed the stateless cookie), and per address
    particle_udp_max_handshakes: int = Field(default=4096, ge=1)
    particle_udp_max_handshakes_per_address: int = Field(default=64, ge=1)
    # DTLS sessions kept for resumption (Device OS resumes with no handshake); the least
    # recently heard is forgotten beyond this
    particle_udp_max_sessions: int = Field(default=200_000, ge=1)
    # a UDP device silent this long goes offline (Device OS pings every 25 s on Wi-Fi, every
    # 23 min on cellular); its DTLS session is kept, so it resumes without a handshake
    particle_udp_keepalive_timeout_s: float = Field(default=1500.0, gt=0)
    # the UDP socket's receive and send buffers (capped by net.core.rmem_max/wmem_max): one
    # socket takes every Gen 3 device's datagrams, and a reconnect storm arrives in bursts
    particle_udp_socket_buffer_bytes: int = Field(default=4 * 1024 * 1024, ge=65_536)
    # connections the kernel holds for a device listener before it accepts them (capped by
    # net.core.somaxconn). A fleet reconnecting at once overflows a short queue, and a
    # connection dropped there waits out SYN-ACK retransmissions (~1 min) before it gets in.
    device_listen_backlog: int = Field(default=4096, ge=1)
    # several processes on one machine share the HTTP and device ports (`serve --workers`):
    # each binds them with SO_REUSEPORT and the kernel spreads new connections over them
    listen_reuse_port: bool = False

    # --- device traffic rules (per product overrides in product settings)
    event_data_max_bytes: int = Field(default=1024, ge=1, le=16_384)
    event_rate_per_s: float = Field(default=1.0, gt=0)  # average publishes per device
    event_rate_burst: int = Field(default=4, ge=1)
    event_retention_days: int = Field(default=30, ge=1)
    # fleet health (corral.fleet): vitals reports, per-minute and hourly rollups
    vitals_retention_days: int = Field(default=31, ge=1)
    fleet_minute_retention_days: int = Field(default=7, ge=1)
    fleet_hour_retention_days: int = Field(default=186, ge=1)
    device_call_timeout_s: float = Field(default=30.0, gt=0)  # functions and variables
    function_arg_max_bytes: int = Field(default=1024, ge=1)
    max_functions: int = Field(default=20, ge=1)
    max_variables: int = Field(default=20, ge=1)
    presence_flush_s: float = Field(default=1.0, gt=0)  # last_heard batching
    # usage gate refresh (plans, limits, pause); also at once after a plan change
    metering_refresh_s: float = Field(default=5.0, gt=0)
    sse_keepalive_s: float = Field(default=9.0, gt=0)
    sse_queue_max: int = Field(default=1000, ge=1)  # events a slow SSE client may lag behind

    # --- integrations: webhooks and MQTT forwarding (corral.integrations)
    # targets allowed although they are loopback, private, link-local or metadata
    # addresses: comma-separated host names, IP addresses and CIDR networks
    integrations_allow_hosts: str = ""
    integrations_timeout_s: float = Field(default=20.0, gt=0)  # one request, end to end
    integrations_concurrency: int = Field(default=8, ge=1)  # requests in flight per integration
    integrations_target_concurrency: int = Field(default=32, ge=1)  # per target host and port
    integrations_max_attempts: int = Field(default=8, ge=1)  # per event; then failed
    integrations_retry_base_s: float = Field(default=10.0, ge=0)  # doubles per attempt (jitter)
    integrations_retry_max_s: float = Field(default=3600.0, ge=0)  # longest wait between tries
    integrations_throttle_after: int = Field(default=5, ge=1)  # failures in a row: one at a time
    # a target failing for this long (and at least `integrations_disable_min_failures`
    # times in a row) is disabled, with an e-mail and an audit entry
    integrations_disable_after_s: float = Field(default=86_400.0, ge=0)
    integrations_disable_min_failures: int = Field(default=20, ge=1)
    integrations_log_keep: int = Field(default=500, ge=10)  # delivery-log rows per integration
    integrations_poll_s: float = Field(default=1.0, gt=0)  # outbox poll (other nodes' events)
    # while this node's device ingest commits more events per second than this, its
    # deliveries give way (one request at a time, at most ~1/5 of the time; the outbox keeps
    # the rest for quieter moments); 0: never. A worker node (--role worker) has no ingest.
    integrations_yield_above: float = Field(default=1000.0, ge=0)

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
    # SQLite: how often the planner's statistics are refreshed (ANALYZE, sampled; also at
    # start); 0 never. PostgreSQL analyzes by itself.
    sqlite_analyze_s: float = Field(default=3600.0, ge=0)

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

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: str) -> str:
        import ipaddress

        for part in value.split(","):
            if part.strip():
                try:
                    ipaddress.ip_network(part.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"CORRAL_TRUSTED_PROXIES: {part.strip()!r} is not an IP "
                                     "address or network") from None
        return value

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
