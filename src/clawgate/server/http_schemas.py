"""Request bodies of the HTTP API (msgspec, validated like the WS params) and response shapes.

The same structs validate requests and generate `/openapi.json`, so the document cannot drift
from what the server accepts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from clawgate.protocol.schemas import (
    AgentIdStr,
    IdemKey,
    Label,
    ModelName,
    Seconds,
    SessionKeyStr,
)

Message = Annotated[str, msgspec.Meta(min_length=1, max_length=400_000)]


class _Body(msgspec.Struct, rename="camel", kw_only=True):
    pass


# -- native REST and hooks (camelCase, as the WS protocol) -------------------------------------
class RunBody(_Body):
    message: Message
    session_key: SessionKeyStr | None = None
    agent_id: AgentIdStr | None = None
    model: ModelName | None = None
    timeout: Seconds | None = None
    idempotency_key: IdemKey | None = None
    extra_system_prompt: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    label: Label | None = None
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # POSTed the final answer


class RunWaitBody(RunBody):
    timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] | None = None


class HookAgentBody(_Body):
    message: Message
    agent_id: AgentIdStr | None = None
    session_key: SessionKeyStr | None = None
    timeout_seconds: Seconds | None = None
    wait_for_completion: bool = False
    name: Label | None = None
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # POSTed the final answer


class HookWakeBody(_Body):
    text: Message
    session_key: SessionKeyStr | None = None
    mode: Literal["now", "next-heartbeat"] = "now"


class Accepted(_Body):
    run_id: str
    session_key: str
    agent_id: str
    status: str
    accepted_at: int


class Payload(_Body):
    text: str
    media_url: str | None = None


class ResultMeta(_Body):
    duration_ms: int
    session_key: str


class RunResult(_Body):
    payloads: list[Payload]
    meta: ResultMeta


class Final(_Body):
    run_id: str
    status: str
    summary: str
    result: RunResult
    error: str | None = None


class RunState(_Body):
    run_id: str
    status: str
    session_key: str
    agent_id: str
    accepted_at: int
    started_at: int | None = None
    ended_at: int | None = None
    error: str | None = None
    text: str | None = None


class Cancelled(_Body):
    run_id: str
    aborted: bool


class HistoryMessage(_Body):
    role: str
    content: str
    ts: int
    run_id: str | None = None


class History(_Body):
    session_key: str
    messages: list[HistoryMessage]


class ToolsInvokeBody(_Body):
    tool: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    agent_id: AgentIdStr | None = None
    session_key: SessionKeyStr | None = None


class ToolsInvokeResult(_Body):
    ok: bool
    tool: str
    result: Any
    truncated: bool


class HookAccepted(_Body):
    ok: bool
    run_id: str


class HookResult(_Body):
    ok: bool
    run_id: str
    status: str
    text: str
    error: str | None = None


class WakeResult(_Body):
    ok: bool
    session_key: str


class ErrorShape(_Body):
    code: str
    message: str
    details: dict[str, Any] | None = None
    retryable: bool | None = None
    retry_after_ms: int | None = None


class ErrorBody(_Body):
    ok: bool
    error: ErrorShape


# -- OpenAI-compatible (snake_case, as OpenAI) -------------------------------------------------
class ContentPart(msgspec.Struct, kw_only=True):
    type: Annotated[str, msgspec.Meta(max_length=64)]
    text: Annotated[str, msgspec.Meta(max_length=400_000)] | None = None


Content = Annotated[str, msgspec.Meta(max_length=400_000)] | list[ContentPart] | None


class ChatMessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionBody(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1, max_length=1000)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class ResponseInputItem(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant"] = "user"
    content: Content = None
    type: Annotated[str, msgspec.Meta(max_length=64)] = "message"


class ResponsesBody(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    input: (
        Annotated[str, msgspec.Meta(max_length=400_000)]
        | Annotated[list[ResponseInputItem], msgspec.Meta(min_length=1, max_length=1000)]
    )
    instructions: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    stream: bool = False
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class OpenAIModel(msgspec.Struct, kw_only=True):
    id: str
    object: str
    created: int
    owned_by: str


class OpenAIModelList(msgspec.Struct, kw_only=True):
    object: str
    data: list[OpenAIModel]


class OpenAIMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str


class OpenAIChoice(msgspec.Struct, kw_only=True):
    index: int
    message: OpenAIMessage
    finish_reason: str


class OpenAIUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: OpenAIUsage


class OutputText(msgspec.Struct, kw_only=True):
    type: str
    text: str
    annotations: list[Any]


class OutputMessage(msgspec.Struct, kw_only=True):
    type: str
    id: str
    status: str
    role: str
    content: list[OutputText]


class ResponsesUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: str
    created_at: int
    status: str
    model: str
    output: list[OutputMessage]
    usage: ResponsesUsage
    error: dict[str, Any] | None = None


class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class OpenAIError(msgspec.Struct, kw_only=True):
    error: OpenAIErrorDetail


def text_of(content: Content) -> str:
    """The text of an OpenAI message content (a string, or text parts joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content if part.text)
