"""The gateway: the composition root that owns every component and their lifecycle.

Start order: store -> sessions/bus/runs/subagents -> restore -> maintenance ->
admission -> ticks. Stop order is the reverse, and every step is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
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
from clawgate.errors import ClawgateError, Forbidden, Internal, InvalidRequest, Unauthorized, Unavailable
from clawgate.events.bus import EventBus
from clawgate.events.session_events import SessionEventPublisher
from clawgate.methods.agent import final_payload
from clawgate.methods.table import Deferred, MethodSpec, build_table
from clawgate.metrics import make_registry, render
from clawgate.protocol.device import signature_token, verify_device_signature
from clawgate.protocol.frames import decode_params, encode_event
from clawgate.protocol.schemas import ConnectParams
from clawgate.providers.base import Provider
from clawgate.providers.factory import make_provider
from clawgate.retention.disk import DiskMonitor
from clawgate.retention.service import Retention
from clawgate.runs.service import RunService
from clawgate.server.auth import authorize, require
from clawgate.server.authlimit import AuthFailureLimiter, peer_key
from clawgate.server.connection import Connection
from clawgate.server.credentials import load_credentials
from clawgate.server.peerlog import PeerLog
from clawgate.server.sockets import SocketLedger, max_sockets
from clawgate.server.statedir import StateDirError, check_state_dir
from clawgate.sessions.service import SessionService
from clawgate.sessions.view import ModelDefaults
from clawgate.settings import Settings, is_loopback
from clawgate.state.clock import Clock, SystemClock
from clawgate.state.maintenance import Maintenance
from clawgate.state.registry import StateRegistry
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

EVENTS = [
    "connect.challenge",
    "agent",
    "chat",
    "subagent",
    "sessions.changed",
    "session.message",
    "tick",
    "shutdown",
]


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
        self.store = store or open_store(settings)
        self.provider = provider or make_provider(settings, self.clock)
        # Scale-out: on a shared Redis store (unless a store is handed in) this process is one
        # member of a cluster. The member is built first: the bus and the run service take
        # its ports (relay, dispatch) at construction; the core is bound to it below.
        self.cluster: ClusterMember | None = None
        if settings.store_kind == "redis" and store is None:
            from clawgate.scaleout.member import ClusterMember

            self.cluster = ClusterMember(settings, self.clock, self.registry, self.store)
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
        self.mcp = McpManager(settings, self.clock, self.registry)
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
            admit=self.budgets.admit,
            # A run's webhook delivery is written in the same transaction as its end.
            end_writer=self.webhooks.finish_run,
            mcp_tools=self.mcp.tools_for,
        )
        self.subagents = SubagentService(
            settings, self.clock, self.registry, self.store, self.bus, self.sessions, self.runs
        )
        for kind in sorted({p.provider for p in self.runs.profiles} - {settings.provider}):
            self.runs.providers[kind] = make_provider(
                settings.model_copy(update={"provider": kind}), self.clock
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
        self.background: set[asyncio.Task[Any]] = set()
        self.registry.add(
            "background_tasks", self.background.__len__, ttl_s=None, max_size=2 * settings.max_connections
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
        self._tick_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self.started:
            return
        await self.store.open()
        await self.usage.store.open()
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
        self.disk.start()
        # Unconditional (rule 5): the sweeper runs whatever was, or was not, restored.
        self.maintenance.start()
        self.admission.start()
        self.subagents.start()
        await self.webhooks.start()  # after the restore: deliveries left by a crash go out now
        if self.settings.cron_enabled:
            await self.cron.start()  # after the restore: an overdue job fires once, now
        else:
            await self.cron.store.open()
        self._tick_task = asyncio.create_task(self._ticks(), name="clawgate-ticks")
        self.started = True
        log.info(
            "gateway started",
            store=self.store.kind,
            requeued=requeued,
            interrupted=interrupted,
            subagents_restored=restored,
        )

    async def stop(self, reason: str = "gateway stopping") -> None:
        if self.stopping:
            return
        self.stopping = True
        self.bus.broadcast(encode_event("shutdown", {"reason": reason}))
        await self.cron.stop()
        if self.cluster is not None:
            # First hand the shared queues back (running runs get the grace period, then
            # become orphans another process reports), then stop like a single process.
            await self.cluster.stop_dispatch()
        await self.runs.drain(self.settings.shutdown_grace_s)
        if self.cluster is not None:
            await self.cluster.close()
        await self.subagents.stop()
        await self.webhooks.stop()  # after the drain: the last run ends' deliveries are in the outbox
        await self.mcp.close()
        for task in (self._tick_task,):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.maintenance.stop()
        await self.admission.stop()
        await self.disk.stop()
        for conn in list(self.connections.values()):
            with contextlib.suppress(Exception):
                await conn.close(1012, "gateway stopping")
        for task in list(self.background):
            task.cancel()
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
        await self.store.close()
        with contextlib.suppress(Exception):
            await self.provider.aclose()
        for extra in self.runs.providers.values():
            with contextlib.suppress(Exception):
                await extra.aclose()
        log.info("gateway stopped")

    def own(self, task: asyncio.Task[Any]) -> None:
        """Background tasks never lose their exceptions: they are owned, logged and counted."""
        self.background.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.internal_errors += 1
            log.error("background task failed", task=task.get_name(), error=repr(task.exception()))

    async def _ticks(self) -> None:
        while True:
            await self.clock.sleep(self.settings.tick_interval_s)
            self.bus.broadcast(encode_event("tick", {"ts": int(self.clock.time() * 1000)}))

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
            grant = authorize(params, self.credentials)
            if params.device is not None:
                verify_device_signature(
                    params.device,
                    client_id=params.client.id,
                    client_mode=params.client.mode,
                    role=params.role,
                    scopes=params.scopes or [],
                    token=signature_token(msgspec.to_builtins(params.auth) if params.auth else None),
                    nonce=conn.nonce,
                    now_ms=int(self.clock.time() * 1000),
                    platform=params.client.platform,
                    device_family=params.client.device_family,
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
        s = self.settings
        # Every object of OpenClaw's HelloOkSchema is closed (additionalProperties: false), so
        # only fields that schema names go here: stricter OpenClaw clients reject anything else.
        return {
            "type": "hello-ok",
            "protocol": conn.grant.protocol,
            "server": {"version": __version__, "connId": conn.conn_id},
            "features": {"methods": sorted(self.methods), "events": EVENTS},
            "snapshot": {
                "presence": [],
                "health": {"ok": True},
                "stateVersion": {"presence": 0, "health": 0},
                "uptimeMs": self.uptime_ms(),
                "sessionDefaults": {
                    "defaultAgentId": "main",
                    "mainKey": "main",
                    "mainSessionKey": "agent:main:main",
                },
                "authMode": "token" if self.credentials.required else "none",
            },
            "policy": {
                "maxPayload": s.max_payload_bytes,
                "maxBufferedBytes": s.max_buffered_bytes,
                "tickIntervalMs": int(s.tick_interval_s * 1000),
            },
            "auth": {
                "method": conn.grant.method,
                "role": conn.grant.role,
                "scopes": sorted(conn.grant.scopes),
            },
        }

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
            correlation = uuid.uuid4().hex[:12]
            log.exception("internal error", method=clip(method), correlation_id=correlation)
            conn.respond_error(
                req_id,
                Internal(f"internal error ({type(exc).__name__})", details={"correlationId": correlation}),
            )

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
