"""One typed settings object for every tunable.

Sources, lowest to highest priority: defaults, an optional TOML file
(`--config`), environment variables `CLAWGATE_<NAME>`, CLI flags. Every
duration is in seconds (floats allowed, so tests and benchmarks can compress
TTLs) and is named with its unit. The TTLs here are the single documented
place for all expiry rules (DESIGN.md section 1, rule 9).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 18789


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLAWGATE_", extra="ignore", validate_assignment=True)

    # --- network -----------------------------------------------------------------
    bind: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    token: str | None = None
    state_dir: Path = Path("~/.clawgate")

    # --- maintenance -------------------------------------------------------------
    maintenance_interval_s: float = Field(60.0, gt=0)
    tick_interval_s: float = Field(30.0, gt=0)
    handshake_timeout_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)

    # --- TTLs (DESIGN.md section 3) ----------------------------------------------
    run_context_idle_ttl_s: float = Field(1800.0, gt=0)
    run_result_ttl_s: float = Field(600.0, gt=0)
    run_retention_s: float = Field(86400.0, gt=0, description="finished run records kept in the store")
    dedupe_ttl_s: float = Field(300.0, gt=0)
    subagent_session_ttl_s: float = Field(300.0, gt=0)
    subagent_archive_after_s: float = Field(3600.0, gt=0)
    pending_error_ttl_s: float = Field(300.0, gt=0)
    lifecycle_error_grace_s: float = Field(15.0, ge=0)
    announce_expiry_s: float = Field(300.0, gt=0)
    announce_hard_expiry_s: float = Field(1800.0, gt=0)
    announce_retry_delays_s: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    abort_grace_s: float = Field(60.0, ge=0)
    abort_ttl_min_s: float = Field(120.0, gt=0)
    abort_ttl_max_s: float = Field(86400.0, gt=0)

    # --- bounds --------------------------------------------------------------------
    run_result_max: int = Field(5000, ge=1)
    dedupe_max: int = Field(1000, ge=1)
    session_cache_max: int = Field(10000, ge=1)
    max_tracked_runs: int = Field(50000, ge=1)
    # RSS over which new runs are refused (UNAVAILABLE). None (the default): derived from the
    # machine at start, see `default_memory_budget`; 0 disables the check.
    memory_budget_bytes: int | None = Field(None, ge=0)
    max_payload_bytes: int = Field(524288, ge=1024)
    max_buffered_bytes: int = Field(1572864, ge=1024)
    max_connections: int = Field(1024, ge=1)
    max_pending_handshakes: int = Field(128, ge=1)
    rate_limit_per_s: float = Field(2000.0, gt=0, description="requests per second per connection")
    rate_limit_burst: int = Field(4000, ge=1)
    frozen_result_max_bytes: int = Field(102400, ge=1)
    attachments_max_bytes: int = Field(5 * 1024 * 1024, ge=0)
    transcript_history_max: int = Field(200, ge=1, description="messages sent to the provider per turn")
    max_tool_rounds: int = Field(8, ge=1)
    provider_max_retries: int = Field(1, ge=0)

    # --- byte bounds and pre-auth limits (docs/security.md) ----------------------------
    # Provider output kept per run (UTF-8 bytes, all turns): a longer reply is cut there and
    # ends with a visible "[reply truncated ...]" marker; the run still ends `ok`.
    max_reply_bytes: int = Field(1024 * 1024, ge=1024)
    # Bytes of the finished runs cached for `agent.wait` and retries (run_result_max counts them).
    run_result_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Bytes of session metadata cached in memory (session_cache_max counts the entries).
    session_cache_max_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Time for a new socket to send its complete HTTP request head (WebSocket upgrade or
    # /healthz): a peer dribbling half a header is dropped, and holds no slot past it.
    http_header_timeout_s: float = Field(10.0, gt=0)
    # Sockets from one address that have not completed the `connect` handshake (HTTP head
    # included): one host cannot take every pending slot.
    max_pending_handshakes_per_addr: int = Field(32, ge=1)
    # Files per spawn (OpenClaw: 50); attachments_max_bytes bounds their total size.
    attachments_max_files: int = Field(50, ge=0)

    # --- runs and subagents -----------------------------------------------------------
    default_run_timeout_s: float = Field(600.0, gt=0)
    main_concurrency: int = Field(4, ge=1)
    subagent_concurrency: int = Field(8, ge=1)
    max_spawn_depth: int = Field(1, ge=1, le=5)
    max_children_per_agent: int = Field(5, ge=1)
    retain_attachments_on_keep: bool = False

    # --- providers -------------------------------------------------------------------
    provider: Literal["scripted", "openai"] = "scripted"
    scripted_delay_s: float = Field(0.0, ge=0)
    scripted_chunks: int = Field(1, ge=1)
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "gpt-4o-mini"
    openai_api_key: str = "sk-local"
    openai_timeout_s: float = Field(120.0, gt=0)

    # --- store -------------------------------------------------------------------------
    store: str = "sqlite"
    redis_prefix: str = "clawgate"
    cluster_lease_s: float = Field(10.0, gt=0, description="per-session run lock lease on Redis")
    cluster_claim_idle_s: float = Field(
        15.0, gt=0, description="idle time before a dead process' work is claimed"
    )
    sqlite_batch_max: int = Field(512, ge=1)
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"

    # --- logging / hooks -----------------------------------------------------------------
    log_level: str = "info"
    log_json: bool = False
    ended_hook_log: Path | None = None

    @field_validator("token")
    @classmethod
    def _empty_token_is_none(cls, value: str | None) -> str | None:
        # `CLAWGATE_TOKEN=` (empty) means "no token", not "the token is the empty string", which
        # would make every client without auth fail while the bind check thought there was none.
        return value or None

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value != "sqlite" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store must be 'sqlite' or a redis:// URL")
        return value

    # -- derived -----------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(os.path.expanduser(str(self.state_dir)))

    @property
    def store_kind(self) -> str:
        return "sqlite" if self.store == "sqlite" else "redis"

    def is_loopback_bind(self) -> bool:
        return is_loopback(self.bind)

    def effective_memory_budget_bytes(self) -> int:
        """The RSS budget in force: the setting, or one derived from total RAM when unset."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        import psutil

        return default_memory_budget(int(psutil.virtual_memory().total))

    def abort_ttl_s(self, timeout_s: float) -> float:
        """How long an abort handle may live: timeout + grace, clamped (DESIGN.md section 3)."""
        return min(max(timeout_s + self.abort_grace_s, self.abort_ttl_min_s), self.abort_ttl_max_s)

    def redacted(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for secret in ("token", "openai_api_key"):
            if data.get(secret):
                data[secret] = "***"
        return data


MEMORY_BUDGET_FRACTION = 0.5
MEMORY_BUDGET_FLOOR = 512 * 1024 * 1024
MEMORY_BUDGET_CEILING = 16 * 1024 * 1024 * 1024


def default_memory_budget(total_ram: int) -> int:
    """Half of the machine's RAM, at least 512 MiB and at most 16 GiB (never more than the RAM).

    Half leaves room for the OS, the store and other processes; the floor keeps a small VM
    usable; the ceiling stops a big host from letting one gateway grow without a bound
    anybody would notice.
    """
    budget = int(total_ram * MEMORY_BUDGET_FRACTION)
    return min(max(budget, MEMORY_BUDGET_FLOOR), MEMORY_BUDGET_CEILING, total_ram)


def is_loopback(host: str) -> bool:
    # "" is not loopback: bound as a host it means every interface (INADDR_ANY).
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Defaults < TOML file < environment < explicit overrides (CLI flags).

    Unknown names in the file or the overrides are refused: a misspelt TTL would
    otherwise be ignored silently. (The environment may hold other `CLAWGATE_*`
    variables, e.g. the CLI's `CLAWGATE_URL`, so it is not checked.)
    """
    file_values: dict[str, Any] = {}
    if config is not None:
        with open(config, "rb") as fh:
            raw = tomllib.load(fh)
        # Accept both a flat file and one with a [clawgate] table.
        file_values = dict(raw.get("clawgate", raw))
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted({*file_values, *given} - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
    env_values = {
        name: value
        for name, value in Settings().model_dump().items()
        if f"CLAWGATE_{name.upper()}" in os.environ
    }
    merged = {**file_values, **env_values, **given}
    return Settings.model_validate(merged)
