"""Native REST routes and inbound hooks on the gateway port.

    POST /v1/runs                 202 {runId, ...}        start a run (write)
    POST /v1/runs/wait            200 final | 202 running start and wait (write)
    GET  /v1/runs/{runId}         200 run state           (read)
    POST /v1/runs/{runId}/cancel  200 {runId, aborted}    (write)
    GET  /v1/runs/{runId}/events  SSE, id = seq           resumable with Last-Event-ID (read)
    GET  /v1/sessions/{key}/history                      (read)
    POST /hooks/agent             202 {runId} | 200 result with waitForCompletion (hooks token)
    POST /hooks/wake              200                    a system message into a session (hooks token)

Field names are the WS protocol's. Errors are `{ok:false, error:{code, message, ...}}` with the
HTTP status of their code.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from clawgate.automation.webhook_rules import check_url
from clawgate.errors import ClawgateError, InvalidRequest, NotFound, internal_error
from clawgate.ids import RunId, SessionKey
from clawgate.methods.agent import accepted_payload, final_payload
from clawgate.methods.agents import ToolsInvokeParams
from clawgate.methods.agents import invoke as invoke_tool
from clawgate.protocol.constants import ADMIN, READ, WRITE
from clawgate.protocol.schemas import SESSION_KEY_PATTERN
from clawgate.server.gateway import Gateway
from clawgate.server.http_common import (
    BodyLimits,
    HttpAuth,
    RunStart,
    error_response,
    new_run_id,
    read_json,
    session_agent,
    start_run,
)
from clawgate.server.http_events import RunBuffer, RunEventLog
from clawgate.server.http_schemas import HookAgentBody, HookWakeBody, RunBody, RunWaitBody
from clawgate.store.records import RunRecord

log = structlog.get_logger("clawgate.http")

Endpoint = Callable[[Request], Awaitable[Response]]
_SESSION_KEY = re.compile(SESSION_KEY_PATTERN)


def guarded(fn: Endpoint, *, openai: bool = False) -> Endpoint:
    """Map gateway errors to their HTTP status; a bug is a 500 with a correlation id, never a crash."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except ClawgateError as exc:
            return error_response(exc, openai=openai)
        except Exception as exc:
            error = internal_error(
                exc, log, "http: internal error", id_in_message=True, path=request.url.path
            )
            return error_response(error, openai=openai)

    return endpoint


def json(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def run_state(rec: RunRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runId": rec.run_id,
        "status": rec.status,
        "sessionKey": rec.session_key,
        "agentId": rec.agent_id,
        "acceptedAt": int(rec.accepted_at * 1000),
    }
    if rec.started_at is not None:
        out["startedAt"] = int(rec.started_at * 1000)
    if rec.ended_at is not None:
        out["endedAt"] = int(rec.ended_at * 1000)
    if rec.error:
        out["error"] = rec.error
    if rec.is_final:
        out["text"] = rec.result_text or ""
    return out


def parse_session_key(raw: str, field: str) -> SessionKey:
    if len(raw) > 256 or not _SESSION_KEY.match(raw):
        raise InvalidRequest(f"invalid session key: {raw[:64]!r}", details={"field": field})
    return SessionKey(raw)


async def wait_final(gw: Gateway, run_id: RunId, rec: RunRecord, timeout_s: float) -> RunRecord | None:
    if rec.is_final:
        return rec
    return await gw.runs.wait(run_id, timeout_s)


def sse(event: str, data: bytes | str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    text = data.decode() if isinstance(data, bytes) else data
    return f"{head}event: {event}\ndata: {text}\n\n".encode()


async def follow(
    gw: Gateway, run_id: RunId, buf: RunBuffer, after: int, timeout_s: float
) -> AsyncIterator[tuple[int, bytes] | RunRecord]:
    """Yield (seq, agent payload) of a followed run after `after`, then its final record."""
    final_task = asyncio.ensure_future(gw.runs.wait(run_id, timeout_s))
    try:
        last = after
        while True:
            for seq, payload in buf.after(last):
                last = seq
                yield seq, payload
            if final_task.done():
                break
            changed = asyncio.ensure_future(buf.changed.wait())
            try:
                await asyncio.wait({changed, final_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
        for seq, payload in buf.after(last):
            yield seq, payload
        final = final_task.result()
        if final is not None:
            yield final
    finally:
        final_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ClawgateError):
            await final_task


class RestApi:
    def __init__(self, gw: Gateway, events: RunEventLog) -> None:
        self.gw = gw
        self.events = events
        self.auth = HttpAuth(gw)
        self.body_limits = BodyLimits.of(gw.settings, gw.clock)

    def routes(self) -> list[BaseRoute]:
        s = self.gw.settings
        routes: list[BaseRoute] = []
        if s.http_rest:
            routes += [
                Route("/v1/runs", guarded(self.create), methods=["POST"]),
                Route("/v1/runs/wait", guarded(self.create_and_wait), methods=["POST"]),
                Route("/v1/runs/{run_id}", guarded(self.get), methods=["GET"]),
                Route("/v1/runs/{run_id}/cancel", guarded(self.cancel), methods=["POST"]),
                Route("/v1/runs/{run_id}/events", guarded(self.run_events), methods=["GET"]),
                Route("/v1/sessions/{key}/history", guarded(self.history), methods=["GET"]),
                Route("/tools/invoke", guarded(self.tools_invoke), methods=["POST"]),
            ]
        if s.http_hooks:
            routes += [
                Route("/hooks/agent", guarded(self.hook_agent), methods=["POST"]),
                Route("/hooks/wake", guarded(self.hook_wake), methods=["POST"]),
            ]
        return routes

    # -- runs -------------------------------------------------------------------------------------
    async def _start(self, request: Request, body: RunBody) -> tuple[RunRecord, RunId]:
        key, agent = session_agent(body.session_key, body.agent_id)
        self.gw.runs.profiles.require(agent, "agentId" if body.agent_id else "sessionKey")
        run_id = new_run_id(request, body.idempotency_key)
        self.events.follow(run_id)  # record from the first event, for /events resume
        _run, rec = await start_run(
            self.gw,
            RunStart(
                message=body.message,
                session_key=key,
                agent_id=agent,
                run_id=run_id,
                model=body.model,
                timeout_s=body.timeout,
                webhook=check_url(body.webhook) if body.webhook is not None else None,
                extra_system_prompt=body.extra_system_prompt,
            ),
        )
        return rec, run_id

    async def create(self, request: Request) -> Response:
        self.auth.check(request, WRITE)
        body = await read_json(request, self.body_limits, RunBody)
        rec, _ = await self._start(request, body)
        return json(accepted_payload(rec), 202)

    async def create_and_wait(self, request: Request) -> Response:
        self.auth.check(request, WRITE)
        body = await read_json(request, self.body_limits, RunWaitBody)
        rec, run_id = await self._start(request, body)
        timeout_s = body.timeout_ms / 1000 if body.timeout_ms is not None else rec.timeout_s + 5
        final = await wait_final(self.gw, run_id, rec, timeout_s)
        if final is None:
            return json({**accepted_payload(rec), "status": "running"}, 202)
        return json(final_payload(final))

    async def _record(self, run_id: RunId) -> RunRecord:
        _run, rec = await self.gw.runs.lookup(run_id)
        if rec is None:
            raise NotFound(f"unknown or expired run {run_id}", details={"runId": run_id})
        return rec

    async def get(self, request: Request) -> Response:
        self.auth.check(request, READ)
        return json(run_state(await self._record(RunId(request.path_params["run_id"]))))

    async def cancel(self, request: Request) -> Response:
        self.auth.check(request, WRITE)
        run_id = RunId(request.path_params["run_id"])
        await self._record(run_id)
        return json({"runId": run_id, "aborted": self.gw.runs.abort(run_id)})

    async def run_events(self, request: Request) -> Response:
        self.auth.check(request, READ)
        run_id = RunId(request.path_params["run_id"])
        rec = await self._record(run_id)
        last_raw = request.headers.get("last-event-id", "0") or "0"
        if not last_raw.isdigit():
            raise InvalidRequest("Last-Event-ID must be a seq number", details={"field": "Last-Event-ID"})
        after = int(last_raw)
        buf = self.events.buffers.get(run_id)
        if buf is None and not rec.is_final:
            buf = self.events.follow(run_id)
        return StreamingResponse(
            self._event_stream(run_id, rec, buf, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _event_stream(
        self, run_id: RunId, rec: RunRecord, buf: RunBuffer | None, after: int
    ) -> AsyncIterator[bytes]:
        if buf is None:  # ended before anyone followed it over HTTP: only its end is known
            yield sse("gap", msgspec.json.encode({"requestedSeq": after + 1, "oldestSeq": None}))
            yield sse("end", msgspec.json.encode(final_payload(rec)))
            return
        oldest = buf.oldest_seq() or buf.first_seq
        if oldest and after + 1 < oldest:
            # The buffer no longer holds (or never held) the asked position: say so, then go on.
            yield sse("gap", msgspec.json.encode({"requestedSeq": after + 1, "oldestSeq": oldest}))
        async for item in follow(self.gw, run_id, buf, after, rec.timeout_s + 5):
            if isinstance(item, RunRecord):
                yield sse("end", msgspec.json.encode(final_payload(item)))
            else:
                yield sse("agent", item[1], item[0])

    async def tools_invoke(self, request: Request) -> Response:
        """`tools.invoke` over HTTP (admin): `{tool, args?, agentId?, sessionKey?}`."""
        grant = self.auth.check(request, ADMIN)
        body = await read_json(request, self.body_limits, ToolsInvokeParams)
        return json(await invoke_tool(self.gw, body, grant.scopes))

    async def history(self, request: Request) -> Response:
        self.auth.check(request, READ)
        key = parse_session_key(request.path_params["key"], "key")
        raw_limit = request.query_params.get("limit", "200")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise InvalidRequest("limit must be 1..1000", details={"field": "limit"})
        messages = await self.gw.sessions.history(key, int(raw_limit))
        return json(
            {
                "sessionKey": key,
                "messages": [
                    {"role": m.role, "content": m.content, "ts": int(m.ts * 1000), "runId": m.run_id}
                    for m in messages
                ],
            }
        )

    # -- hooks ------------------------------------------------------------------------------------
    def _hook_auth(self, request: Request) -> None:
        if "token" in request.query_params:
            raise InvalidRequest(
                "hook tokens are accepted only in the Authorization or x-openclaw-token header",
                details={"field": "token"},
            )
        if self.gw.settings.hooks_token is None:
            raise NotFound("hooks are disabled: set hooks_token to enable /hooks/*")
        self.auth.check(request, WRITE, hooks=True, header_names=("x-openclaw-token",))

    async def hook_agent(self, request: Request) -> Response:
        self._hook_auth(request)
        body = await read_json(request, self.body_limits, HookAgentBody)
        key, agent = session_agent(body.session_key, body.agent_id)
        self.gw.runs.profiles.require(agent, "agentId" if body.agent_id else "sessionKey")
        if body.session_key is None:
            key = SessionKey(f"agent:{agent}:hook:{uuid.uuid4().hex}")
        run_id = new_run_id(request)
        _run, rec = await start_run(
            self.gw,
            RunStart(
                message=body.message,
                session_key=key,
                agent_id=agent,
                run_id=run_id,
                timeout_s=body.timeout_seconds,
                webhook=check_url(body.webhook) if body.webhook is not None else None,
            ),
        )
        if not body.wait_for_completion:
            return json({"ok": True, "runId": rec.run_id}, 202)
        final = await wait_final(self.gw, run_id, rec, rec.timeout_s + 5)
        if final is None:
            return json({"ok": True, "runId": rec.run_id}, 202)
        out: dict[str, Any] = {
            "ok": final.status == "ok",
            "runId": final.run_id,
            "status": final.status,
            "text": final.result_text or "",
        }
        if final.error:
            out["error"] = final.error
        return json(out)

    async def hook_wake(self, request: Request) -> Response:
        self._hook_auth(request)
        body = await read_json(request, self.body_limits, HookWakeBody)
        key = SessionKey(body.session_key or "agent:main:main")
        await self.gw.sessions.touch(key)
        self.gw.sessions.append(key, "system", body.text)
        return json({"ok": True, "sessionKey": key})
