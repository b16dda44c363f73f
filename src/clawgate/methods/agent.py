"""`agent`, `chat.send`, `agent.wait`, `agent.abort`, `chat.abort`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clawgate.automation.webhook_rules import check_url
from clawgate.ids import MAIN_SESSION, ConnId, RunId, SessionKey
from clawgate.methods.spec import DEFERRED, Deferred, MethodSpec
from clawgate.protocol.constants import READ, WRITE
from clawgate.protocol.schemas import AbortParams, AgentParams, ChatAbortParams, ChatSendParams, WaitParams
from clawgate.runs.service import SubmitRequest
from clawgate.sessions.keys import agent_id_of
from clawgate.store.records import RunRecord

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core


def final_payload(rec: RunRecord) -> dict[str, Any]:
    """The final `agent` answer, shaped as OpenClaw's."""
    payload: dict[str, Any] = {
        "runId": rec.run_id,
        "status": rec.status,
        "summary": "completed" if rec.status == "ok" else (rec.error or rec.status),
        "result": {
            "payloads": [{"text": rec.result_text or "", "mediaUrl": None}] if rec.result_text else [],
            "meta": {"durationMs": rec.duration_ms or 0, "sessionKey": rec.session_key}
            | ({"usage": rec.usage} if rec.usage else {}),
        },
    }
    if rec.error:
        payload["error"] = rec.error
    return payload


def accepted_payload(rec: RunRecord) -> dict[str, Any]:
    return {
        "runId": rec.run_id,
        "sessionKey": rec.session_key,
        "agentId": rec.agent_id,
        "status": "accepted",
        "acceptedAt": int(rec.accepted_at * 1000),
    }


async def agent(gw: Core, conn: Caller, req_id: str, params: AgentParams) -> Deferred:
    gw.admission.check()
    # Refused before a run is accepted whose final answer this connection could not take.
    gw.runs.waiters.check_connection(conn.conn_id)
    key = SessionKey(
        params.session_key or (f"agent:{params.agent_id}:main" if params.agent_id else MAIN_SESSION)
    )
    agent_id = params.agent_id or agent_id_of(key)
    gw.runs.profiles.require(agent_id, "agentId" if params.agent_id else "sessionKey")
    run, rec, _created = await gw.runs.submit(
        SubmitRequest(
            run_id=RunId(params.idempotency_key),
            session_key=key,
            agent_id=agent_id,
            scopes=conn.grant.scopes if conn.grant is not None else None,
            message=params.message,
            model=params.model,
            timeout_s=params.timeout,
            extra_system_prompt=params.extra_system_prompt,
            owner=conn.conn_id,
            label=params.label,
            webhook=check_url(params.webhook) if params.webhook is not None else None,
        )
    )
    # Registered before the accepted response, so a waiter cap refuses the request as a whole
    # (a retry with the same key joins the run). The listener goes if the connection closes.
    ended = gw.runs.follow(run, rec, lambda final: conn.respond(req_id, final_payload(final)), conn.conn_id)
    conn.respond(req_id, accepted_payload(rec))
    if ended is not None:  # a retry of a run that already ended
        conn.respond(req_id, final_payload(ended))
    return DEFERRED


async def chat_send(gw: Core, conn: Caller, req_id: str, params: ChatSendParams) -> dict[str, Any]:
    return await send_to_session(gw, params, conn.conn_id, conn.grant.scopes if conn.grant else None)


async def send_to_session(
    gw: Core, params: ChatSendParams, owner: ConnId | None, scopes: frozenset[str] | None
) -> dict[str, Any]:
    """`chat.send` and the `sessions_send` tool: admission, profile check, the shared submit."""
    gw.admission.check()
    key = SessionKey(params.session_key)
    gw.runs.profiles.require(agent_id_of(key), "sessionKey")
    _run, rec, _created = await gw.runs.submit(
        SubmitRequest(
            run_id=RunId(params.idempotency_key),
            session_key=key,
            agent_id=agent_id_of(key),
            scopes=scopes,
            message=params.message,
            timeout_s=params.timeout_ms / 1000 if params.timeout_ms else None,
            owner=owner,
            webhook=check_url(params.webhook) if params.webhook is not None else None,
        )
    )
    return {"runId": rec.run_id, "status": "started" if not rec.is_final else rec.status}


async def wait(gw: Core, conn: Caller, req_id: str, params: WaitParams) -> dict[str, Any]:
    run_id = RunId(params.run_id)
    rec = await gw.runs.wait(run_id, params.timeout_ms / 1000, owner=conn.conn_id)
    if rec is None:
        return {"runId": run_id, "status": "timeout"}
    out: dict[str, Any] = {"runId": run_id, "status": rec.status}
    if rec.started_at is not None:
        out["startedAt"] = int(rec.started_at * 1000)
    if rec.ended_at is not None:
        out["endedAt"] = int(rec.ended_at * 1000)
    if rec.error:
        out["error"] = rec.error
    if rec.usage:
        out["usage"] = rec.usage
    return out


async def abort(gw: Core, conn: Caller, req_id: str, params: AbortParams) -> dict[str, Any]:
    return {"runId": params.run_id, "aborted": gw.runs.abort(RunId(params.run_id))}


async def chat_abort(gw: Core, conn: Caller, req_id: str, params: ChatAbortParams) -> dict[str, Any]:
    aborted: list[str] = []
    if params.run_id:
        if gw.runs.abort(RunId(params.run_id)):
            aborted.append(params.run_id)
    else:
        for run in list(gw.runs.active.values()):
            if run.record.session_key == params.session_key and gw.runs.abort(run.record.run_id):
                aborted.append(run.record.run_id)
    return {"ok": True, "aborted": bool(aborted), "runIds": aborted}


METHODS = [
    MethodSpec("agent", AgentParams, WRITE, agent),
    MethodSpec("chat.send", ChatSendParams, WRITE, chat_send),
    MethodSpec("agent.wait", WaitParams, READ, wait),
    MethodSpec("agent.abort", AbortParams, WRITE, abort),
    MethodSpec("chat.abort", ChatAbortParams, WRITE, chat_abort),
]
