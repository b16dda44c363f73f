"""Providers: directive parsing, the scripted provider (fake clock) and the OpenAI provider (local stub)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

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
from clawgate.providers.factory import make_provider
from clawgate.providers.openai_provider import OpenAIProvider
from clawgate.providers.scripted import (
    MAX_TRACKED_ATTEMPTS,
    ScriptedProvider,
    parse_directives,
    sized_text,
    split_chunks,
)
from clawgate.settings import parse_settings
from clawgate.state.clock import FakeClock
from openai_stub import StubBehaviour, run_stub

# --------------------------------------------------------------------------- helpers


def user(text: str, run_id: str = "run-1") -> ProviderRequest:
    return ProviderRequest(messages=[ChatMessage("user", text)], run_id=run_id)


async def collect(stream: AsyncIterator[ProviderEvent]) -> list[ProviderEvent]:
    return [event async for event in stream]


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# --------------------------------------------------------------------------- parse_directives


def test_parse_no_directives() -> None:
    script = parse_directives("  hello world  ")
    assert script.text == "hello world"
    assert script.reply is None and script.tools == [] and not script.stall


def test_parse_all_directives() -> None:
    script = parse_directives(
        "go [[reply:Hi there]][[chunks:3]] [[delay:0.5]][[stall]][[error:boom]]"
        "[[error-once:flaky]][[size:42]] end"
    )
    assert script.reply == "Hi there"
    assert script.chunks == 3
    assert script.delay_s == 0.5
    assert script.stall
    assert script.error == "boom"
    assert script.error_once == "flaky"
    assert script.size == 42
    assert script.text == "go end"


def test_parse_tools_with_json_containing_brackets() -> None:
    script = parse_directives(
        'a [[tool:sessions_spawn {"task":"child work","mode":"session"}]] b '
        '[[tool:other {"xs": [[1, 2]], "s": "]]"}]] [[tool:bare]]'
    )
    assert script.tools == [
        ("sessions_spawn", {"task": "child work", "mode": "session"}),
        ("other", {"xs": [[1, 2]], "s": "]]"}),
        ("bare", {}),
    ]
    assert script.text == "a b"


def test_parse_unknown_and_unclosed_are_text() -> None:
    script = parse_directives("[[nope]] [[reply:x [[ ]]")
    assert script.reply == "x [[ "
    assert script.text == "[[nope]]"
    assert parse_directives("[[reply:unclosed").text == "[[reply:unclosed"


@pytest.mark.parametrize(
    "bad",
    ["[[chunks:0]]", "[[chunks:x]]", "[[delay:-1]]", "[[delay:nan]]", "[[size:-3]]", "[[reply]]",
     "[[tool:x {bad json}]]", "[[tool:x [1]]]", "[[tool: {}]]"],
)  # fmt: skip
def test_parse_malformed_raises(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_directives(bad)


def test_split_chunks_and_sized_text() -> None:
    assert split_chunks("abcdefg", 3) == ["abc", "de", "fg"]
    assert split_chunks("ab", 5) == ["a", "b"]
    assert split_chunks("", 3) == []
    assert len(sized_text(1000).encode()) == 1000
    assert sized_text(50) == sized_text(50)


# --------------------------------------------------------------------------- ScriptedProvider


async def test_scripted_default_echo() -> None:
    provider = ScriptedProvider(FakeClock())
    events = await collect(provider.stream(user("hello [[chunks:1]] there" + "x" * 300)))
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"
    reply = text_of(events)
    assert reply.startswith("ok: hello there")
    assert len(reply) == len("ok: ") + 200


async def test_scripted_reply_in_chunks() -> None:
    provider = ScriptedProvider(FakeClock(), chunks=2)
    events = await collect(provider.stream(user("[[reply:abcdefghij]]")))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["abcde", "fghij"]
    events = await collect(provider.stream(user("[[reply:abcdefghij]][[chunks:5]]")))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["ab", "cd", "ef", "gh", "ij"]
    assert events[-1] == Finished(usage=Usage(input=9, output=3))  # 1 + 33 // 4 prompt tokens; 10 chars out


async def test_scripted_size() -> None:
    provider = ScriptedProvider(FakeClock())
    events = await collect(provider.stream(user("[[size:4096]][[chunks:4]]")))
    assert len(text_of(events).encode()) == 4096
    assert sum(isinstance(e, TextDelta) for e in events) == 4


async def test_scripted_uses_last_user_message() -> None:
    provider = ScriptedProvider(FakeClock())
    request = ProviderRequest(
        messages=[
            ChatMessage("system", "[[error:system]]"),
            ChatMessage("user", "[[error:old]]"),
            ChatMessage("assistant", "x"),
            ChatMessage("user", "[[reply:new]]"),
        ]
    )
    assert text_of(await collect(provider.stream(request))) == "new"


async def test_scripted_delay_uses_clock() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock)
    task = asyncio.create_task(collect(provider.stream(user("[[reply:abc]][[chunks:3]][[delay:5]]"))))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done() and clock.pending_sleepers == 1
    await clock.advance_async(10, step=5)
    assert not task.done()  # two of three chunks so far
    await clock.advance_async(5)
    events = await asyncio.wait_for(task, 1)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["a", "b", "c"]


async def test_scripted_default_delay_setting() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock, delay_s=2.0, chunks=2)
    task = asyncio.create_task(collect(provider.stream(user("[[reply:abcd]]"))))
    for _ in range(5):
        await asyncio.sleep(0)
    await clock.advance_async(4, step=2)
    assert text_of(await asyncio.wait_for(task, 1)) == "abcd"


async def test_scripted_stall_waits_until_cancelled() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(clock)
    task = asyncio.create_task(collect(provider.stream(user("[[stall]]"))))
    await clock.advance_async(86400 * 365)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_scripted_error() -> None:
    provider = ScriptedProvider(FakeClock())
    with pytest.raises(ProviderError) as info:
        await collect(provider.stream(user("[[error:model exploded]]")))
    assert info.value.message == "model exploded" and not info.value.retryable


async def test_scripted_malformed_directive_is_provider_error() -> None:
    provider = ScriptedProvider(FakeClock())
    with pytest.raises(ProviderError) as info:
        await collect(provider.stream(user("[[chunks:zero]]")))
    assert not info.value.retryable and "chunks" in info.value.message


async def test_scripted_error_once_per_run() -> None:
    provider = ScriptedProvider(FakeClock())
    with pytest.raises(ProviderError) as info:
        await collect(provider.stream(user("[[error-once:flaky]][[reply:fine]]", run_id="r1")))
    assert info.value.retryable and info.value.message == "flaky"
    # the retry of the same run succeeds
    assert text_of(await collect(provider.stream(user("[[error-once:flaky]][[reply:fine]]", "r1")))) == "fine"
    # a different run fails once again
    with pytest.raises(ProviderError):
        await collect(provider.stream(user("[[error-once:flaky]]", run_id="r2")))
    # an assistant message after the last user message means "already answered": no failure
    request = ProviderRequest(
        messages=[ChatMessage("user", "[[error-once:x]][[reply:y]]"), ChatMessage("assistant", "partial")],
        run_id="r3",
    )
    assert text_of(await collect(provider.stream(request))) == "y"


async def test_scripted_error_once_memory_is_bounded() -> None:
    provider = ScriptedProvider(FakeClock())
    for i in range(MAX_TRACKED_ATTEMPTS + 5):
        provider._record_attempt(f"run-{i}")
    assert len(provider._attempts) == MAX_TRACKED_ATTEMPTS
    assert "run-0" not in provider._attempts
    assert f"run-{MAX_TRACKED_ATTEMPTS + 4}" in provider._attempts


async def test_scripted_tool_round_trip() -> None:
    provider = ScriptedProvider(FakeClock())
    text = 'spawn [[tool:sessions_spawn {"task":"child work","mode":"session"}]] [[tool:echo {"x":1}]]'
    first = await collect(provider.stream(user(text)))
    assert first == [
        ToolCallRequest(ToolCall("call_1", "sessions_spawn", {"task": "child work", "mode": "session"})),
        ToolCallRequest(ToolCall("call_2", "echo", {"x": 1})),
        Finished("tool_calls", Usage(input=23, output=0)),
    ]
    followup = ProviderRequest(
        messages=[
            ChatMessage("user", text),
            ChatMessage(
                "assistant", "", tool_calls=[e.call for e in first if isinstance(e, ToolCallRequest)]
            ),
            ChatMessage("tool", "accepted child-1", tool_call_id="call_1"),
            ChatMessage("tool", "x" * 600, tool_call_id="call_2"),
        ]
    )
    second = await collect(provider.stream(followup))
    reply = text_of(second)
    assert reply.startswith("done: accepted child-1; xxx")
    assert len(reply) == 500
    assert isinstance(second[-1], Finished) and second[-1].reason == "stop"


async def test_factory() -> None:
    clock = FakeClock()
    settings = parse_settings({"provider": "scripted", "scripted_chunks": 3})
    scripted = make_provider(settings, clock)
    assert isinstance(scripted.inner, ScriptedProvider) and scripted.name == "scripted"
    events = await collect(scripted.stream(user("[[reply:abcdef]]")))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["ab", "cd", "ef"]
    settings = parse_settings(
        {"provider": "openai", "openai_base_url": "http://127.0.0.1:9/v1", "openai_model": "m"}
    )
    openai_provider = make_provider(settings, clock)
    assert isinstance(openai_provider.inner, OpenAIProvider) and openai_provider.name == "openai"
    assert openai_provider.inner.model == "m" and openai_provider.default_model == "m"
    await openai_provider.aclose()


# --------------------------------------------------------------------------- OpenAIProvider against the stub


async def test_openai_streams_text() -> None:
    behaviour = StubBehaviour()
    async with run_stub(behaviour) as base_url:
        provider = OpenAIProvider(base_url, "stub-model", "sk-test")
        try:
            events = await collect(provider.stream(user("hello")))
        finally:
            await provider.aclose()
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 3
    assert text_of(events) == "stub reply: hello"
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"
    assert behaviour.requests[0]["model"] == "stub-model"
    assert behaviour.requests[0]["stream"] is True
    assert "tools" not in behaviour.requests[0]


async def test_openai_tool_call_from_fragments_and_message_conversion() -> None:
    behaviour = StubBehaviour()
    tools = [ToolSpec("sessions_spawn", "spawn a child", {"type": "object", "properties": {}})]
    async with run_stub(behaviour) as base_url:
        provider = OpenAIProvider(base_url, "stub-model", "sk-test")
        try:
            first = await collect(
                provider.stream(
                    ProviderRequest(
                        messages=[ChatMessage("system", "be brief"), ChatMessage("user", "please call-tool")],
                        tools=tools,
                        model="override-model",
                    )
                )
            )
            assert first == [
                ToolCallRequest(
                    ToolCall("call_stub_1", "sessions_spawn", {"task": "child work", "mode": "session"})
                ),
                Finished("tool_calls", Usage(input=30, output=42)),
            ]
            call = first[0].call if isinstance(first[0], ToolCallRequest) else None
            assert call is not None
            history = [
                ChatMessage("system", "be brief"),
                ChatMessage("user", "please call-tool", name="alice"),
                ChatMessage("assistant", "", tool_calls=[call]),
                ChatMessage("tool", "accepted", tool_call_id=call.id),
            ]
            second = await collect(provider.stream(ProviderRequest(messages=history, tools=tools)))
        finally:
            await provider.aclose()
    assert text_of(second) == "tool said: accepted"
    assert isinstance(second[-1], Finished) and second[-1].reason == "stop"

    first_req, second_req = behaviour.requests
    assert first_req["model"] == "override-model"
    assert first_req["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "sessions_spawn",
                "description": "spawn a child",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    assert second_req["model"] == "stub-model"
    assert second_req["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "please call-tool", "name": "alice"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_stub_1",
                    "type": "function",
                    "function": {"name": "sessions_spawn", "arguments": json.dumps(call.arguments)},
                }
            ],
        },
        {"role": "tool", "content": "accepted", "tool_call_id": "call_stub_1"},
    ]


async def test_openai_named_tool_and_invalid_json() -> None:
    behaviour = StubBehaviour()
    async with run_stub(behaviour) as base_url:
        provider = OpenAIProvider(base_url, "stub-model", "sk-test")
        try:
            events = await collect(provider.stream(user("call-tool:sessions_send now")))
            assert isinstance(events[0], ToolCallRequest) and events[0].call.name == "sessions_send"
            behaviour.tool_arguments_raw = '{"task": "unterminated'
            with pytest.raises(ProviderError) as info:
                await collect(provider.stream(user("call-tool")))
            assert "invalid JSON" in info.value.message and not info.value.retryable
        finally:
            await provider.aclose()


async def test_openai_500_is_retryable() -> None:
    async with run_stub() as base_url:
        provider = OpenAIProvider(base_url, "stub-model", "sk-test")
        try:
            with pytest.raises(ProviderError) as info:
                await collect(provider.stream(user("fail-500")))
        finally:
            await provider.aclose()
    assert info.value.retryable
    assert "500" in info.value.message


async def test_openai_connection_refused_is_retryable() -> None:
    async with run_stub() as base_url:
        pass  # the port is free again once the stub stops
    provider = OpenAIProvider(base_url, "stub-model", "sk-test")
    try:
        with pytest.raises(ProviderError) as info:
            await collect(provider.stream(user("hello")))
    finally:
        await provider.aclose()
    assert info.value.retryable


async def test_openai_stall_is_cancellable() -> None:
    async with run_stub() as base_url:
        provider = OpenAIProvider(base_url, "stub-model", "sk-test")
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(collect(provider.stream(user("stall"))), 0.3)
        finally:
            await provider.aclose()


async def test_openai_bad_message_role() -> None:
    provider = OpenAIProvider("http://127.0.0.1:9/v1", "m", "k")
    try:
        with pytest.raises(ProviderError):
            await collect(provider.stream(ProviderRequest(messages=[ChatMessage("wizard", "x")])))
        with pytest.raises(ProviderError):
            await collect(provider.stream(ProviderRequest(messages=[ChatMessage("tool", "x")])))
    finally:
        await provider.aclose()
