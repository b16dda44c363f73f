"""The gateway: the composition root that owns every component and their lifecycle.

Start order: store -> restore -> disk -> admission -> maintenance -> ticks -> webhooks
-> subagents -> cron. Each start pushes its stop onto one AsyncExitStack, so stop() runs
them in reverse (`Gateway.start` lists the order), each even if another raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec
import structlog

from clawgate import __version__
from clawgate.admission import Admission
from clawgate.automation.budgets import Budgets
from clawgate.automation.cron import CronService
from clawgate.automation.usage import UsageLedger
from clawgate.automation.webhooks import WebhookService
from clawgate.clip import clip
from clawgate.errors import (
    ClawgateError,
    Forbidden,
    InvalidRequest,
    Unauthorized,
    Unavailable,
    internal_error,
)
from clawgate.events.bus import EventBus
from clawgate.events.session_events import SessionEventPublisher
from clawgate.methods.agent import final_payload
from clawgate.methods.table import Deferred, MethodSpec, build_table
from clawgate.metrics import make_registry, render
from clawgate.protocol.constants import CLOSE_RESTART
from clawgate.protocol.frames import decode_params, encode_event
from clawgate.protocol.schemas import ConnectParams
from clawgate.providers.base import Provider
from clawgate.providers.factory import make_provider
from clawgate.retention.disk import DiskMonitor
from clawgate.retention.service import Retention
from clawgate.runs.service import RunService
from clawgate.server.auth import require
from clawgate.server.authlimit import AuthFailureLimiter, peer_key
from clawgate.server.connection import Connection
from clawgate.server.credentials import load_credentials
from clawgate.server.gcpolicy import gc_status
from clawgate.server.handshake import grant_for, hello_ok
from clawgate.server.peerlog import PeerLog
from clawgate.server.sockets import SocketLedger, max_sockets
from clawgate.server.statedir import StateDirError, check_state_dir
from clawgate.sessions.service import SessionService
from clawgate.sessions.view import ModelDefaults
from clawgate.settings import Settings, is_loopback
from clawgate.state.clock import Clock, SystemClock
from clawgate.state.maintenance import Maintenance
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.store.base import Store
from clawgate.store.cron_store import CronStore, RedisCronStore, SqliteCronStore
from clawgate.store.usage_store import RedisUsageStore, SqliteUsageStore, UsageStore
from clawgate.store.webhook_store import RedisWebhookStore, SqliteWebhookStore, WebhookStore
from clawgate.subagents.hooks import log_files
from clawgate.subagents.service import SubagentService
from clawgate.tools.mcp import McpManager
from clawgate.tools.session_tools import session_tools

if TYPE_CHECKING:
    from clawgate.scaleout.member import ClusterMember
    from clawgate.store.redis_store import RedisStore
    from clawgate.store.sqlite import SqliteStore

log = structlog.get_logger("clawgate.gateway")


def open_cron_store(settings: Settings, store: Store) -> CronStore:
    """Cron jobs live next to the rest of the state, in the same SQLite file or Redis."""
    if store.kind == "redis":  # by kind: importing the Redis store loads the redis client
        return RedisCronStore(
            cast("RedisStore", store),
            job_ttl_s=int(settings.cron_job_ttl_s),
            history_ttl_s=int(settings.cron_history_ttl_s),
        )
    return SqliteCronStore(cast("SqliteStore", store))


def open_usage_store(settings: Settings, store: Store) -> UsageStore:
    if store.kind == "redis":
        return RedisUsageStore(cast("RedisStore", store), retention_days=settings.usage_retention_days)
    return SqliteUsageStore(cast("SqliteStore", store))


def open_webhook_store(settings: Settings, store: Store) -> WebhookStore:
    if store.kind == "redis":
        # A record outlives its whole retry window and dead-letter life (plus a day): the
        # sweep removes it first; expiry is the backstop.
        ttl_s = settings.webhook_retry_max_s + settings.webhook_dead_ttl_s + 86400
        return RedisWebhookStore(cast("RedisStore", store), record_ttl_s=ttl_s)
    return SqliteWebhookStore(cast("SqliteStore", store))


def open_store(settings: Settings) -> Store:
    if settings.store_kind == "redis":
        from clawgate.store.redis_store import RedisStore

        return RedisStore(
            settings.store,
            prefix=settings.redis_prefix,
            run_result_ttl_s=settings.run_retention_s,
            # Retention deletes idle sessions on both stores (docs/disk.md); Redis' own expiry
            # is only a backstop, well past the idle TTL.
            session_ttl_s=settings.session_idle_ttl_s + max(settings.session_idle_ttl_s, 86400.0),
            transcript_max=max(10_000, 2 * settings.session_max_messages),
        )
    from clawgate.store.sqlite import SqliteStore

    return SqliteStore(
        settings.state_path / "clawgate.db",
        batch_max=settings.sqlite_batch_max,
        synchronous=settings.sqlite_synchronous,
    )


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        provider: Provider | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.registry = StateRegistry()
        # Token files are read once, here: a bad one stops the gateway before it listens.
        self.credentials = load_credentials(settings)
        self.auth_limiter = AuthFailureLimiter(
            self.clock,
            self.registry,
            max_attempts=settings.auth_rate_limit_max_attempts,
            window_s=settings.auth_rate_limit_window_s,
            lockout_s=settings.auth_rate_limit_lockout_s,
            max_peers=settings.auth_rate_limit_max_peers,
        )
        self.peer_log = PeerLog(
            self.clock,
            self.registry,
            max_lines=settings.log_repeat_max,
            window_s=settings.log_repeat_window_s,
        )
        prepare_state_dir(settings)
        # The one owner of background tasks (state/supervisor.py): handed to each component
        # that starts some, at construction or at start.
        self.supervisor = Supervisor(sleep=self.clock.sleep, on_error=self._task_failed)
        self.store = store or open_store(settings)
        self.provider = provider or make_provider(settings, self.clock)
        # Scale-out: on a shared Redis store (unless a store is handed in) this process is one
        # member of a cluster. The member is built first: the bus and the run service take
        # its ports (relay, dispatch) at construction; the core is bound to it below.
        self.cluster: ClusterMember | None = None
        if settings.store_kind == "redis" and store is None:
            from clawgate.scaleout.member import ClusterMember

            self.cluster = ClusterMember(
                settings, self.clock, self.registry, self.store, tasks=self.supervisor
            )
        self.bus = EventBus(
            self.clock,
            self.registry,
            idle_ttl_s=settings.run_context_idle_ttl_s,
            max_runs=settings.max_tracked_runs,
            max_connections=settings.max_connections,
            max_session_subscriptions=settings.max_session_subscriptions,
            relay=self.cluster.relay if self.cluster is not None else None,
        )
        self.model_defaults = ModelDefaults.from_settings(settings)
        self.session_events = SessionEventPublisher(self.bus, self.clock, self.model_defaults)
        self.sessions = SessionService(
            self.store,
            self.clock,
            self.registry,
            cache_max=settings.session_cache_max,
            cache_max_bytes=settings.session_cache_max_bytes,
            observer=self.session_events,
        )
        # Agent tools: the session tools, and the MCP servers profiles name (started on demand).
        self.mcp = McpManager(settings, self.clock, self.registry, tasks=self.supervisor)
        self.budgets = Budgets(self.store, self.sessions)
        self.webhooks = WebhookService(
            settings,
            self.clock,
            self.registry,
            self.store,
            open_webhook_store(settings, self.store),
            final_payload,
        )
        self.runs = RunService(
            settings,
            self.clock,
            self.registry,
            self.store,
            self.bus,
            self.sessions,
            self.provider,
            dispatch=self.cluster.dispatch if self.cluster is not None else None,
            gate=self.budgets.gate,
            # A run's webhook delivery is written in the same transaction as its end.
            end_writer=self.webhooks.finish_run,
            mcp_tools=self.mcp.tools_for,
            tasks=self.supervisor,
        )
        self.subagents = SubagentService(
            settings,
            self.clock,
            self.registry,
            self.store,
            self.bus,
            self.sessions,
            self.runs,
            tasks=self.supervisor,
        )
        for kind in sorted({p.provider for p in self.runs.profiles} - {settings.provider}):
            self.runs.providers[kind] = make_provider(
                msgspec.structs.replace(settings, provider=kind), self.clock
            )
        self.cron = CronService(
            settings, self.clock, open_cron_store(settings, self.store), self.runs, self.sessions
        )
        self.usage = UsageLedger(settings, self.clock, open_usage_store(settings, self.store))
        self.maintenance = Maintenance(self.registry, self.clock, settings.maintenance_interval_s)
        self.registry.add_sweep("cron_history", self.cron.sweep_history)
        self.registry.add_sweep("usage_retention", self.usage.sweep)
        # Finished run records go with the retention pass (run_retention_s and _max), with
        # sessions, transcripts and attachments (docs/disk.md).
        self.retention = Retention(
            settings, self.clock, self.registry, self.store, self.sessions, self.runs, self.subagents
        )
        self.disk = DiskMonitor(
            settings.state_path,
            budget_bytes=settings.disk_budget_bytes,
            free_min_bytes=settings.disk_free_min_bytes,
            interval_s=settings.disk_sample_interval_s,
            extra_files=self._files_outside_state_dir,
        )
        self.admission = Admission(
            self.registry,
            max_tracked_runs=settings.max_tracked_runs,
            memory_budget_bytes=settings.effective_memory_budget_bytes(),
        )
        register_state = getattr(self.provider, "register_state", None)
        if register_state is not None:  # a provider's own bounded structures (retry memory, breakers)
            register_state(self.registry)

        # -- wiring: every hook and callback between components, here and only here. Hooks are
        # called in the order they are registered.
        self.bus.on_event(self.session_events.on_agent_event)
        self.bus.on_event(self.subagents.on_agent_event)
        self.runs.on_start(self.subagents.on_run_start)
        self.runs.on_end(self.subagents.on_run_end)
        self.runs.on_end(self.cron.on_run_end)
        self.runs.on_end(self.usage.on_run_end)
        self.runs.on_end(self.budgets.on_run_end)
        self.runs.add_tool(self.subagents.spawn_tool())
        for tool in session_tools(self):
            self.runs.add_tool(tool)
        self.retention.on_pass = self.disk.refresh
        self.admission.disk_reason = self.disk.reason
        # The same admission check the `sessions.spawn` RPC passes, so an agent calling the
        # tool cannot grow tracked runs past the limit either.
        self.subagents.admission_check = self.admission.check
        if self.cluster is not None:
            self.runs.on_end(self.cluster.publish_done)  # last: the other processes learn the end
            self.cluster.bind(self.runs, self.subagents, self.bus)  # runs from the shared queue execute here

        self.connections: dict[str, Connection] = {}
        self.registry.add(
            "connections", self.connections.__len__, ttl_s=None, max_size=settings.max_connections
        )
        # Close tasks of connections, at most two per connection, each awaited before its
        # connection is forgotten (Connection._finish_close_tasks): bounded by construction.
        # (Other owners' tasks under the supervisor are bounded, and registered, by their owners.)
        self.registry.add(
            "background_tasks",
            lambda: self.supervisor.live("connection-close"),
            ttl_s=None,
            max_size=2 * settings.max_connections,
        )
        self.methods: dict[str, MethodSpec] = build_table()
        self.metrics = make_registry(self._metrics_snapshot)
        self.started_at = time.monotonic()
        self.server_id = uuid.uuid4().hex[:8]
        self.pending_handshakes = 0
        # Every accepted socket, before and after it becomes a connection (server/protocols.py).
        self.sockets = SocketLedger(
            max_sockets=max_sockets(settings),
            max_pending_per_addr=settings.max_pending_handshakes_per_addr,
        )
        # Keyed by peer address; an entry lives while that address has a pending socket.
        self.registry.add(
            "pending_addresses", self.sockets.addresses, ttl_s=None, max_size=max_sockets(settings)
        )
        self.slow_consumers = 0
        self.internal_errors = 0
        self.started = False
        self.stopping = False
        self._stack: contextlib.AsyncExitStack | None = None
        self.stop_errors: list[tuple[str, BaseException]] = []

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every component; each pushes its stop onto the lifecycle stack as it starts.

        `stop()` closes the stack: the stops run in reverse, each one even if another raised.
        Where a stop has no start of its own (the shutdown event, the drain, closing the
        connections), it is pushed where it must run: the stop order is broadcast shutdown,
        stop cron, hand the cluster's queues back, drain the runs, close the cluster, stop
        subagents, webhooks, MCP servers, ticks, maintenance, admission, disk sampler, close
        connections and background tasks, close the store, close the providers.
        """
        if self.started:
            return
        on_stop = self._lifecycle()
        await self.store.open()
        await self.usage.open()
        await self.webhooks.store.open()  # before the restore: run ends written there have deliveries
        if self.cluster is not None:
            # Shared store: other processes own the runs in flight; recovery of a dead
            # process' work goes through the dispatcher's leases (scaleout/member.py).
            restored = requeued = interrupted = 0
            await self.cluster.start()
        else:
            restored = await self.subagents.load()
            requeued, interrupted = await self.runs.restore()
            await self.subagents.resume()
        await self.retention.startup()
        await self.disk.refresh()
        self.disk.start(self.supervisor)
        on_stop("disk", self.disk.stop)
        self.admission.start(self.supervisor)
        on_stop("admission", self.admission.stop)
        # Unconditional (rule 5): the sweeper runs whatever was, or was not, restored.
        self.maintenance.start(self.supervisor)
        on_stop("maintenance", self.maintenance.stop)
        self.supervisor.loop("ticks", self._ticks, retry_s=self.settings.tick_interval_s)
        on_stop("ticks", lambda: self.supervisor.stop_loop("ticks"))
        on_stop("mcp", self.mcp.close)  # MCP servers start on demand
        await self.webhooks.start(self.supervisor)  # after the restore: deliveries left by a crash go out now
        on_stop("webhooks", self.webhooks.stop)  # after the drain: the last run ends' deliveries are out
        self.subagents.start()
        on_stop("subagents", self.subagents.stop)
        if self.cluster is not None:
            # First hand the shared queues back (running runs get the grace period, then
            # become orphans another process reports), then stop like a single process.
            on_stop("cluster", self.cluster.close)
        on_stop("drain", lambda: self.runs.drain(self.settings.shutdown_grace_s))
        if self.cluster is not None:
            on_stop("cluster-dispatch", self.cluster.stop_dispatch)
        if self.settings.cron_enabled:
            await self.cron.start(self.supervisor)  # after the restore: an overdue job fires once, now
        else:
            await self.cron.store.open()
        on_stop("cron", self.cron.stop)
        self.started = True
        log.info(
            "gateway started",
            store=self.store.kind,
            requeued=requeued,
            interrupted=interrupted,
            subagents_restored=restored,
        )

    def _lifecycle(self) -> Callable[[str, Callable[[], Awaitable[object]]], None]:
        """The lifecycle stack, with what closes last whatever was started (the providers, the
        store, background tasks, connections), and a function pushing one named stop onto it."""
        if self._stack is None:
            self._stack = contextlib.AsyncExitStack()
            self._stack.push_async_callback(self._stop_step, "providers", self._close_providers)
            self._stack.push_async_callback(self._stop_step, "store", self.store.close)
            self._stack.push_async_callback(self._stop_step, "tasks", self.supervisor.aclose)
            self._stack.push_async_callback(self._stop_step, "connections", self._close_connections)
        stack = self._stack

        def on_stop(name: str, fn: Callable[[], Awaitable[object]]) -> None:
            stack.push_async_callback(self._stop_step, name, fn)

        return on_stop

    async def stop(self, reason: str = "gateway stopping") -> None:
        if self.stopping:
            return
        self.stopping = True
        self.bus.broadcast(encode_event("shutdown", {"reason": reason}))
        self._lifecycle()  # a gateway that never started still closes its store and providers
        assert self._stack is not None
        await self._stack.aclose()
        if self.stop_errors:
            log.error("gateway stopped with errors", steps=[name for name, _exc in self.stop_errors])
        else:
            log.info("gateway stopped")

    async def _stop_step(self, name: str, fn: Callable[[], Awaitable[object]]) -> None:
        """One step of `stop()`: a failure is logged and collected, and the next step runs."""
        try:
            await fn()
        except Exception as exc:
            self.stop_errors.append((name, exc))
            log.error("stop step failed", step=name, error=repr(exc), exc_info=exc)

    async def _close_connections(self) -> None:
        for conn in list(self.connections.values()):
            with contextlib.suppress(Exception):
                await conn.close(CLOSE_RESTART, "gateway stopping")

    async def _close_providers(self) -> None:
        for provider in (self.provider, *self.runs.providers.values()):
            with contextlib.suppress(Exception):
                await provider.aclose()

    def _task_failed(self, name: str, exc: BaseException) -> None:
        """A background task that raised is a bug: counted with the internal errors."""
        self.internal_errors += 1

    async def _ticks(self) -> None:
        while True:
            await self.clock.sleep(self.settings.tick_interval_s)
            self.bus.broadcast(encode_event("tick", {"ts": int(self.clock.time() * 1000)}))

    @property
    def background(self) -> set[asyncio.Task[Any]]:
        """The connections' close tasks alive now."""
        return {t for t in self.supervisor.tasks if t.get_name() == "connection-close"}

    def _files_outside_state_dir(self) -> list[Path]:
        log_path = self.settings.ended_hook_log
        return [] if log_path is None else log_files(log_path, self.settings.ended_hook_log_backups)

    # -- connections ----------------------------------------------------------------------------
    def admit_connection(self) -> str | None:
        if self.stopping:
            return "gateway stopping"
        if len(self.connections) >= self.settings.max_connections:
            return "too many connections"
        # Sockets still before `connect` count whatever they reached (an HTTP head included);
        # the one asking is one of them.
        pending = max(self.pending_handshakes, self.sockets.pending - 1)
        if pending >= self.settings.max_pending_handshakes:
            return "too many pending handshakes"
        return None

    def adopt(self, conn: Connection) -> None:
        self.connections[conn.conn_id] = conn
        self.pending_handshakes += 1

    def forget(self, conn: Connection) -> None:
        if self.connections.pop(conn.conn_id, None) is not None and conn.grant is None:
            self.pending_handshakes -= 1
        self.bus.detach(conn.conn_id, conn.subscribed)

    async def handshake(self, conn: Connection, raw: msgspec.Raw) -> dict[str, Any]:
        # Loopback CLIs are never locked out; a browser page on loopback is limited like the network.
        limited = conn.browser or not is_loopback(conn.peer)
        key = peer_key(conn.peer)
        if limited:
            wait_s = self.auth_limiter.retry_after_s(key)
            if wait_s is not None:
                raise Unavailable(
                    "too many failed authentication attempts from this address",
                    retry_after_ms=int(wait_s * 1000) + 1,
                )
        params = decode_params(raw, ConnectParams)
        try:
            grant = grant_for(
                params, self.credentials, nonce=conn.nonce, now_ms=int(self.clock.time() * 1000)
            )
        except Unauthorized:
            if limited:
                self.auth_limiter.failed(key)
            raise
        if limited:
            self.auth_limiter.succeeded(key)
        conn.grant = grant
        conn.client = msgspec.to_builtins(params.client)
        self.pending_handshakes -= 1
        self.bus.attach(conn.conn_id, conn)
        return self.hello(conn)

    def hello(self, conn: Connection) -> dict[str, Any]:
        assert conn.grant is not None
        return hello_ok(
            conn.grant,
            conn_id=conn.conn_id,
            settings=self.settings,
            methods=self.methods,
            uptime_ms=self.uptime_ms(),
            auth_required=self.credentials.required,
        )

    # -- dispatch -----------------------------------------------------------------------------------
    async def dispatch(self, conn: Connection, req_id: str, method: str, raw: msgspec.Raw) -> None:
        try:
            spec = self.methods.get(method)
            if spec is None:
                raise InvalidRequest(f"unknown method: {clip(method)}", details={"method": clip(method)})
            assert conn.grant is not None
            require(conn.grant, spec.scope, method)
            params = decode_params(raw, spec.params)
            result = await spec.handler(self, conn, req_id, params)
            if not isinstance(result, Deferred):
                conn.respond(req_id, result)
        except ClawgateError as exc:
            conn.respond_error(req_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.store.is_outage(exc):
                # A store call outside the store's own error mapping met an outage: retryable.
                conn.respond_error(req_id, Unavailable(f"the store is unreachable: {type(exc).__name__}"))
                return
            self.internal_errors += 1
            conn.respond_error(req_id, internal_error(exc, log, "internal error", method=clip(method)))

    # -- introspection ----------------------------------------------------------------------------
    def uptime_ms(self) -> int:
        return int((time.monotonic() - self.started_at) * 1000)

    async def status(self) -> dict[str, Any]:
        stored: dict[str, int] = {}
        # `status` must answer while the store is down (it is how an operator sees it is down).
        with self._store_may_be_down():
            stored["subagent_records"] = await self.store.count_subagents()
        with self._store_may_be_down():
            await self.webhooks.refresh_counts()
        return {
            "version": __version__,
            "serverId": self.server_id,
            "uptimeMs": self.uptime_ms(),
            "connections": len(self.connections),
            "runs": {
                "active": self.runs.running,
                "queued": self.runs.queued,
                "completed": sum(self.runs.totals.values()),
                "byStatus": dict(self.runs.totals),
            },
            "state": self.registry.sizes(),
            "stored": stored,
            "memory": {
                "rssBytes": self.admission.sample(),
                "budgetBytes": self.admission.memory_budget_bytes,
                "runResultBytes": self.runs.results.bytes,
                "sessionCacheBytes": self.sessions.cache.bytes,
                "gc": gc_status(),
            },
            "disk": await self._disk_status(),
            "store": {"kind": self.store.kind, **self.store.connection()},
            "cluster": self.cluster.describe() if self.cluster is not None else None,
            "admission": {
                "open": self.admission.open,
                "reason": self.admission.reason(),
                "refused": self.admission.refused,
            },
            "maintenance": {
                "ticks": self.maintenance.ticks,
                "sweepErrors": dict(self.maintenance.errors),
                "running": self.maintenance.running,
            },
            "provider": self.provider_stats(),
            "subagents": self.subagents.counters(),
            "webhooks": self.webhooks.describe(),
            "budgets": {"refused": self.budgets.refused},
            "mcp": self.mcp.stats(),
            "tasks": self.supervisor.describe(),
        }

    def provider_stats(self) -> dict[str, Any]:
        stats = getattr(self.provider, "stats", None)
        out: dict[str, Any] = stats() if stats is not None else {"name": self.provider.name}
        out["retries"] = dict(self.runs.provider_retries)
        return out

    @contextlib.contextmanager
    def _store_may_be_down(self) -> Iterator[None]:
        try:
            yield
        except (ClawgateError, OSError):
            pass
        except Exception as exc:
            if not self.store.is_outage(exc):
                raise

    async def _disk_status(self) -> dict[str, Any]:
        with self._store_may_be_down():
            await self.retention.refresh_stats(bytes_max_age_s=self.settings.disk_sample_interval_s)
        return {
            **self.retention.describe(),
            "stateDirBytes": self.disk.used_bytes,
            "freeBytes": self.disk.free_bytes,
            "budgetBytes": self.settings.disk_budget_bytes,
            "freeMinBytes": self.settings.disk_free_min_bytes,
        }

    def _metrics_snapshot(self) -> dict[str, Any]:
        return {
            "disk": {
                "rows": dict(self.retention.rows),
                "store_bytes": self.retention.store_bytes,
                "attachments_bytes": self.retention.attachments_bytes,
                "state_dir_bytes": self.disk.used_bytes,
                "removed": dict(self.retention.removed),
            },
            "state": self.registry.sizes(),
            "runs_total": dict(self.runs.totals),
            "sweep_errors": dict(self.maintenance.errors),
            "ticks": self.maintenance.ticks,
            "run_latency": self.runs.latency,
            "connections": len(self.connections),
            "runs_active": self.runs.running,
            "runs_queued": self.runs.queued,
            "rss": self.admission.sample(),
            "admission_open": self.admission.open,
            "store_connection": self.store.connection(),
            "provider": self.provider_stats(),
            "tokens": dict(self.usage.tokens),
            "subagents": self.subagents.counters(),
            "task_errors": dict(self.supervisor.errors),
        }

    def render_metrics(self) -> bytes:
        return render(self.metrics)

    async def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not await self.store.ping():
            return False, "store unreachable"
        reason = self.admission.reason()
        if reason is not None:
            return False, reason
        return True, "ok"


def prepare_state_dir(settings: Settings) -> None:
    """Create the state dir, refuse one that is not safe to use, tighten modes (server/statedir.py)."""
    check_state_dir(settings.state_path, store_is_sqlite=settings.store_kind == "sqlite")


__all__ = ["Forbidden", "Gateway", "StateDirError", "Unavailable"]
