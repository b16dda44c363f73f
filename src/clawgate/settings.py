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
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from clawgate.protocol.constants import SCOPE_NAMES

DEFAULT_PORT = 18789


class ModelPrice(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """USD per million tokens, for `usage.cost` and the runs' `usage.costUsd`."""

    input_per_mtok: Annotated[float, Meta(ge=0)]
    output_per_mtok: Annotated[float, Meta(ge=0)]


class NamedToken(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One entry of `tokens`: the secret (inline or in a file) and its scope ceiling."""

    token: str | None = None
    token_file: Path | None = None
    # Read only unless said otherwise: a credential handed out for one job gets the least.
    scopes: list[str] = field(default_factory=lambda: ["operator.read"])

    def __post_init__(self) -> None:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("a named token needs exactly one of token or token_file")
        if self.token == "":
            raise ValueError("a named token cannot be empty")
        unknown = [s for s in self.scopes if s not in SCOPE_NAMES]
        if unknown:
            raise ValueError(f"unknown scopes {unknown}; known: {list(SCOPE_NAMES)}")


TOOL_PATTERN = r"^[A-Za-z0-9_\-]+(\.([A-Za-z0-9_\-]+|\*))?$|^[A-Za-z0-9_\-]*\*$"


class AgentProfile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One `[agents.<id>]` table: what an agent runs on, what it is told, what it may use."""

    name: str | None = None
    # The provider kind ("scripted" | "openai"); unset means the gateway's `provider`.
    provider: Literal["scripted", "openai"] | None = None
    model: str | None = None
    # Tried in order when the model's circuit is open (the same breakers as `fallback_models`).
    fallback_models: list[str] = field(default_factory=list)
    system_prompt: str | None = None
    system_prompt_file: Path | None = None
    # Tools are denied unless named here: a session tool (`sessions_list`), an MCP tool
    # (`server.tool`) or every tool of a server (`server.*`). The default keeps what every
    # agent had before profiles existed.
    tools: list[str] = field(default_factory=lambda: ["sessions_spawn"])
    # Provider turns per run (tool rounds + the final reply); unset: max_tool_rounds + 1.
    max_turns: Annotated[int, Meta(ge=1)] | None = None
    max_tool_calls: Annotated[int, Meta(ge=1, description="tool calls per run")] = 32
    tool_timeout_s: Annotated[float, Meta(gt=0)] = 60.0
    tool_result_max_bytes: Annotated[int, Meta(ge=256)] = 65536
    max_spawn_depth: Annotated[int, Meta(ge=1, le=5, description="unset: the gateway's")] | None = None
    max_children_per_agent: Annotated[int, Meta(ge=1, description="unset: the gateway's")] | None = None

    def __post_init__(self) -> None:
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("an agent has system_prompt or system_prompt_file, not both")
        bad = [t for t in self.tools if not re.match(TOOL_PATTERN, t)]
        if bad:
            raise ValueError(f"invalid tool names {bad}: use name, server.tool or server.*")


class McpServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One `[mcp_servers.<name>]` table: a stdio command, or a streamable-HTTP URL."""

    command: str | None = None
    args: list[str] = field(default_factory=list)
    # The whole environment of the subprocess, besides PATH: nothing else is inherited.
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs exactly one of command or url")


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # --- network -----------------------------------------------------------------
    bind: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_PORT
    token: str | None = None
    state_dir: Path = Path("~/.clawgate")
    # The token read from a file (first line, surrounding whitespace stripped): unlike `--token`,
    # it never shows in `/proc/PID/cmdline`, which every local user can read.
    token_file: Path | None = None
    # Named tokens, each with a ceiling on the scopes a connection holding it may ask for,
    # e.g. `tokens = {ci = {token_file = "ci.token", scopes = ["operator.read"]}}`.
    # `token` (or `token_file`) is the unnamed one, with every scope.
    tokens: dict[str, NamedToken] = field(default_factory=dict)
    # Browser pages allowed to open a WebSocket or call the HTTP endpoints, as origins
    # ("https://app.example:8443"). The gateway's own origin is always allowed; a request
    # without an Origin header (CLIs, SDKs) is not a browser request and is not checked.
    allowed_origins: list[str] = field(default_factory=list)
    # Host header values accepted besides loopback names/addresses and the bind address
    # (a DNS-rebinding page reaches the gateway under its own host name; see docs/security.md).
    allowed_hosts: list[str] = field(default_factory=list)
    # Failed authentication per peer address (OpenClaw's defaults): this many failures within
    # the window lock the address out (UNAVAILABLE with retryAfterMs) for the lockout.
    auth_rate_limit_max_attempts: Annotated[int, Meta(ge=1)] = 10
    auth_rate_limit_window_s: Annotated[float, Meta(gt=0)] = 60.0
    auth_rate_limit_lockout_s: Annotated[float, Meta(gt=0)] = 300.0
    auth_rate_limit_max_peers: Annotated[int, Meta(ge=1, description="addresses tracked at once")] = 10000

    # --- maintenance -------------------------------------------------------------
    maintenance_interval_s: Annotated[float, Meta(gt=0)] = 60.0
    tick_interval_s: Annotated[float, Meta(gt=0)] = 30.0
    handshake_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 10.0

    # --- TTLs (docs/design.md, record lives) ----------------------------------------------
    run_context_idle_ttl_s: Annotated[float, Meta(gt=0)] = 1800.0
    run_result_ttl_s: Annotated[float, Meta(gt=0)] = 600.0
    run_retention_s: Annotated[float, Meta(gt=0, description="finished run records kept in the store")] = (
        86400.0
    )
    # --- retention of what is on disk (docs/disk.md); every rule is on by default ---
    run_retention_max: Annotated[
        int, Meta(ge=1, description="finished run records kept at most (those that ended first go first)")
    ] = 100_000
    session_idle_ttl_s: Annotated[
        float, Meta(gt=0, description="a session with no run for this long is deleted with its transcript")
    ] = 7 * 86400.0
    max_sessions: Annotated[
        int, Meta(ge=1, description="sessions kept at most (least recently used go first)")
    ] = 10_000
    session_max_messages: Annotated[
        int, Meta(ge=1, description="messages kept per transcript (the oldest are dropped)")
    ] = 500
    session_max_bytes: Annotated[
        int, Meta(ge=1, description="bytes of message content kept per transcript (the oldest are dropped)")
    ] = 262_144
    ended_hook_log_max_bytes: Annotated[
        int, Meta(ge=1024, description="the ended-hook log is rotated past this size")
    ] = 10 * 1024 * 1024
    ended_hook_log_backups: Annotated[int, Meta(ge=1, description="rotated ended-hook log files kept")] = 3
    disk_budget_bytes: Annotated[
        int,
        Meta(
            ge=0,
            description="state dir size past which new work is refused until retention made room; 0 = off",
        ),
    ] = 0
    disk_free_min_bytes: Annotated[
        int,
        Meta(ge=0, description="free space on the state dir's filesystem below which new work is refused"),
    ] = 64 * 1024 * 1024
    disk_sample_interval_s: Annotated[float, Meta(gt=0, description="how often disk usage is measured")] = 5.0
    dedupe_ttl_s: Annotated[float, Meta(gt=0)] = 300.0
    subagent_session_ttl_s: Annotated[float, Meta(gt=0)] = 300.0
    subagent_archive_after_s: Annotated[float, Meta(gt=0)] = 3600.0
    pending_error_ttl_s: Annotated[float, Meta(gt=0)] = 300.0
    lifecycle_error_grace_s: Annotated[float, Meta(ge=0)] = 15.0
    announce_expiry_s: Annotated[float, Meta(gt=0)] = 300.0
    announce_hard_expiry_s: Annotated[float, Meta(gt=0)] = 1800.0
    announce_retry_delays_s: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    abort_grace_s: Annotated[float, Meta(ge=0)] = 60.0
    abort_ttl_min_s: Annotated[float, Meta(gt=0)] = 120.0
    abort_ttl_max_s: Annotated[float, Meta(gt=0)] = 86400.0

    # --- bounds --------------------------------------------------------------------
    run_result_max: Annotated[int, Meta(ge=1)] = 5000
    dedupe_max: Annotated[int, Meta(ge=1)] = 1000
    session_cache_max: Annotated[int, Meta(ge=1)] = 10000
    max_tracked_runs: Annotated[
        int,
        Meta(
            ge=1,
            description="runs held in memory (queued + running); a queued run costs about 1.7 KB of RSS with its"
            " own session, 1.3 KB when runs share sessions (benchmarks/queued_memory.py): size"
            " memory_budget_bytes as idle RSS (about 47 MB) + max_tracked_runs x 1.7 KB",
        ),
    ] = 50000
    # RSS over which new runs are refused (UNAVAILABLE). None (the default): derived from the
    # machine at start, see `default_memory_budget`; 0 disables the check.
    memory_budget_bytes: Annotated[int, Meta(ge=0)] | None = None
    gc_threshold0: Annotated[
        int,
        Meta(
            ge=0,
            description="young-generation threshold of the garbage collector in a `clawgate gateway`"
            " process, applied with gc.freeze() once it serves (server/gcpolicy.py); 0 keeps"
            " the interpreter's defaults",
        ),
    ] = 10000
    max_payload_bytes: Annotated[int, Meta(ge=1024)] = 524288
    max_buffered_bytes: Annotated[int, Meta(ge=1024)] = 1572864
    max_connections: Annotated[int, Meta(ge=1)] = 1024
    max_pending_handshakes: Annotated[int, Meta(ge=1)] = 128
    # Distinct session keys subscribed to across all connections (`events.subscribe`); a
    # subscription beyond it is refused (UNAVAILABLE), never made room for by dropping another.
    max_session_subscriptions: Annotated[int, Meta(ge=1)] = 102_400
    rate_limit_per_s: Annotated[float, Meta(gt=0, description="requests per second per connection")] = 2000.0
    rate_limit_burst: Annotated[int, Meta(ge=1)] = 4000
    frozen_result_max_bytes: Annotated[int, Meta(ge=1)] = 102400
    attachments_max_bytes: Annotated[int, Meta(ge=0)] = 5 * 1024 * 1024
    transcript_history_max: Annotated[
        int, Meta(ge=1, description="messages sent to the provider per turn")
    ] = 200
    max_tool_rounds: Annotated[int, Meta(ge=1)] = 8
    provider_max_retries: Annotated[
        int, Meta(ge=0, description="retries of a failed turn (429, 5xx, timeouts)")
    ] = 4
    provider_retry_base_s: Annotated[
        float, Meta(ge=0, description="backoff: base * 2^n with full jitter")
    ] = 0.5
    provider_retry_max_delay_s: Annotated[
        float, Meta(ge=0, description="cap of one backoff, Retry-After included")
    ] = 30.0
    provider_max_concurrency: Annotated[int, Meta(ge=1, description="turns in flight per provider")] = 64
    provider_breaker_failures: Annotated[
        int, Meta(ge=1, description="consecutive failures that open a circuit")
    ] = 5
    provider_breaker_cooldown_s: Annotated[
        float, Meta(gt=0, description="open circuit: time before one probe")
    ] = 30.0
    fallback_models: Annotated[list[str], Meta(description="tried in order when a circuit is open")] = field(
        default_factory=list
    )
    # Listeners of a run's end (deferred `agent` answers, parked `agent.wait`s): each is
    # removed in O(1) when it ends or its connection closes; these caps bound how many exist.
    max_waiters_per_run: Annotated[int, Meta(ge=1, description="beyond: UNAVAILABLE (retryable)")] = 1024
    max_waiters_per_connection: Annotated[int, Meta(ge=1, description="beyond: FORBIDDEN")] = 1024

    # --- byte bounds and pre-auth limits (docs/security.md) ----------------------------
    # Provider output kept per run (UTF-8 bytes, all turns): a longer reply is cut there and
    # ends with a visible "[reply truncated ...]" marker; the run still ends `ok`.
    max_reply_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    # Bytes of the finished runs cached for `agent.wait` and retries (run_result_max counts them).
    run_result_max_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    # Bytes of session metadata cached in memory (session_cache_max counts the entries).
    session_cache_max_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    # Time for a new socket to send its complete HTTP request head (WebSocket upgrade or
    # /healthz): a peer dribbling half a header is dropped, and holds no slot past it.
    http_header_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    # An HTTP API request's body must arrive whole within this long after its head (408 after):
    # a body dribbled forever would hold its socket and task past the header timeout.
    http_body_timeout_s: Annotated[
        float, Meta(gt=0, description="seconds for an HTTP request body to arrive")
    ] = 30.0
    # Sockets from one address that have not completed the `connect` handshake (HTTP head
    # included): one host cannot take every pending slot.
    max_pending_handshakes_per_addr: Annotated[int, Meta(ge=1)] = 32
    # Files per spawn (OpenClaw: 50); attachments_max_bytes bounds their total size.
    attachments_max_files: Annotated[int, Meta(ge=0)] = 50

    # --- runs and subagents -----------------------------------------------------------
    default_run_timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    main_concurrency: Annotated[int, Meta(ge=1)] = 4
    subagent_concurrency: Annotated[int, Meta(ge=1)] = 8
    max_spawn_depth: Annotated[int, Meta(ge=1, le=5)] = 1
    max_children_per_agent: Annotated[int, Meta(ge=1)] = 5
    retain_attachments_on_keep: bool = False
    # An ended hook that has not returned after this long is abandoned (counted in status as
    # a hook timeout), so a hook that never returns cannot hold a pipeline or the sweep.
    ended_hook_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    # Each step of a subagent pipeline retries a failing store call (with the announce backoff)
    # this long; then the record is left to the archive sweep, which finishes it.
    subagent_retry_window_s: Annotated[float, Meta(gt=0)] = 300.0
    # On a shared (Redis) store, the process working on a subagent record holds a claim on it
    # for this long (renewed at every step; at least the hook timeout + 60 s).
    subagent_claim_lease_s: Annotated[float, Meta(gt=0)] = 300.0
    # Due records the archive sweep reads per store query.
    subagent_sweep_batch: Annotated[int, Meta(ge=1)] = 1000

    # --- providers -------------------------------------------------------------------
    provider: Literal["scripted", "openai"] = "scripted"
    scripted_delay_s: Annotated[float, Meta(ge=0)] = 0.0
    scripted_chunks: Annotated[int, Meta(ge=1)] = 1
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "gpt-4o-mini"
    openai_api_key: str = "sk-local"
    openai_timeout_s: Annotated[float, Meta(gt=0)] = 120.0

    # --- store -------------------------------------------------------------------------
    store: str = "sqlite"
    redis_prefix: str = "clawgate"
    # Redis store: how long a run's end write is retried while Redis cannot be reached (a restart,
    # a network cut) before it is given up with an error in the log (runs/endwrite.py).
    store_end_retry_s: Annotated[float, Meta(gt=0)] = 300.0
    cluster_lease_s: Annotated[float, Meta(gt=0, description="per-session run lock lease on Redis")] = 10.0
    cluster_claim_idle_s: Annotated[
        float, Meta(gt=0, description="idle time before a dead process' work is claimed")
    ] = 15.0
    sqlite_batch_max: Annotated[int, Meta(ge=1)] = 512
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"

    # --- logging / hooks -----------------------------------------------------------------
    log_level: str = "info"
    log_json: bool = False
    # Repeated warnings about one peer (refused handshakes, ...) are logged this many times per
    # window, then counted and summarised: a client must not be able to fill the disk with logs.
    log_repeat_max: Annotated[int, Meta(ge=1)] = 5
    log_repeat_window_s: Annotated[float, Meta(gt=0)] = 60.0
    ended_hook_log: Path | None = None

    # --- usage accounting -------------------------------------------------------------------
    model_prices: Annotated[dict[str, ModelPrice], Meta(description="model -> USD per 1M tokens")] = field(
        default_factory=dict
    )
    usage_retention_days: Annotated[
        int, Meta(ge=1, description="daily token aggregates kept this many days")
    ] = 90
    usage_models_max: Annotated[
        int,
        Meta(
            ge=1,
            description="models kept by name in a day's usage aggregates (later ones are summed as "
            "'(other models)') and counted in /metrics",
        ),
    ] = 64

    # --- cron (scheduled runs) -------------------------------------------------------------
    cron_enabled: Annotated[
        bool, Meta(description="fire scheduled jobs (cron.* methods work either way)")
    ] = True
    cron_poll_s: Annotated[
        float, Meta(gt=0, description="longest sleep of the scheduler between store looks")
    ] = 30.0
    cron_max_jobs: Annotated[int, Meta(ge=1)] = 1000
    cron_history_max: Annotated[int, Meta(ge=1, description="run history entries kept per job")] = 50
    cron_history_ttl_s: Annotated[float, Meta(gt=0, description="run history entries older are swept")] = (
        7 * 86400.0
    )
    cron_job_ttl_s: Annotated[
        float, Meta(gt=0, description="Redis: a job key expires this long after its last write")
    ] = 400 * 86400.0

    # --- run-end webhooks (automation/webhooks.py) ------------------------------------------
    webhook_url: (
        Annotated[str, Meta(description="POST every run's final answer here (a run's own `webhook` wins)")]
        | None
    ) = None
    webhook_secret: (
        Annotated[str, Meta(description="Standard Webhooks signing secret (`whsec_<base64>` or plain text)")]
        | None
    ) = None
    # None: allowed only when the gateway binds loopback (a gateway on the network must not be
    # turned into a probe of its own private network by whoever may start runs).
    webhook_allow_private: (
        Annotated[bool, Meta(description="allow private/loopback webhook targets")] | None
    ) = None
    webhook_timeout_s: Annotated[float, Meta(gt=0, description="timeout of one delivery attempt")] = 10.0
    webhook_concurrency: Annotated[int, Meta(ge=1, description="deliveries in flight at once")] = 8
    webhook_max_attempts: Annotated[
        int, Meta(ge=1, description="attempts before a delivery is dead-lettered")
    ] = 8
    webhook_retry_base_s: Annotated[
        float, Meta(gt=0, description="first retry delay (doubles, with jitter)")
    ] = 1.0
    webhook_retry_delay_max_s: Annotated[
        float, Meta(gt=0, description="longest delay between two attempts")
    ] = 300.0
    webhook_retry_max_s: Annotated[
        float, Meta(gt=0, description="no attempt after this long since the run ended")
    ] = 3600.0
    webhook_dead_ttl_s: Annotated[float, Meta(gt=0, description="dead letters are kept this long")] = (
        7 * 86400.0
    )
    webhook_outbox_max: Annotated[int, Meta(ge=1, description="deliveries kept at once (pending + dead)")] = (
        100_000
    )
    webhook_claim_s: Annotated[float, Meta(gt=0, description="Redis: one process' claim on a delivery")] = (
        60.0
    )
    webhook_poll_s: Annotated[float, Meta(gt=0, description="longest sleep of the delivery worker")] = 5.0

    # --- agent profiles and tools (docs/agents.md) ---------------------------------------
    # `[agents.<id>]` tables; `main` exists even when not configured.
    agents: dict[str, AgentProfile] = field(default_factory=dict)
    # `[mcp_servers.<name>]` tables: tool servers started on demand and shared by runs.
    mcp_servers: dict[str, McpServerConfig] = field(default_factory=dict)
    mcp_max_servers: Annotated[int, Meta(ge=1, description="MCP server sessions open at once")] = 16
    mcp_connect_timeout_s: Annotated[float, Meta(gt=0, description="start + initialize + list tools")] = 30.0
    mcp_restart_base_s: Annotated[float, Meta(ge=0, description="restart backoff: base * 2^n")] = 1.0
    mcp_restart_max_s: Annotated[float, Meta(ge=0)] = 60.0

    # --- HTTP API (same port as the WebSocket) ------------------------------------------
    http_openai: Annotated[bool, Meta(description="/v1/chat/completions, /v1/responses, /v1/models")] = True
    http_rest: Annotated[bool, Meta(description="/v1/runs..., /v1/sessions/{key}/history")] = True
    http_hooks: Annotated[bool, Meta(description="/hooks/agent, /hooks/wake (also need hooks_token)")] = True
    hooks_token: Annotated[str, Meta(description="bearer token of /hooks/*; unset disables them")] | None = (
        None
    )
    http_event_buffer_events: Annotated[
        int, Meta(ge=1, description="agent events kept per run for SSE resume")
    ] = 512
    http_event_buffers_max: Annotated[
        int, Meta(ge=1, description="runs whose events are kept for SSE resume")
    ] = 1000

    def __post_init__(self) -> None:
        # `CLAWGATE_TOKEN=` (empty) means "no token", not "the token is the empty string", which
        # would make every client without auth fail while the bind check thought there was none.
        for name in ("token", "hooks_token"):
            if getattr(self, name) == "":
                msgspec.structs.force_setattr(self, name, None)
        if self.store != "sqlite" and not self.store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store must be 'sqlite' or a redis:// URL")

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
        data: dict[str, Any] = msgspec.to_builtins(self, enc_hook=str)
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


def parse_settings(data: Mapping[str, Any] | None = None, /, **values: Any) -> Settings:
    """Check and convert plain values (from TOML, JSON, the environment) into `Settings`.

    Numbers and booleans may be given as strings; a value out of its bounds, of the wrong
    type or an unknown name raises ValueError naming the setting. (`Settings(...)` itself
    checks nothing: construct settings through this or `load_settings`.)
    """
    try:
        return msgspec.convert({**(data or {}), **values}, Settings, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$.")
        name = where.rstrip("`")
        raise ValueError(f"{name}: {message}" if name else message) from None


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str | os.PathLike):
        return Path(value)
    raise NotImplementedError(kind)


_ENV_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_ENV_FALSE = frozenset({"0", "false", "no", "off", "n", "f"})


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as `CLAWGATE_<NAME>` variables, as plain values for `parse_settings`.

    Lists, tables and nested settings are JSON (`CLAWGATE_ALLOWED_ORIGINS='["https://a"]'`);
    booleans accept 1/0, true/false, yes/no, on/off; everything else is taken as text and
    converted to the setting's type by `parse_settings`.
    """
    from msgspec import inspect

    struct = inspect.type_info(Settings)
    assert isinstance(struct, inspect.StructType)
    found: dict[str, Any] = {}
    for info in struct.fields:
        raw = environ.get(f"CLAWGATE_{info.name.upper()}")
        if raw is None:
            continue
        kind = info.type.type if isinstance(info.type, inspect.Metadata) else info.type
        if isinstance(kind, inspect.UnionType):
            inner = [t for t in kind.types if not isinstance(t, inspect.NoneType)]
            kind = inner[0] if len(inner) == 1 else kind
        if isinstance(kind, inspect.Metadata):
            kind = kind.type
        if isinstance(kind, (inspect.ListType, inspect.DictType, inspect.StructType)):
            try:
                found[info.name] = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                raise ValueError(f"{info.name}: CLAWGATE_{info.name.upper()} is not JSON") from None
        elif isinstance(kind, inspect.BoolType) and raw.strip().lower() in _ENV_TRUE | _ENV_FALSE:
            found[info.name] = raw.strip().lower() in _ENV_TRUE
        else:
            found[info.name] = raw
    return found


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
    unknown = sorted({*file_values, *given} - set(Settings.__struct_fields__))
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
    return parse_settings({**file_values, **env_values(os.environ), **given})
