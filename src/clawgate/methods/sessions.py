"""`chat.history`, `sessions.list`, `sessions.patch`, `sessions.reset`, `sessions.delete`,
`sessions.cleanup`, and for OpenClaw's interactive clients `sessions.subscribe`,
`sessions.describe`, `sessions.create` and `sessions.resolve`."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from clawgate.clip import clip
from clawgate.errors import Forbidden, InvalidRequest, NotFound
from clawgate.ids import SessionKey
from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import ADMIN, READ, WRITE
from clawgate.protocol.frames import encode_response
from clawgate.protocol.schemas import (
    EmptyParams,
    HistoryParams,
    SessionKeyParams,
    SessionsCleanupParams,
    SessionsCreateParams,
    SessionsDescribeParams,
    SessionsListParams,
    SessionsPatchParams,
    SessionsResolveParams,
)
from clawgate.sessions.history import parse_cursor
from clawgate.sessions.keys import agent_id_of, is_valid, qualify
from clawgate.sessions.view import session_row

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core


async def history(gw: Core, conn: Caller, req_id: str, params: HistoryParams) -> dict[str, Any]:
    """The newest `limit` messages (oldest first) that fit in one frame under maxPayload.

    `truncated` says the reader is not seeing the whole history: the byte bound shaped the
    page (fewer messages than asked, or one cut; `nextCursor`, when present, reads the older
    messages, sessions/history.py), or retention dropped the oldest messages of the
    transcript (`droppedMessages`, session_max_messages / session_max_bytes).
    """
    return await read_history(gw, params, req_id)


async def read_history(gw: Core, params: HistoryParams, req_id: str = "") -> dict[str, Any]:
    """`chat.history` and the `sessions_history` tool: one page under maxPayload."""
    try:
        before = parse_cursor(None if params.cursor is None else str(params.cursor))
    except ValueError:
        raise InvalidRequest("invalid chat.history cursor", details={"field": "params.cursor"}) from None
    key = SessionKey(params.session_key)
    meta = await gw.sessions.get(key)
    # OpenClaw's clients read the session id and the model defaults beside the messages.
    extra: dict[str, Any] = {"defaults": gw.model_defaults.to_wire()}
    if meta is not None:
        extra["sessionId"] = meta.session_id
    page = await gw.sessions.history_page(
        key,
        before=before,
        limit=params.limit,
        budget=_history_budget(gw.settings.max_payload_bytes, req_id, params.session_key, extra),
    )
    out: dict[str, Any] = {
        "sessionKey": params.session_key,
        "messages": page.messages,
        "truncated": page.truncated,
        **extra,
    }
    if page.next_cursor is not None:
        out["nextCursor"] = page.next_cursor
    dropped = await gw.sessions.dropped(SessionKey(params.session_key))
    if dropped:
        out["truncated"] = True
        out["droppedMessages"] = dropped
    return out


def _history_budget(max_payload: int, req_id: str, session_key: str, extra: dict[str, Any]) -> int:
    """Bytes left for the `messages` list once the largest envelope around it is counted."""
    envelope = encode_response(
        req_id,
        {
            "sessionKey": session_key,
            "messages": [],
            "truncated": True,
            "nextCursor": "9" * 19,
            "droppedMessages": 10**12,
            **extra,
        },
    )
    return max_payload - len(envelope) + len(b"[]")


NOTHING = "\x00"  # a prefix no session key has


def list_prefix(prefix: str | None, agent_id: str | None) -> str | None:
    """The one key prefix meaning "starts with `prefix` and belongs to `agent_id`"."""
    if agent_id is None:
        return prefix
    agent_prefix = f"agent:{agent_id}:"
    if prefix is None or agent_prefix.startswith(prefix):
        return agent_prefix
    return prefix if prefix.startswith(agent_prefix) else NOTHING


async def list_sessions(gw: Core, conn: Caller, req_id: str, params: SessionsListParams) -> dict[str, Any]:
    return await read_sessions(gw, params)


async def read_sessions(gw: Core, params: SessionsListParams) -> dict[str, Any]:
    """`sessions.list` and the `sessions_list` tool."""
    since = gw.clock.time() - params.active_minutes * 60 if params.active_minutes else None
    prefix = list_prefix(params.prefix, params.agent_id)
    if prefix == NOTHING:
        return {"sessions": [], "count": 0, "defaults": gw.model_defaults.to_wire()}
    metas = await gw.store.list_sessions(limit=params.limit, updated_since=since, prefix=prefix)
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
    return {"sessions": sessions, "count": len(sessions), "defaults": gw.model_defaults.to_wire()}


async def patch(gw: Core, conn: Caller, req_id: str, params: SessionsPatchParams) -> dict[str, Any]:
    model = params.model if isinstance(params.model, str) else None
    meta = await gw.sessions.patch(
        SessionKey(params.key),
        label=params.label,
        model=model,
        clear_model=params.model is None,
        budget_tokens=params.budget_tokens,
    )
    out: dict[str, Any] = {"ok": True, "key": params.key}
    if meta.budget_tokens:
        out["budgetTokens"] = meta.budget_tokens
    return out


def _refuse_if_busy(gw: Core, key: str, what: str) -> None:
    for run in gw.runs.active.values():
        if run.record.session_key == key:
            raise Forbidden(
                f"cannot {what} session {clip(key)} while a run is active in it",
                details={"runId": run.record.run_id},
            )


async def reset(gw: Core, conn: Caller, req_id: str, params: SessionKeyParams) -> dict[str, Any]:
    _refuse_if_busy(gw, params.key, "reset")
    # Resetting nothing would answer with a session id that exists nowhere.
    if await gw.sessions.get(SessionKey(params.key)) is None:
        raise NotFound(f"unknown session {clip(params.key)}", details={"key": params.key})
    await gw.sessions.reset(SessionKey(params.key))
    return {"ok": True, "key": params.key}


async def delete(gw: Core, conn: Caller, req_id: str, params: SessionKeyParams) -> dict[str, Any]:
    _refuse_if_busy(gw, params.key, "delete")
    key = SessionKey(params.key)
    # Idempotent: a requester with no session row yet may still have children to release.
    existed = await gw.sessions.get(key) is not None
    await gw.subagents.release_requester(key)
    await gw.sessions.delete(key)
    return {"ok": True, "key": params.key, "deleted": existed}


async def cleanup(gw: Core, conn: Caller, req_id: str, params: SessionsCleanupParams) -> dict[str, Any]:
    """Run every retention rule now (admin); with `dryRun`, report what would go and delete nothing."""
    removed = await gw.retention.run(dry_run=params.dry_run)
    return {
        "ok": True,
        "dryRun": params.dry_run,
        "removed": removed,
        "total": sum(removed.values()),
        "disk": gw.retention.describe(),
    }


def _key(raw: str, agent_id: str | None) -> SessionKey:
    key = qualify(raw, agent_id)
    if not is_valid(key):
        raise InvalidRequest(f"invalid session key: {raw}", details={"field": "params.key"})
    return key


async def subscribe_sessions(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    """Every session's events from now on, as OpenClaw broadcasts them to its operators: the
    runs' `agent` / `chat` streams, `sessions.changed` and `session.message`. It is the
    bus's `all` subscription (`events.subscribe {all: true}`): one entry per connection,
    dropped with the connection."""
    gw.bus.subscribe(conn.conn_id, [], all_sessions=True)
    return {"subscribed": True}


async def describe(gw: Core, conn: Caller, req_id: str, params: SessionsDescribeParams) -> dict[str, Any]:
    meta = await gw.sessions.get(_key(params.key, params.agent_id))
    return {"session": session_row(meta, gw.model_defaults) if meta is not None else None}


async def create(gw: Core, conn: Caller, req_id: str, params: SessionsCreateParams) -> dict[str, Any]:
    """Create a session, or adopt the one that has this key already (as OpenClaw does)."""
    key = _key(params.key or str(uuid.uuid4()), params.agent_id)
    meta = await gw.sessions.get(key)
    if meta is None:
        meta = await gw.sessions.touch(key, known_new=True, label=params.label)
        if params.model is not None:
            meta = await gw.sessions.patch(key, label=None, model=params.model)
    return {
        "ok": True,
        "key": key,
        "sessionId": meta.session_id,
        "entry": session_row(meta, gw.model_defaults),
    }


async def resolve(gw: Core, conn: Caller, req_id: str, params: SessionsResolveParams) -> dict[str, Any]:
    """The key of a session given by key, session id or label; `{ok: false}` when none matches."""
    if params.key is not None:
        key = _key(params.key, params.agent_id)
        return _resolved(key) if await gw.sessions.get(key) is not None else {"ok": False}
    prefix = f"agent:{params.agent_id}:" if params.agent_id else None
    # Bounded scan of the most recently updated sessions: labels and ids are not indexed.
    metas = await gw.store.list_sessions(limit=RESOLVE_SCAN_LIMIT, updated_since=None, prefix=prefix)
    matches = [
        m.key
        for m in metas
        if (params.session_id is not None and m.session_id == params.session_id)
        or (params.label is not None and m.label == params.label)
    ]
    if len(matches) == 1:
        return _resolved(matches[0])
    if not matches:
        return {"ok": False}
    return {"ok": False, "candidates": [_candidate(k) for k in matches[:RESOLVE_MAX_CANDIDATES]]}


def _candidate(key: str) -> dict[str, Any]:
    return {"key": key, "agentId": agent_id_of(key)}


def _resolved(key: str) -> dict[str, Any]:
    return {"ok": True, **_candidate(key)}


RESOLVE_SCAN_LIMIT = 10_000
RESOLVE_MAX_CANDIDATES = 10  # OpenClaw's bound

METHODS = [
    MethodSpec("chat.history", HistoryParams, READ, history),
    MethodSpec("sessions.list", SessionsListParams, READ, list_sessions),
    MethodSpec("sessions.patch", SessionsPatchParams, WRITE, patch),
    MethodSpec("sessions.reset", SessionKeyParams, WRITE, reset),
    MethodSpec("sessions.delete", SessionKeyParams, WRITE, delete),
    MethodSpec("sessions.cleanup", SessionsCleanupParams, ADMIN, cleanup),
    MethodSpec("sessions.subscribe", EmptyParams, READ, subscribe_sessions),
    MethodSpec("sessions.describe", SessionsDescribeParams, READ, describe),
    MethodSpec("sessions.create", SessionsCreateParams, WRITE, create),
    MethodSpec("sessions.resolve", SessionsResolveParams, READ, resolve),
]
