"""OpenAI-compatible routes, following OpenClaw's choices.

    POST /v1/chat/completions   streaming (SSE chunks, then `data: [DONE]`) or not
    POST /v1/responses          the minimal OpenResponses shape, streaming or not
    GET  /v1/models, /v1/models/{id}

Agent: `model` "openclaw:<agentId>", "agent:<agentId>" or "clawgate:<agentId>", or the
`x-openclaw-agent-id` header; any other model name means the `main` agent (the gateway's
provider settings decide the LLM). Session: the `x-openclaw-session-key` header; without it, a
stable key derived from the OpenAI `user` field, else a new session per request. The run's
message is the last user message; system and developer messages become its extra system
prompt; earlier turns come from the session's own transcript, not from the request. The answer
is the run's final text: tool calls made inside the run (a subagent spawn) are not exposed.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from clawgate.errors import AgentTimeout, InvalidRequest, NotFound, RunFailed
from clawgate.ids import RunId, SessionKey
from clawgate.protocol.constants import READ, WRITE
from clawgate.server.gateway import Gateway
from clawgate.server.http_api import follow, guarded, json, parse_session_key, wait_final
from clawgate.server.http_common import BodyLimits, HttpAuth, RunStart, new_run_id, read_json, start_run
from clawgate.server.http_events import RunEventLog, decode_payload
from clawgate.server.http_schemas import ChatCompletionBody, Content, ResponsesBody, text_of
from clawgate.store.records import RunRecord

AGENT_PREFIXES = ("openclaw:", "agent:", "clawgate:")
ABORT_HEADER = "x-clawgate-abort-on-disconnect"


def usage_of(rec: RunRecord) -> tuple[int, int]:
    """(prompt, completion) tokens as the provider reported them for the run."""
    usage = rec.usage or {}
    return usage.get("input", 0), usage.get("output", 0)


class OpenAIApi:
    def __init__(self, gw: Gateway, events: RunEventLog) -> None:
        self.gw = gw
        self.events = events
        self.auth = HttpAuth(gw)
        self.body_limits = BodyLimits.of(gw.settings, gw.clock)

    def routes(self) -> list[BaseRoute]:
        if not self.gw.settings.http_openai:
            return []
        return [
            Route("/v1/chat/completions", guarded(self.chat_completions, openai=True), methods=["POST"]),
            Route("/v1/responses", guarded(self.responses, openai=True), methods=["POST"]),
            Route("/v1/models", guarded(self.models, openai=True), methods=["GET"]),
            Route("/v1/models/{model_id:path}", guarded(self.model, openai=True), methods=["GET"]),
        ]

    # -- models -----------------------------------------------------------------------------------
    def _model_ids(self) -> list[str]:
        return [
            f"{prefix}{agent}"
            for agent in self.gw.runs.profiles.ids()
            for prefix in ("openclaw:", "clawgate:")
        ]

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "clawgate"}

    async def models(self, request: Request) -> Response:
        self.auth.check(request, READ)
        return json({"object": "list", "data": [self._model(m) for m in self._model_ids()]})

    async def model(self, request: Request) -> Response:
        self.auth.check(request, READ)
        model_id = request.path_params["model_id"]
        if model_id not in self._model_ids():
            raise NotFound(f"unknown model {model_id[:64]!r}", details={"field": "model"})
        return json(self._model(model_id))

    # -- shared -----------------------------------------------------------------------------------
    def _agent(self, request: Request, model: str) -> str:
        header = request.headers.get("x-openclaw-agent-id")
        if header:
            return header
        for prefix in AGENT_PREFIXES:
            if model.startswith(prefix) and len(model) > len(prefix):
                return model[len(prefix) :]
        return "main"

    def _session(self, request: Request, agent: str, user: str | None) -> SessionKey:
        header = request.headers.get("x-openclaw-session-key")
        if header:
            return parse_session_key(header, "x-openclaw-session-key")
        if user:
            digest = hashlib.sha256(user.encode()).hexdigest()[:24]
            return SessionKey(f"agent:{agent}:openai-user:{digest}")
        return SessionKey(f"agent:{agent}:openai:{uuid.uuid4().hex}")

    async def _start(
        self, request: Request, model: str, user: str | None, message: str, system: str | None
    ) -> tuple[RunRecord, RunId]:
        if not message:
            raise InvalidRequest("no user message to run", details={"field": "messages"})
        agent = self._agent(request, model)
        if not agent.replace("-", "").replace("_", "").isalnum() or len(agent) > 64:
            raise InvalidRequest(f"invalid agent id {agent[:64]!r}", details={"field": "model"})
        self.gw.runs.profiles.require(agent, "model")
        run_id = new_run_id(request)
        self.events.follow(run_id)
        _run, rec = await start_run(
            self.gw,
            RunStart(
                message=message,
                session_key=self._session(request, agent, user),
                agent_id=agent,
                run_id=run_id,
                extra_system_prompt=system,
            ),
        )
        return rec, run_id

    async def _final(self, run_id: RunId, rec: RunRecord) -> RunRecord:
        final = await wait_final(self.gw, run_id, rec, rec.timeout_s + 5)
        if final is None:
            raise AgentTimeout(f"run {run_id} did not finish in time")
        if final.status != "ok":
            # A failed run is an upstream failure for an OpenAI client: 502 with the reason.
            raise RunFailed(
                f"run {final.run_id} ended {final.status}: {final.error or final.status}",
                details={"runId": final.run_id, "status": final.status},
            )
        return final

    def _stream(
        self, request: Request, run_id: RunId, rec: RunRecord, frames: AsyncIterator[bytes]
    ) -> StreamingResponse:
        abort = request.headers.get(ABORT_HEADER, "") in ("1", "true", "yes")
        gw = self.gw

        async def body() -> AsyncIterator[bytes]:
            done = False
            try:
                async for frame in frames:
                    yield frame
                done = True
            finally:
                if not done and abort:
                    gw.runs.abort(run_id)

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _deltas(self, run_id: RunId, rec: RunRecord) -> AsyncIterator[str | RunRecord]:
        buf = self.events.follow(run_id)
        async for item in follow(self.gw, run_id, buf, 0, rec.timeout_s + 5):
            if isinstance(item, RunRecord):
                yield item
                continue
            payload = decode_payload(item[1])
            if payload.get("stream") == "assistant":
                delta = payload.get("data", {}).get("delta")
                if delta:
                    yield str(delta)

    # -- chat completions -------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        self.auth.check(request, WRITE)
        body = await read_json(request, self.body_limits, ChatCompletionBody)
        users = [m for m in body.messages if m.role == "user"]
        system = _system_text([m.content for m in body.messages if m.role in ("system", "developer")])
        message = text_of(users[-1].content) if users else ""
        rec, run_id = await self._start(request, body.model, body.user, message, system)
        completion_id = f"chatcmpl-{run_id}"
        created = int(time.time())
        if not body.stream:
            final = await self._final(run_id, rec)
            prompt, completion = usage_of(final)
            return json(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": final.result_text or ""},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                }
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            obj = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + msgspec.json.encode(obj) + b"\n\n"

        async def frames() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            final: RunRecord | None = None
            async for item in self._deltas(run_id, rec):
                if isinstance(item, RunRecord):
                    final = item
                else:
                    yield chunk({"content": item})
            if final is not None and final.status != "ok":
                err = {
                    "message": final.error or final.status,
                    "type": "api_error",
                    "code": f"run_{final.status}",
                }
                yield b"data: " + msgspec.json.encode({"error": err}) + b"\n\n"
            else:
                yield chunk({}, "stop")
                if include_usage and final is not None:
                    prompt, completion = usage_of(final)
                    usage = {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    }
                    obj = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": usage,
                    }
                    yield b"data: " + msgspec.json.encode(obj) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return self._stream(request, run_id, rec, frames())

    # -- responses --------------------------------------------------------------------------------
    async def responses(self, request: Request) -> Response:
        self.auth.check(request, WRITE)
        body = await read_json(request, self.body_limits, ResponsesBody)
        if isinstance(body.input, str):
            message, system_parts = body.input, []
        else:
            users = [i for i in body.input if i.role == "user"]
            message = text_of(users[-1].content) if users else ""
            system_parts = [i.content for i in body.input if i.role in ("system", "developer")]
        system = _system_text([body.instructions, *system_parts])
        rec, run_id = await self._start(request, body.model, body.user, message, system)
        response_id = f"resp_{run_id}"
        created = int(time.time())

        def response_obj(status: str, text: str, final: RunRecord | None) -> dict[str, Any]:
            prompt, completion = usage_of(final) if final is not None else (0, 0)
            obj: dict[str, Any] = {
                "id": response_id,
                "object": "response",
                "created_at": created,
                "status": status,
                "model": body.model,
                "output": [],
                "usage": {
                    "input_tokens": prompt,
                    "output_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
            if status != "in_progress":
                obj["output"] = [_output_message(response_id, text)]
            if final is not None and final.status != "ok":
                obj["error"] = {"code": f"run_{final.status}", "message": final.error or final.status}
            return obj

        if not body.stream:
            final = await self._final(run_id, rec)
            return json(response_obj("completed", final.result_text or "", final))

        def event(kind: str, **fields: Any) -> bytes:
            return (
                f"event: {kind}\n".encode()
                + b"data: "
                + msgspec.json.encode({"type": kind, **fields})
                + b"\n\n"
            )

        async def frames() -> AsyncIterator[bytes]:
            seq = 0
            yield event(
                "response.created", sequence_number=seq, response=response_obj("in_progress", "", None)
            )
            item_id = f"msg_{run_id}"
            text = ""
            final: RunRecord | None = None
            async for item in self._deltas(run_id, rec):
                if isinstance(item, RunRecord):
                    final = item
                    continue
                seq += 1
                text += item
                yield event(
                    "response.output_text.delta",
                    sequence_number=seq,
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    delta=item,
                )
            text = final.result_text or text if final is not None else text
            seq += 1
            yield event(
                "response.output_text.done",
                sequence_number=seq,
                item_id=item_id,
                output_index=0,
                content_index=0,
                text=text,
            )
            seq += 1
            ok = final is not None and final.status == "ok"
            yield event(
                "response.completed" if ok else "response.failed",
                sequence_number=seq,
                response=response_obj("completed" if ok else "failed", text, final),
            )

        return self._stream(request, run_id, rec, frames())


def _system_text(parts: list[Content | None]) -> str | None:
    texts = [text_of(p) for p in parts if p]
    joined = "\n\n".join(t for t in texts if t)
    return joined or None


def _output_message(response_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{response_id[5:]}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
