"""The provider interface: a streaming chat call that yields text deltas and tool calls.

A provider never blocks the loop and never swallows a failure: it raises
`ProviderError` (retryable or not), which ends the run as `error` with the message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(slots=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


@dataclass(slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True)
class ProviderRequest:
    messages: list[ChatMessage]
    model: str | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    run_id: str = ""
    session_key: str = ""
    # The agent profile's fallback models; None means the provider's configured ones.
    fallback_models: list[str] | None = None


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ToolCallRequest:
    call: ToolCall


@dataclass(slots=True)
class Usage:
    """Tokens one provider call consumed, as the provider reported them."""

    input: int = 0
    output: int = 0


@dataclass(slots=True)
class Finished:
    reason: str = "stop"
    usage: Usage | None = None


ProviderEvent = TextDelta | ToolCallRequest | Finished


class Provider(Protocol):
    name: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        """Yield deltas and tool calls of one assistant turn; raise ProviderError on failure."""
        ...

    async def aclose(self) -> None: ...
