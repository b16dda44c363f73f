"""One agent run: call the provider, stream text, execute tool calls, repeat until a final reply.

Pure orchestration over three injected edges: the provider (LLM), the emitter
(events), and the tools. No sockets, no store: the run service owns those.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from clawgate.agent.replycap import ReplyCap
from clawgate.agent.tools import DEFAULT_RUN_SCOPES, Tool, ToolCallContext, scopes_allow
from clawgate.errors import ClawgateError, ProviderError
from clawgate.protocol.constants import FORBIDDEN
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
from clawgate.tools.redact import redact

log = structlog.get_logger("clawgate.tools")


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
    fallback_models: list[str] | None = None
    scopes: frozenset[str] = DEFAULT_RUN_SCOPES


@dataclass(frozen=True)
class ToolPolicy:
    """The agent profile's limits on one run's turns and tool calls."""

    max_turns: int
    max_tool_calls: int = 32
    timeout_s: float = 60.0
    result_max_bytes: int = 65536
    # The injected clock's sleep: a tool's timeout is a clock timer like every other deadline.
    sleep: Callable[[float], Awaitable[None]] | None = None


TRUNCATED_MARK = "\n[truncated: {shown} of {total} bytes shown]"


def cap_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """`text` cut to at most `max_bytes` UTF-8 bytes plus a visible marker, and whether it was cut."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text, False
    shown = data[:max_bytes].decode(errors="ignore")
    return shown + TRUNCATED_MARK.format(shown=len(shown.encode()), total=len(data)), True


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
    max_retries: int,
    max_tool_rounds: int | None = None,
    retry: RetryPolicy | None = None,
    max_reply_bytes: int | None = None,
    policy: ToolPolicy | None = None,
) -> str:
    """Returns the final assistant text. Raises ProviderError when the provider fails for good,
    or when the run needs more than `policy.max_turns` provider turns.

    With `max_reply_bytes`, the text of the whole run (every turn) is cut at that many
    UTF-8 bytes and ends with `replycap.TRUNCATED_MARKER`; the run then ends at once
    (pending tool calls are dropped), successfully, with what it had.
    """
    cap = ReplyCap(max_reply_bytes)
    if policy is None:
        policy = ToolPolicy(max_turns=(max_tool_rounds if max_tool_rounds is not None else 8) + 1)
    messages: list[ChatMessage] = []
    if inp.system_prompt:
        messages.append(ChatMessage(role="system", content=inp.system_prompt))
    messages.extend(inp.history)
    messages.append(ChatMessage(role="user", content=inp.message))
    specs = [tool.spec for tool in tools.values()]
    text = ""
    calls_made = 0
    for _turn_no in range(policy.max_turns):
        request = ProviderRequest(
            messages=messages,
            model=inp.model,
            tools=specs,
            run_id=inp.run_id,
            session_key=inp.session_key,
            fallback_models=inp.fallback_models,
        )
        calls, turn_text = await _turn_with_retries(
            provider, request, emit, text, retry or RetryPolicy(max_retries), cap
        )
        text += turn_text
        if not calls or cap.truncated:
            return text
        messages.append(ChatMessage(role="assistant", content=turn_text, tool_calls=calls))
        # The calls of one turn run concurrently; their results go back in the model's order.
        budget = max(0, policy.max_tool_calls - calls_made)
        calls_made += len(calls)
        contents = await asyncio.gather(
            *(
                _call_tool(tools, call, inp, emit, policy, over_budget=n >= budget)
                for n, call in enumerate(calls)
            )
        )
        for call, content in zip(calls, contents, strict=True):
            messages.append(ChatMessage(role="tool", content=content, tool_call_id=call.id, name=call.name))
    raise ProviderError(
        f"agent {inp.agent_id!r} reached its turn limit (max_turns {policy.max_turns}) without a final reply",
        kind="turn_limit",
    )


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
    tools: Mapping[str, Tool],
    call: ToolCall,
    inp: AgentInput,
    emit: Emitter,
    policy: ToolPolicy,
    *,
    over_budget: bool,
) -> str:
    """Run one tool call; always returns the text for the model (an error is a result too)."""
    emit.tool("start", call.name, call.id, {"args": call.arguments})
    started = time.perf_counter()
    log.debug("tool call", run_id=inp.run_id, tool=call.name, args=redact(call.arguments))
    tool = tools.get(call.name)
    result: dict[str, Any]
    if tool is None:
        result = {"status": "error", "error": f"tool {call.name!r} is not allowed for agent {inp.agent_id!r}"}
    elif over_budget:
        result = {
            "status": "error",
            "error": f"tool call limit reached (max_tool_calls {policy.max_tool_calls})",
        }
    elif not scopes_allow(inp.scopes, tool.scope):
        result = {
            "status": "error",
            "code": FORBIDDEN,
            "error": f"tool {call.name!r} needs scope {tool.scope}, which the run's starter does not hold",
        }
    else:
        ctx = ToolCallContext(
            run_id=inp.run_id, session_key=inp.session_key, agent_id=inp.agent_id, scopes=inp.scopes
        )
        result = await invoke_tool(tool, ctx, call, policy)
    content, truncated = cap_text(json.dumps(result, default=str), policy.result_max_bytes)
    payload: dict[str, Any] = {"result": content if truncated else result}
    if truncated:
        payload["truncated"] = True
    payload["durationMs"] = int((time.perf_counter() - started) * 1000)
    payload["isError"] = result.get("status") == "error"
    log.debug("tool result", run_id=inp.run_id, tool=call.name, result=redact(result))
    emit.tool("result", call.name, call.id, payload)
    return content


async def invoke_tool(tool: Tool, ctx: ToolCallContext, call: ToolCall, policy: ToolPolicy) -> dict[str, Any]:
    """The handler under the profile's timeout; failures become error results, not a failed run."""
    task = asyncio.ensure_future(tool.handler(ctx, call.arguments))
    timer = asyncio.ensure_future(_sleep(policy))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not task.done():
            task.cancel()
            # Wait for the cancellation to land, so nothing of the call outlives the run.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return {"status": "error", "error": f"tool {call.name!r} timed out after {policy.timeout_s:g} s"}
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, ClawgateError):
        # A refused spawn (FORBIDDEN, bad params) is the tool's answer, not a failed run.
        return {"status": "error", "code": exc.code, "error": exc.message}
    log.warning("tool failed", tool=call.name, error=repr(exc)[:200])
    return {"status": "error", "error": f"tool {call.name!r} failed: {type(exc).__name__}: {exc}"[:2000]}


async def _sleep(policy: ToolPolicy) -> None:
    if policy.sleep is not None:
        await policy.sleep(policy.timeout_s)
    else:
        await asyncio.sleep(policy.timeout_s)
