"""`chat.history`, `sessions.list`, `sessions.patch`, `sessions.reset`, `sessions.delete`, `sessions.cleanup`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clawgate.clip import clip
from clawgate.errors import Forbidden, NotFound
from clawgate.ids import SessionKey
from clawgate.methods.table import MethodSpec
from clawgate.protocol.schemas import (
    HistoryParams,
    SessionKeyParams,
    SessionsCleanupParams,
    SessionsListParams,
    SessionsPatchParams,
)
from clawgate.server.auth import ADMIN, READ, WRITE

if TYPE_CHECKING:
    from clawgate.server.connection import Connection
    from clawgate.server.gateway import Gateway


async def history(gw: Gateway, conn: Connection, req_id: str, params: HistoryParams) -> dict[str, Any]:
    return await read_history(gw, params)


async def read_history(gw: Gateway, params: HistoryParams) -> dict[str, Any]:
    """`chat.history` and the `sessions_history` tool."""
    messages = await gw.sessions.history(SessionKey(params.session_key), params.limit)
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content, "ts": int(m.ts * 1000)}
        if m.run_id:
            item["runId"] = m.run_id
        out.append(item)
    result: dict[str, Any] = {"sessionKey": params.session_key, "messages": out}
    # Retention dropped the oldest messages of this transcript (session_max_messages/_bytes).
    dropped = await gw.sessions.dropped(SessionKey(params.session_key))
    result["truncated"] = dropped > 0
    if dropped:
        result["droppedMessages"] = dropped
    return result


async def list_sessions(
    gw: Gateway, conn: Connection, req_id: str, params: SessionsListParams
) -> dict[str, Any]:
    return await read_sessions(gw, params)


async def read_sessions(gw: Gateway, params: SessionsListParams) -> dict[str, Any]:
    """`sessions.list` and the `sessions_list` tool."""
    since = gw.clock.time() - params.active_minutes * 60 if params.active_minutes else None
    metas = await gw.store.list_sessions(limit=params.limit, updated_since=since, prefix=params.prefix)
    sessions = []
    for m in metas:
        item: dict[str, Any] = {
            "key": m.key,
            "sessionId": m.session_id,
            "createdAt": int(m.created_at * 1000),
            "updatedAt": int(m.updated_at * 1000),
            "kind": m.kind,
        }
        if m.label:
            item["label"] = m.label
        if m.model:
            item["model"] = m.model
        sessions.append(item)
    return {"sessions": sessions, "count": len(sessions)}


async def patch(gw: Gateway, conn: Connection, req_id: str, params: SessionsPatchParams) -> dict[str, Any]:
    await gw.sessions.patch(SessionKey(params.key), label=params.label, model=params.model)
    return {"ok": True, "key": params.key}


def _refuse_if_busy(gw: Gateway, key: str, what: str) -> None:
    for run in gw.runs.active.values():
        if run.record.session_key == key:
            raise Forbidden(
                f"cannot {what} session {clip(key)} while a run is active in it",
                details={"runId": run.record.run_id},
            )


async def reset(gw: Gateway, conn: Connection, req_id: str, params: SessionKeyParams) -> dict[str, Any]:
    _refuse_if_busy(gw, params.key, "reset")
    # Resetting nothing would answer with a session id that exists nowhere.
    if await gw.sessions.get(SessionKey(params.key)) is None:
        raise NotFound(f"unknown session {clip(params.key)}", details={"key": params.key})
    await gw.sessions.reset(SessionKey(params.key))
    return {"ok": True, "key": params.key}


async def delete(gw: Gateway, conn: Connection, req_id: str, params: SessionKeyParams) -> dict[str, Any]:
    _refuse_if_busy(gw, params.key, "delete")
    key = SessionKey(params.key)
    # Idempotent: a requester with no session row yet may still have children to release.
    existed = await gw.sessions.get(key) is not None
    await gw.subagents.release_requester(key)
    await gw.sessions.delete(key)
    return {"ok": True, "key": params.key, "deleted": existed}


async def cleanup(
    gw: Gateway, conn: Connection, req_id: str, params: SessionsCleanupParams
) -> dict[str, Any]:
    """Run every retention rule now (admin); with `dryRun`, report what would go and delete nothing."""
    removed = await gw.retention.run(dry_run=params.dry_run)
    return {
        "ok": True,
        "dryRun": params.dry_run,
        "removed": removed,
        "total": sum(removed.values()),
        "disk": gw.retention.describe(),
    }


METHODS = [
    MethodSpec("chat.history", HistoryParams, READ, history),
    MethodSpec("sessions.list", SessionsListParams, READ, list_sessions),
    MethodSpec("sessions.patch", SessionsPatchParams, WRITE, patch),
    MethodSpec("sessions.reset", SessionKeyParams, WRITE, reset),
    MethodSpec("sessions.delete", SessionKeyParams, WRITE, delete),
    MethodSpec("sessions.cleanup", SessionsCleanupParams, ADMIN, cleanup),
]
