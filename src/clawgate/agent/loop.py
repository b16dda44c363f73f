"""One agent run: call the provider, stream text, execute tool calls, repeat until a final reply.

Pure orchestration over three injected edges: the provider (LLM), the emitter
(events), and the tools. No sockets, no store: the run service owns those.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from clawgate.agent.replycap import ReplyCap
from clawgate.agent.tools import Tool, ToolCallContext
from clawgate.errors import ClawgateError, ProviderError
from clawgate.providers.backoff import backoff_delay
from clawgate.providers.base import (
    ChatMessage,
    Finished,
    Provider,
    ProviderRequest,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    Usage,
)


class Emitter(Protocol):
    def assistant(self, delta: str, text: str) -> None: ...

    def tool(self, phase: str, name: str, call_id: str, payload: dict[str, Any]) -> None: ...

    def retrying(self, error: str) -> None: ...

    def usage(self, usage: Usage) -> None: ...


@dataclass
class AgentInput:
    run_id: str
    session_key: str
    agent_id: str
    message: str
    history: list[ChatMessage] = field(default_factory=list)
    model: str | None = None
    system_prompt: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed turn is retried: at most `max_retries` times, after `backoff_delay` seconds
    slept on `sleep` (the injected clock's, so tests fast-forward it)."""

    max_retries: int
    base_s: float = 0.0
    max_delay_s: float = 0.0
    sleep: Callable[[float], Awaitable[None]] | None = None
    retries: Counter[str] | None = None  # counted by the failure's kind

    async def wait(self, attempt: int, exc: ProviderError) -> None:
        if self.retries is not None:
            self.retries[exc.kind] += 1
        delay = backoff_delay(
            attempt, base_s=self.base_s, max_delay_s=self.max_delay_s, retry_after_s=exc.retry_after_s
        )
        if delay > 0 and self.sleep is not None:
            await self.sleep(delay)


async def run_agent(
    provider: Provider,
    inp: AgentInput,
    emit: Emitter,
    tools: Mapping[str, Tool],
    *,
    max_tool_rounds: int,
    max_retries: int,
    retry: RetryPolicy | None = None,
    max_reply_bytes: int | None = None,
) -> str:
    """Returns the final assistant text. Raises ProviderError when the provider fails for good.

    With `max_reply_bytes`, the text of the whole run (every turn) is cut at that many
    UTF-8 bytes and ends with `replycap.TRUNCATED_MARKER`; the run then ends at once
    (pending tool calls are dropped), successfully, with what it had.
    """
    cap = ReplyCap(max_reply_bytes)
    messages: list[ChatMessage] = []
    if inp.system_prompt:
        messages.append(ChatMessage(role="system", content=inp.system_prompt))
    messages.extend(inp.history)
    messages.append(ChatMessage(role="user", content=inp.message))
    specs = [tool.spec for tool in tools.values()]
    text = ""
    for _round in range(max_tool_rounds + 1):
        request = ProviderRequest(
            messages=messages, model=inp.model, tools=specs, run_id=inp.run_id, session_key=inp.session_key
        )
        calls, turn_text = await _turn_with_retries(
            provider, request, emit, text, retry or RetryPolicy(max_retries), cap
        )
        text += turn_text
        if not calls or cap.truncated:
            return text
        messages.append(ChatMessage(role="assistant", content=turn_text, tool_calls=calls))
        for call in calls:
            result = await _call_tool(tools, call, inp, emit)
            messages.append(
                ChatMessage(role="tool", content=json.dumps(result), tool_call_id=call.id, name=call.name)
            )
    raise ProviderError(f"agent exceeded {max_tool_rounds} tool rounds")


async def _turn_with_retries(
    provider: Provider,
    request: ProviderRequest,
    emit: Emitter,
    text_so_far: str,
    retry: RetryPolicy,
    cap: ReplyCap,
) -> tuple[list[ToolCall], str]:
    attempt = 0
    while True:
        mark = cap.used
        try:
            return await _turn(provider, request, emit, text_so_far, cap)
        except ProviderError as exc:
            if not exc.retryable or attempt >= retry.max_retries:
                raise
            attempt += 1
            cap.rewind(mark)  # the failed attempt's text is not part of the reply
            emit.retrying(exc.message)
            await retry.wait(attempt, exc)


async def _turn(
    provider: Provider, request: ProviderRequest, emit: Emitter, text_so_far: str, cap: ReplyCap
) -> tuple[list[ToolCall], str]:
    calls: list[ToolCall] = []
    turn_text = ""
    # Closed explicitly: leaving on `Finished` (or on an abort) must release the provider's
    # HTTP stream now, not whenever the generator is garbage collected.
    stream = provider.stream(request)
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                delta = cap.take(event.text)
                if delta:
                    turn_text += delta
                    emit.assistant(delta, text_so_far + turn_text)
                if cap.truncated:
                    # Stop reading: the provider's stream is closed below, so a runaway
                    # reply costs no more memory or bandwidth than the cap.
                    break
            elif isinstance(event, ToolCallRequest):
                calls.append(event.call)
            elif isinstance(event, Finished):
                if event.usage is not None:
                    emit.usage(event.usage)
                break
    except ProviderError as exc:
        if turn_text:
            # The deltas are already out, so the turn cannot be retried: the run ends as a cut
            # stream and the caller keeps the partial text.
            raise ProviderError(f"{exc.message} (the stream stopped halfway)", kind="stream_cut") from exc
        raise
    finally:
        aclose = getattr(stream, "aclose", None)  # async generators have it; the protocol does not
        if aclose is not None:
            await aclose()
    return calls, turn_text


async def _call_tool(
    tools: Mapping[str, Tool], call: ToolCall, inp: AgentInput, emit: Emitter
) -> dict[str, Any]:
    emit.tool("start", call.name, call.id, {"args": call.arguments})
    tool = tools.get(call.name)
    if tool is None:
        result: dict[str, Any] = {"status": "error", "error": f"unknown tool {call.name!r}"}
    else:
        try:
            result = await tool.handler(
                ToolCallContext(run_id=inp.run_id, session_key=inp.session_key, agent_id=inp.agent_id),
                call.arguments,
            )
        except ClawgateError as exc:
            # A refused spawn (FORBIDDEN, bad params) is the tool's answer, not a failed run.
            result = {"status": "error", "code": exc.code, "error": exc.message}
    emit.tool("result", call.name, call.id, {"result": result})
    return result
