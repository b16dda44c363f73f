"""One typed settings object for every tunable.

Sources, lowest to highest priority: defaults, an optional TOML file
(`--config`), environment variables `CLAWGATE_<NAME>`, CLI flags. Every
duration is in seconds (floats allowed, so tests and benchmarks can compress
TTLs) and is named with its unit. The TTLs here are the single documented
place for all expiry rules (docs/design.md, rule 9).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clawgate.protocol.constants import SCOPE_NAMES

DEFAULT_PORT = 18789


class ModelPrice(BaseModel):
    """USD per million tokens, for `usage.cost` and the runs' `usage.costUsd`."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class NamedToken(BaseModel):
    """One entry of `tokens`: the secret (inline or in a file) and its scope ceiling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str | None = None
    token_file: Path | None = None
    # Read only unless said otherwise: a credential handed out for one job gets the least.
    scopes: list[str] = Field(default_factory=lambda: ["operator.read"])

    @model_validator(mode="after")
    def _one_source(self) -> NamedToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("a named token needs exactly one of token or token_file")
        if self.token == "":
            raise ValueError("a named token cannot be empty")
        unknown = [s for s in self.scopes if s not in SCOPE_NAMES]
        if unknown:
            raise ValueError(f"unknown scopes {unknown}; known: {list(SCOPE_NAMES)}")
        return self


TOOL_PATTERN = r"^[A-Za-z0-9_\-]+(\.([A-Za-z0-9_\-]+|\*))?$|^[A-Za-z0-9_\-]*\*$"


class AgentProfile(BaseModel):
    """One `[agents.<id>]` table: what an agent runs on, what it is told, what it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    # The provider kind ("scripted" | "openai"); unset means the gateway's `provider`.
    provider: Literal["scripted", "openai"] | None = None
    model: str | None = None
    # Tried in order when the model's circuit is open (the same breakers as `fallback_models`).
    fallback_models: list[str] = Field(default_factory=list)
    system_prompt: str | None = None
    system_prompt_file: Path | None = None
    # Tools are denied unless named here: a session tool (`sessions_list`), an MCP tool
    # (`server.tool`) or every tool of a server (`server.*`). The default keeps what every
    # agent had before profiles existed.
    tools: list[str] = Field(default_factory=lambda: ["sessions_spawn"])
    # Provider turns per run (tool rounds + the final reply); unset: max_tool_rounds + 1.
    max_turns: int | None = Field(None, ge=1)
    max_tool_calls: int = Field(32, ge=1, description="tool calls per run")
    tool_timeout_s: float = Field(60.0, gt=0)
    tool_result_max_bytes: int = Field(65536, ge=256)
    max_spawn_depth: int | None = Field(None, ge=1, le=5, description="unset: the gateway's")
    max_children_per_agent: int | None = Field(None, ge=1, description="unset: the gateway's")

    @model_validator(mode="after")
    def _check(self) -> AgentProfile:
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("an agent has system_prompt or system_prompt_file, not both")
        bad = [t for t in self.tools if not re.match(TOOL_PATTERN, t)]
        if bad:
            raise ValueError(f"invalid tool names {bad}: use name, server.tool or server.*")
        return self


class McpServerConfig(BaseModel):
    """One `[mcp_servers.<name>]` table: a stdio command, or a streamable-HTTP URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    # The whole environment of the subprocess, besides PATH: nothing else is inherited.
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs exactly one of command or url")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLAWGATE_", extra="ignore", validate_assignment=True)

    # --- network -----------------------------------------------------------------
    bind: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    token: str | None = None
    state_dir: Path = Path("~/.clawgate")
    # The token read from a file (first line, surrounding whitespace stripped): unlike `--token`,
    # it never shows in `/proc/PID/cmdline`, which every local user can read.
    token_file: Path | None = None
    # Named tokens, each with a ceiling on the scopes a connection holding it may ask for,
    # e.g. `tokens = {ci = {token_file = "ci.token", scopes = ["operator.read"]}}`.
    # `token` (or `token_file`) is the unnamed one, with every scope.
    tokens: dict[str, NamedToken] = Field(default_factory=dict)
    # Browser pages allowed to open a WebSocket or call the HTTP endpoints, as origins
    # ("https://app.example:8443"). The gateway's own origin is always allowed; a request
    # without an Origin header (CLIs, SDKs) is not a browser request and is not checked.
    allowed_origins: list[str] = Field(default_factory=list)
    # Host header values accepted besides loopback names/addresses and the bind address
    # (a DNS-rebinding page reaches the gateway under its own host name; see docs/security.md).
    allowed_hosts: list[str] = Field(default_factory=list)
    # Failed authentication per peer address (OpenClaw's defaults): this many failures within
    # the window lock the address out (UNAVAILABLE with retryAfterMs) for the lockout.
    auth_rate_limit_max_attempts: int = Field(10, ge=1)
    auth_rate_limit_window_s: float = Field(60.0, gt=0)
    auth_rate_limit_lockout_s: float = Field(300.0, gt=0)
    auth_rate_limit_max_peers: int = Field(10000, ge=1, description="addresses tracked at once")

    # --- maintenance -------------------------------------------------------------
    maintenance_interval_s: float = Field(60.0, gt=0)
    tick_interval_s: float = Field(30.0, gt=0)
    handshake_timeout_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)

    # --- TTLs (docs/design.md, record lives) ----------------------------------------------
    run_context_idle_ttl_s: float = Field(1800.0, gt=0)
    run_result_ttl_s: float = Field(600.0, gt=0)
    run_retention_s: float = Field(86400.0, gt=0, description="finished run records kept in the store")
    # --- retention of what is on disk (docs/disk.md); every rule is on by default ---
    run_retention_max: int = Field(
        100_000, ge=1, description="finished run records kept at most (those that ended first go first)"
    )
    session_idle_ttl_s: float = Field(
        7 * 86400.0, gt=0, description="a session with no run for this long is deleted with its transcript"
    )
    max_sessions: int = Field(
        10_000, ge=1, description="sessions kept at most (least recently used go first)"
    )
    session_max_messages: int = Field(
        500, ge=1, description="messages kept per transcript (the oldest are dropped)"
    )
    session_max_bytes: int = Field(
        262_144, ge=1, description="bytes of message content kept per transcript (the oldest are dropped)"
    )
    ended_hook_log_max_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="the ended-hook log is rotated past this size"
    )
    ended_hook_log_backups: int = Field(3, ge=1, description="rotated ended-hook log files kept")
    disk_budget_bytes: int = Field(
        0,
        ge=0,
        description="state dir size past which new work is refused until retention made room; 0 = off",
    )
    disk_free_min_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="free space on the state dir's filesystem below which new work is refused",
    )
    disk_sample_interval_s: float = Field(5.0, gt=0, description="how often disk usage is measured")
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
    max_tracked_runs: int = Field(
        50000,
        ge=1,
        description=(
            "runs held in memory (queued + running); a queued run costs about 1.6 KB of RSS with its"
            " own session, 1.3 KB when runs share sessions (benchmarks/queued_memory.py): size"
            " memory_budget_bytes as idle RSS (about 57 MB) + max_tracked_runs x 1.6 KB"
        ),
    )
    # RSS over which new runs are refused (UNAVAILABLE). None (the default): derived from the
    # machine at start, see `default_memory_budget`; 0 disables the check.
    memory_budget_bytes: int | None = Field(None, ge=0)
    max_payload_bytes: int = Field(524288, ge=1024)
    max_buffered_bytes: int = Field(1572864, ge=1024)
    max_connections: int = Field(1024, ge=1)
    max_pending_handshakes: int = Field(128, ge=1)
    # Distinct session keys subscribed to across all connections (`events.subscribe`); a
    # subscription beyond it is refused (UNAVAILABLE), never made room for by dropping another.
    max_session_subscriptions: int = Field(102_400, ge=1)
    rate_limit_per_s: float = Field(2000.0, gt=0, description="requests per second per connection")
    rate_limit_burst: int = Field(4000, ge=1)
    frozen_result_max_bytes: int = Field(102400, ge=1)
    attachments_max_bytes: int = Field(5 * 1024 * 1024, ge=0)
    transcript_history_max: int = Field(200, ge=1, description="messages sent to the provider per turn")
    max_tool_rounds: int = Field(8, ge=1)
    provider_max_retries: int = Field(4, ge=0, description="retries of a failed turn (429, 5xx, timeouts)")
    provider_retry_base_s: float = Field(0.5, ge=0, description="backoff: base * 2^n with full jitter")
    provider_retry_max_delay_s: float = Field(
        30.0, ge=0, description="cap of one backoff, Retry-After included"
    )
    provider_max_concurrency: int = Field(64, ge=1, description="turns in flight per provider")
    provider_breaker_failures: int = Field(5, ge=1, description="consecutive failures that open a circuit")
    provider_breaker_cooldown_s: float = Field(30.0, gt=0, description="open circuit: time before one probe")
    fallback_models: list[str] = Field(
        default_factory=list, description="tried in order when a circuit is open"
    )
    # Listeners of a run's end (deferred `agent` answers, parked `agent.wait`s): each is
    # removed in O(1) when it ends or its connection closes; these caps bound how many exist.
    max_waiters_per_run: int = Field(1024, ge=1, description="beyond: UNAVAILABLE (retryable)")
    max_waiters_per_connection: int = Field(1024, ge=1, description="beyond: FORBIDDEN")

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
    # An HTTP API request's body must arrive whole within this long after its head (408 after):
    # a body dribbled forever would hold its socket and task past the header timeout.
    http_body_timeout_s: float = Field(30.0, gt=0, description="seconds for an HTTP request body to arrive")
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
    # An ended hook that has not returned after this long is abandoned (counted in status as
    # a hook timeout), so a hook that never returns cannot hold a pipeline or the sweep.
    ended_hook_timeout_s: float = Field(30.0, gt=0)
    # Each step of a subagent pipeline retries a failing store call (with the announce backoff)
    # this long; then the record is left to the archive sweep, which finishes it.
    subagent_retry_window_s: float = Field(300.0, gt=0)
    # On a shared (Redis) store, the process working on a subagent record holds a claim on it
    # for this long (renewed at every step; at least the hook timeout + 60 s).
    subagent_claim_lease_s: float = Field(300.0, gt=0)
    # Due records the archive sweep reads per store query.
    subagent_sweep_batch: int = Field(1000, ge=1)

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
    # Redis store: how long a run's end write is retried while Redis cannot be reached (a restart,
    # a network cut) before it is given up with an error in the log (runs/endwrite.py).
    store_end_retry_s: float = Field(300.0, gt=0)
    cluster_lease_s: float = Field(10.0, gt=0, description="per-session run lock lease on Redis")
    cluster_claim_idle_s: float = Field(
        15.0, gt=0, description="idle time before a dead process' work is claimed"
    )
    sqlite_batch_max: int = Field(512, ge=1)
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"

    # --- logging / hooks -----------------------------------------------------------------
    log_level: str = "info"
    log_json: bool = False
    # Repeated warnings about one peer (refused handshakes, ...) are logged this many times per
    # window, then counted and summarised: a client must not be able to fill the disk with logs.
    log_repeat_max: int = Field(5, ge=1)
    log_repeat_window_s: float = Field(60.0, gt=0)
    ended_hook_log: Path | None = None

    # --- usage accounting -------------------------------------------------------------------
    model_prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="model -> USD per 1M tokens"
    )
    usage_retention_days: int = Field(90, ge=1, description="daily token aggregates kept this many days")
    usage_models_max: int = Field(
        64, ge=1, description="models counted in /metrics (the rest still in the store)"
    )

    # --- cron (scheduled runs) -------------------------------------------------------------
    cron_enabled: bool = Field(True, description="fire scheduled jobs (cron.* methods work either way)")
    cron_poll_s: float = Field(30.0, gt=0, description="longest sleep of the scheduler between store looks")
    cron_max_jobs: int = Field(1000, ge=1)
    cron_history_max: int = Field(50, ge=1, description="run history entries kept per job")
    cron_history_ttl_s: float = Field(7 * 86400.0, gt=0, description="run history entries older are swept")
    cron_job_ttl_s: float = Field(
        400 * 86400.0, gt=0, description="Redis: a job key expires this long after its last write"
    )

    # --- run-end webhooks (automation/webhooks.py) ------------------------------------------
    webhook_url: str | None = Field(
        None, description="POST every run's final answer here (a run's own `webhook` wins)"
    )
    webhook_secret: str | None = Field(
        None, description="Standard Webhooks signing secret (`whsec_<base64>` or plain text)"
    )
    # None: allowed only when the gateway binds loopback (a gateway on the network must not be
    # turned into a probe of its own private network by whoever may start runs).
    webhook_allow_private: bool | None = Field(None, description="allow private/loopback webhook targets")
    webhook_timeout_s: float = Field(10.0, gt=0, description="timeout of one delivery attempt")
    webhook_concurrency: int = Field(8, ge=1, description="deliveries in flight at once")
    webhook_max_attempts: int = Field(8, ge=1, description="attempts before a delivery is dead-lettered")
    webhook_retry_base_s: float = Field(1.0, gt=0, description="first retry delay (doubles, with jitter)")
    webhook_retry_delay_max_s: float = Field(300.0, gt=0, description="longest delay between two attempts")
    webhook_retry_max_s: float = Field(
        3600.0, gt=0, description="no attempt after this long since the run ended"
    )
    webhook_dead_ttl_s: float = Field(7 * 86400.0, gt=0, description="dead letters are kept this long")
    webhook_outbox_max: int = Field(100_000, ge=1, description="deliveries kept at once (pending + dead)")
    webhook_claim_s: float = Field(60.0, gt=0, description="Redis: one process' claim on a delivery")
    webhook_poll_s: float = Field(5.0, gt=0, description="longest sleep of the delivery worker")

    # --- agent profiles and tools (docs/agents.md) ---------------------------------------
    # `[agents.<id>]` tables; `main` exists even when not configured.
    agents: dict[str, AgentProfile] = Field(default_factory=dict)
    # `[mcp_servers.<name>]` tables: tool servers started on demand and shared by runs.
    mcp_servers: dict[str, McpServerConfig] = Field(default_factory=dict)
    mcp_max_servers: int = Field(16, ge=1, description="MCP server sessions open at once")
    mcp_connect_timeout_s: float = Field(30.0, gt=0, description="start + initialize + list tools")
    mcp_restart_base_s: float = Field(1.0, ge=0, description="restart backoff: base * 2^n")
    mcp_restart_max_s: float = Field(60.0, ge=0)

    # --- HTTP API (same port as the WebSocket) ------------------------------------------
    http_openai: bool = Field(True, description="/v1/chat/completions, /v1/responses, /v1/models")
    http_rest: bool = Field(True, description="/v1/runs..., /v1/sessions/{key}/history")
    http_hooks: bool = Field(True, description="/hooks/agent, /hooks/wake (also need hooks_token)")
    hooks_token: str | None = Field(None, description="bearer token of /hooks/*; unset disables them")
    http_event_buffer_events: int = Field(512, ge=1, description="agent events kept per run for SSE resume")
    http_event_buffers_max: int = Field(1000, ge=1, description="runs whose events are kept for SSE resume")

    @field_validator("token", "hooks_token")
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

    def webhook_private_ok(self) -> bool:
        if self.webhook_allow_private is not None:
            return self.webhook_allow_private
        return self.is_loopback_bind()

    def abort_ttl_s(self, timeout_s: float) -> float:
        """How long an abort handle may live: timeout + grace, clamped (docs/design.md, record lives)."""
        return min(max(timeout_s + self.abort_grace_s, self.abort_ttl_min_s), self.abort_ttl_max_s)

    def redacted(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for secret in ("token", "hooks_token", "openai_api_key", "webhook_secret"):
            if data.get(secret):
                data[secret] = "***"
        for entry in data.get("tokens", {}).values():
            if entry.get("token"):
                entry["token"] = "***"
        for server in data.get("mcp_servers", {}).values():
            server["env"] = {k: "***" for k in server.get("env", {})}
            server["headers"] = {k: "***" for k in server.get("headers", {})}
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
