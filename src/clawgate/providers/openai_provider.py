"""The `openai` provider: any OpenAI-compatible chat completions endpoint, streamed.

Text deltas are forwarded as they arrive; tool calls arrive as fragments keyed
by `index` (id and name usually in the first one, the arguments string spread
over several) and are assembled, parsed as JSON and yielded once the stream
ends. Every failure leaves as a `ProviderError`: connection problems, timeouts,
429 and 5xx are retryable; other HTTP statuses and malformed output are not.
The SDK's own retries are disabled (`max_retries=0`): the agent loop decides.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import openai
from openai.types.chat import (
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from clawgate.errors import ProviderError
from clawgate.providers.base import (
    ChatMessage,
    Finished,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    ToolSpec,
    Usage,
)


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


# Tool calls buffered in one turn (each index is a new partial call): a bound, far above real use.
MAX_TOOL_CALLS_PER_TURN = 64


def to_openai_message(message: ChatMessage) -> ChatCompletionMessageParam:
    """Convert one ChatMessage to the chat completions wire format."""
    role = message.role
    if role == "system":
        return {"role": "system", "content": message.content}
    if role == "user":
        if message.name:
            return {"role": "user", "content": message.content, "name": message.name}
        return {"role": "user", "content": message.content}
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant"}
        if message.tool_calls:
            out["content"] = message.content or None
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": wire_name(call.name), "arguments": json.dumps(call.arguments)},
                }
                for call in message.tool_calls
            ]
        else:
            out["content"] = message.content
        return cast(ChatCompletionMessageParam, out)
    if role == "tool":
        if not message.tool_call_id:
            raise ProviderError("tool message without tool_call_id")
        return {"role": "tool", "content": message.content, "tool_call_id": message.tool_call_id}
    raise ProviderError(f"unsupported message role {role!r}")


def wire_name(name: str) -> str:
    """OpenAI function names allow no dots: an MCP tool `server.tool` goes out as `server__tool`."""
    return name.replace(".", "__")


def to_openai_tool(spec: ToolSpec) -> ChatCompletionToolParam:
    return {
        "type": "function",
        "function": {
            "name": wire_name(spec.name),
            "description": spec.description,
            "parameters": spec.parameters,
        },
    }


def _map_error(exc: Exception) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError("provider timed out", retryable=True, kind="timeout")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(f"provider connection failed: {exc}", retryable=True, kind="connection")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"provider returned {status}: {exc.message}"
        if status == 429:
            return ProviderError(message, retryable=True, kind="rate_limit", retry_after_s=_retry_after(exc))
        if status in (503, 529):
            return ProviderError(message, retryable=True, kind="overloaded", retry_after_s=_retry_after(exc))
        if status >= 500:
            return ProviderError(message, retryable=True, kind="server", retry_after_s=_retry_after(exc))
        return ProviderError(message, kind="bad_request")
    # A stream that breaks mid-way (a closed connection, a malformed chunk).
    return ProviderError(f"provider stream failed: {type(exc).__name__}: {exc}", kind="stream_cut")


def _retry_after(exc: openai.APIStatusError) -> float | None:
    """The Retry-After header in seconds (an HTTP date is not used by LLM APIs; ignored)."""
    raw = exc.response.headers.get("retry-after")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 86400 else None


def _assemble(partials: dict[int, _PartialCall]) -> list[ToolCall]:
    calls: list[ToolCall] = []
    for index in sorted(partials):
        part = partials[index]
        if not part.name:
            raise ProviderError(f"provider sent tool call #{index} without a name")
        raw = "".join(part.arguments).strip()
        try:
            arguments = json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            raise ProviderError(f"provider sent invalid JSON arguments for {part.name}: {exc.msg}") from None
        if not isinstance(arguments, dict):
            raise ProviderError(f"provider sent non-object arguments for {part.name}")
        calls.append(ToolCall(id=part.id or f"call_{index}", name=part.name, arguments=arguments))
    return calls


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        timeout_s: float = 120,
        max_output_bytes: int | None = None,
    ) -> None:
        self.model = model
        # Text is cut by the agent loop; tool-call arguments are buffered here until the turn
        # ends, so they get the same bound (and so does the number of calls in one turn).
        self.max_output_bytes = max_output_bytes
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        messages = [to_openai_message(m) for m in request.messages]
        tools = [to_openai_tool(t) for t in request.tools]
        partials: dict[int, _PartialCall] = {}
        finish_reason: str | None = None
        usage: Usage | None = None
        buffered = 0
        try:
            stream = await self._client.chat.completions.create(
                model=request.model or self.model,
                messages=messages,
                tools=tools if tools else openai.omit,
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    if not chunk.choices:
                        continue  # the trailing usage chunk
                    choice = chunk.choices[0]
                    delta = choice.delta
                    if delta.content:
                        yield TextDelta(delta.content)
                    for frag in delta.tool_calls or ():
                        if frag.index not in partials and len(partials) >= MAX_TOOL_CALLS_PER_TURN:
                            raise ProviderError(
                                f"provider sent more than {MAX_TOOL_CALLS_PER_TURN} tool calls in one turn"
                            )
                        part = partials.setdefault(frag.index, _PartialCall())
                        if frag.id:
                            part.id = frag.id
                        if frag.function is not None:
                            if frag.function.name and not part.name:
                                part.name = frag.function.name
                            if frag.function.arguments:
                                buffered += len(frag.function.arguments.encode("utf-8", "surrogatepass"))
                                if self.max_output_bytes is not None and buffered > self.max_output_bytes:
                                    raise ProviderError(
                                        "provider tool-call arguments exceed maxReplyBytes "
                                        f"({self.max_output_bytes} bytes)"
                                    )
                                part.arguments.append(frag.function.arguments)
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        except Exception as exc:  # CancelledError / GeneratorExit are BaseException and pass through
            raise _map_error(exc) from exc

        # Back to the names the agent loop knows (only names this request offered are mapped).
        names = {wire_name(t.name): t.name for t in request.tools}
        for call in _assemble(partials):
            call.name = names.get(call.name, call.name)
            yield ToolCallRequest(call)
        yield Finished(finish_reason or ("tool_calls" if partials else "stop"), usage)

    async def aclose(self) -> None:
        await self._client.close()
