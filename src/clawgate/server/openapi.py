"""`/openapi.json`, generated from the msgspec structs that validate the HTTP API's requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from clawgate import __version__
from clawgate.server import http_schemas as s
from clawgate.settings import Settings


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    group: str  # settings flag that turns it on
    body: type[Any] | None = None
    responses: dict[int, type[Any] | str] = field(default_factory=dict)
    params: tuple[tuple[str, str], ...] = ()  # (name, in)
    security: str = "bearer"
    stream: bool = False  # a 200 may be text/event-stream


# One server-sent event (OpenAPI 3.2 `itemSchema`): `data` is a JSON text (or `[DONE]`).
SSE_EVENT = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}

_ERR = s.ErrorBody
_OAI_ERR = s.OpenAIError
_RUN_ID = (("run_id", "path"),)

OPS = [
    Op(
        "post",
        "/v1/runs",
        "Start a run",
        "http_rest",
        s.RunBody,
        {202: s.Accepted, 400: _ERR, 401: _ERR, 503: _ERR},
    ),
    Op(
        "post",
        "/v1/runs/wait",
        "Start a run and wait for its end",
        "http_rest",
        s.RunWaitBody,
        {200: s.Final, 202: s.Accepted, 400: _ERR, 401: _ERR, 503: _ERR},
    ),
    Op("get", "/v1/runs/{run_id}", "A run's state", "http_rest", None, {200: s.RunState, 404: _ERR}, _RUN_ID),
    Op(
        "post",
        "/v1/runs/{run_id}/cancel",
        "Abort a run",
        "http_rest",
        None,
        {200: s.Cancelled, 404: _ERR},
        _RUN_ID,
    ),
    Op(
        "get",
        "/v1/runs/{run_id}/events",
        "A run's events as server-sent events (id = seq; resume with Last-Event-ID)",
        "http_rest",
        None,
        {200: "text/event-stream", 400: _ERR, 404: _ERR},
        (*_RUN_ID, ("Last-Event-ID", "header")),
        stream=True,
    ),
    Op(
        "get",
        "/v1/sessions/{key}/history",
        "A session's transcript",
        "http_rest",
        None,
        {200: s.History, 400: _ERR},
        (("key", "path"), ("limit", "query")),
    ),
    Op(
        "post",
        "/tools/invoke",
        "Call one tool of an agent directly (admin scope)",
        "http_rest",
        s.ToolsInvokeBody,
        {200: s.ToolsInvokeResult, 400: _ERR, 401: _ERR, 403: _ERR},
    ),
    Op(
        "post",
        "/hooks/agent",
        "Start a run from a webhook",
        "http_hooks",
        s.HookAgentBody,
        {200: s.HookResult, 202: s.HookAccepted, 400: _ERR, 401: _ERR, 404: _ERR, 503: _ERR},
        security="hooks",
    ),
    Op(
        "post",
        "/hooks/wake",
        "Append a system message to a session",
        "http_hooks",
        s.HookWakeBody,
        {200: s.WakeResult, 400: _ERR, 401: _ERR, 404: _ERR},
        security="hooks",
    ),
    Op(
        "post",
        "/v1/chat/completions",
        "OpenAI chat completions (stream: SSE chunks)",
        "http_openai",
        s.ChatCompletionBody,
        {200: s.ChatCompletion, 400: _OAI_ERR, 401: _OAI_ERR, 502: _OAI_ERR, 503: _OAI_ERR, 504: _OAI_ERR},
        stream=True,
    ),
    Op(
        "post",
        "/v1/responses",
        "OpenResponses (stream: SSE events)",
        "http_openai",
        s.ResponsesBody,
        {200: s.ResponseObject, 400: _OAI_ERR, 401: _OAI_ERR, 502: _OAI_ERR, 503: _OAI_ERR, 504: _OAI_ERR},
        stream=True,
    ),
    Op(
        "get",
        "/v1/models",
        "The agents, as models",
        "http_openai",
        None,
        {200: s.OpenAIModelList, 401: _OAI_ERR},
    ),
    Op(
        "get",
        "/v1/models/{model_id}",
        "One agent, as a model",
        "http_openai",
        None,
        {200: s.OpenAIModel, 404: _OAI_ERR},
        (("model_id", "path"),),
    ),
]


def build_openapi(settings: Settings) -> dict[str, Any]:
    ops = [op for op in OPS if getattr(settings, op.group)]
    types: list[Any] = []
    for op in ops:
        if op.body is not None:
            types.append(op.body)
        types.extend(t for t in op.responses.values() if not isinstance(t, str))
    types += [_ERR, _OAI_ERR]
    unique = list(dict.fromkeys(types))
    refs, components = msgspec.json.schema_components(unique, ref_template="#/components/schemas/{name}")
    ref_of = dict(zip(unique, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {},
            "security": [{op.security: []}],
        }
        if op.params:
            entry["parameters"] = [
                {"name": name, "in": where, "required": where == "path", "schema": {"type": "string"}}
                for name, where in op.params
            ]
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[op.body]}},
            }
        err = _OAI_ERR if op.group == "http_openai" else _ERR
        common: dict[int, type[Any] | str] = {400: err, 401: err, 403: err, 429: err, 500: err}
        for code, typ in {**common, **op.responses}.items():
            if isinstance(typ, str):
                entry["responses"][str(code)] = {
                    "description": typ,
                    "content": {typ: {"itemSchema": SSE_EVENT}},
                }
            else:
                content: dict[str, Any] = {"application/json": {"schema": ref_of[typ]}}
                if op.stream and code == 200:  # `stream: true` answers server-sent events instead
                    content["text/event-stream"] = {"itemSchema": SSE_EVENT}
                entry["responses"][str(code)] = {"description": typ.__name__, "content": content}
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "clawgate HTTP API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "hooks": {"type": "http", "scheme": "bearer", "description": "the hooks_token"},
            },
        },
    }
