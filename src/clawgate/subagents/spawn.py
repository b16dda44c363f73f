"""Spawning a subagent run: deduplication by key, the limits, the record, the child run.

The limits and the reservation of the requester's slot are one synchronous step (nothing
awaits between them), so two concurrent spawns cannot both pass them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import msgspec
import structlog

from clawgate.agent.tools import ToolCallContext
from clawgate.errors import ClawgateError, InvalidRequest, Unavailable
from clawgate.ids import RunId, SessionKey
from clawgate.protocol.schemas import SpawnParams
from clawgate.runs.service import SubmitRequest
from clawgate.sessions.keys import agent_id_of, is_subagent, subagent_key
from clawgate.store.records import SubagentRecord
from clawgate.subagents import attachments, rules
from clawgate.subagents.core import SubagentCore

log = structlog.get_logger("clawgate.subagents")


class Spawner:
    def __init__(self, core: SubagentCore) -> None:
        self.core = core

    async def depth_of(self, session_key: str) -> int:
        if not is_subagent(session_key):
            return 0
        run_id = self.core.by_child.get(SessionKey(session_key))
        rec = self.core.active.get(run_id) if run_id is not None else None
        if rec is not None:
            return rec.depth
        # Untracked (its pipeline is done, or its record swept): the depth kept with the session.
        meta = await self.core.sessions.get(SessionKey(session_key))
        return meta.depth if meta is not None and meta.depth > 0 else 1

    async def spawn(self, params: SpawnParams, scopes: frozenset[str] | None = None) -> dict[str, Any]:
        """`scopes`: the spawning run's (the tool) or None (the RPC: the child gets the default)."""
        requester = SessionKey(params.session_key)
        # The child's profile must exist; the requester's profile sets the subagent limits.
        self.core.runs.profiles.require(params.agent_id or agent_id_of(requester), "agentId")
        limits = self.core.runs.profiles.get(agent_id_of(requester)) or self.core.runs.profiles.require(
            "main", "sessionKey"
        )
        max_depth, max_children = limits.max_spawn_depth, limits.max_children_per_agent
        run_id = RunId(str(uuid.uuid4()))
        key = params.idempotency_key
        if key:
            # Deduplication comes before the limits: a retry of an accepted spawn gets its
            # runId back even when the requester is now at maxChildrenPerAgent.
            known = self.core.spawn_keys.get(key)
            if known is None:
                # Bind the key to this attempt's run id atomically, so of two concurrent
                # spawns with one key (or a retry after a restart) exactly one goes ahead.
                claimed = await self.core.store.claim_key(
                    f"spawn:{key}", run_id, self.core.settings.dedupe_ttl_s, self.core.clock.time()
                )
                known = RunId(claimed) if claimed else None
                if known is None:
                    self.core.spawn_keys.set(key, run_id)
            if known is not None:
                existing = self.core.active.get(known) or await self.core.store.get_subagent(known)
                if existing is not None:
                    return _accepted(existing)
                # The key names a spawn that was refused or is already swept: this one goes ahead.
                self.core.spawn_keys.set(key, run_id)
        depth = await self.depth_of(requester) + 1
        files = attachments.prepare(
            params.attachments or [],
            self.core.settings.attachments_max_bytes,
            self.core.settings.attachments_max_files,
        )
        # From here to `track` nothing awaits: the limits and the reservation of the slot are
        # one step, so two concurrent spawns cannot both pass them.
        if self.core.admission_check is not None:
            self.core.admission_check()
        refused = rules.check_spawn_limits(
            requester, depth, self.core.active_children(requester), max_depth, max_children
        )
        if refused is not None:
            raise refused
        agent_id = params.agent_id or agent_id_of(requester)
        child = subagent_key(agent_id)
        now = self.core.clock.time()
        rec = SubagentRecord(
            run_id=run_id,
            child_session_key=child,
            requester_session_key=requester,
            task=params.task,
            agent_id=agent_id,
            label=params.label or "",
            mode=params.mode,
            cleanup=params.cleanup,
            model=params.model,
            run_timeout_s=params.run_timeout_seconds,
            depth=depth,
            created_at=now,
        )
        message = params.task
        if files:
            message += "\n\nAttachments: " + ", ".join(name for name, _ in files)
        self.core.track(rec)
        self.core.spawns_in_flight += 1
        try:
            if files:
                await self._write_attachments(rec, child, files)
            await self.core.store.put_subagent(rec)
            # The announce only lands in an existing session (a deleted one is never
            # re-created), so the requester's session exists from the spawn on.
            if await self.core.sessions.get(requester) is None:
                await self.core.sessions.touch(requester)
            if depth > 1:
                # The depth lives with the child session too: it outlives the record's sweep
                # (an unknown depth reads as 1, so depth 1 needs no write).
                await self.core.sessions.touch(child, known_new=True, depth=depth)
            await self.core.runs.submit(
                SubmitRequest(
                    run_id=run_id,
                    session_key=child,
                    agent_id=agent_id,
                    message=message,
                    kind="subagent",
                    model=params.model,
                    timeout_s=params.run_timeout_seconds,
                    known_new_session=True,
                    webhook=params.webhook,
                    scopes=scopes,
                )
            )
        except BaseException:
            self.core.untrack(rec)
            await attachments.discard(rec.attachments_dir)
            with contextlib.suppress(ClawgateError):
                await self.core.store.delete_subagent(run_id)
                await self.core.sessions.delete(child)
            raise
        finally:
            self.core.spawns_in_flight -= 1
        # Before any await: the child cannot have started yet, so `spawned` precedes `ended`.
        self.core.event(rec, "spawned")
        return _accepted(rec)

    async def _write_attachments(
        self, rec: SubagentRecord, child: str, files: list[tuple[str, bytes]]
    ) -> None:
        run_id = rec.run_id
        try:
            # Off the event loop: file creation is blocking I/O, and slow on a busy disk. After
            # `track`, so the spawn's limits and slot reservation stay one synchronous step.
            written = await asyncio.to_thread(
                attachments.write, self.core.attachments_root, run_id, files, owner=child
            )
        except OSError as exc:
            # E.g. ELOOP: a link planted in the state dir, which is not followed.
            await attachments.discard(str(self.core.attachments_root / run_id))
            log.error("cannot write attachments", run_id=run_id, error=exc.strerror)
            raise Unavailable(f"cannot store attachments: {exc.strerror}", retry_after_ms=1000) from None
        except BaseException:
            await attachments.discard(str(self.core.attachments_root / run_id))
            raise
        rec.attachments_dir = str(written)

    async def tool_spawn(self, ctx: ToolCallContext, args: dict[str, Any]) -> dict[str, Any]:
        try:
            params = msgspec.convert({**args, "sessionKey": ctx.session_key}, SpawnParams)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"invalid sessions_spawn arguments: {exc}") from None
        return await self.spawn(params, scopes=ctx.scopes)


def _accepted(rec: SubagentRecord) -> dict[str, Any]:
    return {"status": "accepted", "runId": rec.run_id, "childSessionKey": rec.child_session_key}
