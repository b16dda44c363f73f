"""The subagent registry service: the life of a spawned run, from spawn to sweep.

A face over the registry's parts, keeping the API the gateway, the methods and the
scale-out glue use:
  - subagents/core.py      the tracked records, the bounded pipeline tasks, the store steps;
  - subagents/spawn.py     spawn: deduplication, limits (subagents/rules.py), the child run;
  - subagents/pipeline.py  after a child run ends: [pending error grace] -> ended ->
                           announce -> cleanup -> ended hook (once) -> done;
  - subagents/sweep.py     the archive sweep of finished records; load and resume after a restart.

Long-tail rules: every step retries a failing store call with backoff, and a
pipeline that still fails hands its record to the archive sweep (`stranded`),
which finishes it; every hook call has a timeout; every write after the spawn is
conditional (a record removed by a sweep is never re-inserted); on a shared
store a process holds a claim on each record it works on, and the sweep of
another process skips it; the maintenance tick never waits for a hook.
"""

from __future__ import annotations

from typing import Any

from clawgate.agent.tools import SESSIONS_SPAWN_SPEC, Tool, ToolCallContext
from clawgate.events.bus import EventBus
from clawgate.ids import RunId, SessionKey
from clawgate.protocol.schemas import SpawnParams
from clawgate.runs.service import RunService
from clawgate.sessions.service import SessionService
from clawgate.settings import Settings
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry
from clawgate.state.supervisor import Supervisor
from clawgate.store.base import Store
from clawgate.store.records import RunRecord, SubagentRecord
from clawgate.subagents.core import PendingError, SubagentCore, Superseded
from clawgate.subagents.pipeline import Pipeline
from clawgate.subagents.spawn import Spawner
from clawgate.subagents.sweep import Sweeper

__all__ = ["PendingError", "SubagentService", "Superseded"]


class SubagentService(SubagentCore):
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        registry: StateRegistry,
        store: Store,
        bus: EventBus,
        sessions: SessionService,
        runs: RunService,
        *,
        tasks: Supervisor | None = None,
    ) -> None:
        super().__init__(settings, clock, registry, store, bus, sessions, runs, tasks=tasks)
        self.spawner = Spawner(self)
        self.pipeline = Pipeline(self)
        self.sweeper = Sweeper(self, self.pipeline)
        self.on_pending_expired = self.pipeline.on_pending_expired
        registry.add_sweep("subagent_archive", self.sweep_store)
        # Its hooks, its bus listener and its tool are registered by the composition root
        # (server/gateway.py), with the rest of the wiring.

    # -- spawn ------------------------------------------------------------------------------------------
    async def spawn(self, params: SpawnParams, scopes: frozenset[str] | None = None) -> dict[str, Any]:
        """`scopes`: the spawning run's (the tool) or None (the RPC: the child gets the default)."""
        return await self.spawner.spawn(params, scopes)

    async def depth_of(self, session_key: str) -> int:
        return await self.spawner.depth_of(session_key)

    def spawn_tool(self) -> Tool:
        """The `sessions_spawn` agent tool (the gateway registers it with the run service)."""
        return Tool(SESSIONS_SPAWN_SPEC, self._tool_spawn)

    async def _tool_spawn(self, ctx: ToolCallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await self.spawner.tool_spawn(ctx, args)

    # -- run lifecycle (the run service's hooks and the event bus listener) --------------------------------
    def on_run_start(self, run: RunRecord) -> None:
        self.pipeline.on_run_start(run)

    def on_run_end(self, run: RunRecord) -> None:
        """The run service's end hook: a child run's end starts its pipeline."""
        self.pipeline.on_run_end(run)

    def on_agent_event(self, run_id: RunId, key: SessionKey, stream: str, data: dict[str, Any]) -> None:
        """The event bus listener: a child's agent events feed its pipeline."""
        self.pipeline.on_event(run_id, key, stream, data)

    # -- scale-out (Redis) ------------------------------------------------------------------------
    async def adopt(self, run_id: str) -> None:
        """This process is about to execute (or orphan) a child run spawned by another process:
        track its record here so the end hook runs its pipeline."""
        await self.pipeline.adopt(run_id)

    def forget_remote(self, run_id: RunId) -> None:
        """Another process ended this child run and runs its pipeline: stop tracking it here."""
        self.pipeline.forget_remote(run_id)

    # -- release ---------------------------------------------------------------------------------------
    async def release_requester(self, requester: SessionKey) -> int:
        """The requester session is gone: its unfinished children are reported `released`."""
        return await self.pipeline.release_requester(requester)

    # -- the TTL sweep and restore ---------------------------------------------------------------------
    async def sweep_store(self) -> int:
        return await self.sweeper.sweep_store()

    async def load(self) -> int:
        """Before runs are restored: bring live records back into memory."""
        return await self.sweeper.load()

    async def resume(self) -> int:
        """After runs are restored: end what has no live run, continue every unfinished pipeline."""
        return await self.sweeper.resume()

    async def restore(self) -> int:
        return len(self.active)

    async def list(self, requester: str | None, limit: int) -> list[SubagentRecord]:
        stored = await self.store.list_subagents(requester, limit)
        live = {
            r.run_id: r
            for r in self.active.values()
            if requester is None or r.requester_session_key == requester
        }
        out = [live.pop(r.run_id, r) for r in stored]
        out.extend(live.values())
        return out[:limit]
