"""`sessions_list`, `sessions_history`, `sessions_send`: the session RPCs as agent tools.

Each converts its arguments to the RPC's own params (same validation and limits) and calls
the function the RPC calls; the calling run's scopes decide what it may use (read for the
first two, write for `sessions_send`, as for the methods).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from clawgate.agent.tools import READ_SCOPE, WRITE_SCOPE, Tool, ToolCallContext
from clawgate.errors import InvalidRequest
from clawgate.ids import RunId
from clawgate.methods.agent import send_to_session
from clawgate.methods.sessions import read_history, read_sessions
from clawgate.protocol.schemas import ChatSendParams, HistoryParams, SessionsListParams
from clawgate.providers.base import ToolSpec

if TYPE_CHECKING:
    from clawgate.server.gateway import Gateway

SEND_WAIT_MAX_S = 600.0

SESSIONS_LIST_SPEC = ToolSpec(
    name="sessions_list",
    description="List sessions, most recently updated first.",
    parameters={
        "type": "object",
        "properties": {
            "limit": {"type": "integer", "minimum": 1, "maximum": 10000},
            "activeMinutes": {"type": "number", "description": "only sessions updated this recently"},
            "prefix": {"type": "string", "description": "only session keys starting with this"},
        },
    },
)
SESSIONS_HISTORY_SPEC = ToolSpec(
    name="sessions_history",
    description="Read the transcript of a session.",
    parameters={
        "type": "object",
        "properties": {
            "sessionKey": {"type": "string"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        "required": ["sessionKey"],
    },
)
SESSIONS_SEND_SPEC = ToolSpec(
    name="sessions_send",
    description="Send a message to another session, starting a run there; optionally wait for its reply.",
    parameters={
        "type": "object",
        "properties": {
            "sessionKey": {"type": "string"},
            "message": {"type": "string"},
            "timeoutSeconds": {
                "type": "number",
                "description": "wait this long for the reply (0: do not wait)",
            },
        },
        "required": ["sessionKey", "message"],
    },
)


def _convert(args: dict[str, Any], kind: type[Any], tool: str) -> Any:
    try:
        return msgspec.convert(args, kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid {tool} arguments: {exc}") from None


def session_tools(gw: Gateway) -> list[Tool]:
    async def sessions_list(ctx: ToolCallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await read_sessions(gw, _convert(args, SessionsListParams, "sessions_list"))

    async def sessions_history(ctx: ToolCallContext, args: dict[str, Any]) -> dict[str, Any]:
        return await read_history(gw, _convert(args, HistoryParams, "sessions_history"))

    async def sessions_send(ctx: ToolCallContext, args: dict[str, Any]) -> dict[str, Any]:
        wait_s = args.get("timeoutSeconds", 0)
        if not isinstance(wait_s, int | float) or not 0 <= wait_s <= SEND_WAIT_MAX_S:
            raise InvalidRequest(f"timeoutSeconds must be a number from 0 to {SEND_WAIT_MAX_S:g}")
        fields = {k: v for k, v in args.items() if k in ("sessionKey", "message")}
        params = _convert(
            {**fields, "idempotencyKey": f"send:{uuid.uuid4().hex}"}, ChatSendParams, "sessions_send"
        )
        if params.session_key == ctx.session_key:
            # Its run would queue behind the caller's own in the session lane: a deadlock.
            raise InvalidRequest(
                "sessions_send cannot target the calling session", details={"field": "sessionKey"}
            )
        accepted = await send_to_session(gw, params, None, ctx.scopes)
        if not wait_s:
            return accepted
        rec = await gw.runs.wait(RunId(accepted["runId"]), float(wait_s))
        if rec is None:
            return {**accepted, "status": "timeout"}
        out: dict[str, Any] = {"runId": rec.run_id, "status": rec.status, "reply": rec.result_text or ""}
        if rec.error:
            out["error"] = rec.error
        return out

    return [
        Tool(SESSIONS_LIST_SPEC, sessions_list, scope=READ_SCOPE),
        Tool(SESSIONS_HISTORY_SPEC, sessions_history, scope=READ_SCOPE),
        Tool(SESSIONS_SEND_SPEC, sessions_send, scope=WRITE_SCOPE),
    ]
