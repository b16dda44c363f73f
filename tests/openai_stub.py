"""A tiny OpenAI-compatible chat completions server for tests (SSE streaming only).

    async with run_stub(behaviour) as base_url:   # "http://127.0.0.1:PORT/v1"
        ...
    behaviour.requests                              # JSON bodies received, in order

What the LAST user message selects (only when no tool message follows it):
    fail-500            HTTP 500 with an OpenAI-style error body
    stall               headers are sent, then nothing until the stub shuts down
    call-tool[:NAME]    a streamed tool call NAME (default sessions_spawn): id and name in the
                        first fragment, the arguments split over two more; finish_reason tool_calls
otherwise (and after tool results) the reply text is streamed in several content chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_TOOL = "sessions_spawn"
DEFAULT_TOOL_ARGS: dict[str, Any] = {"task": "child work", "mode": "session"}


@dataclass
class StubBehaviour:
    reply_prefix: str = "stub reply: "
    content_chunks: int = 3
    tool_arguments: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TOOL_ARGS))
    tool_arguments_raw: str | None = None  # sent verbatim instead of tool_arguments (e.g. invalid JSON)
    requests: list[dict[str, Any]] = field(default_factory=list)
    usages: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion) reported per call
    # Fault injection, driven by the message text: "flaky-429" / "flaky-529" answer the first
    # `fail_first` requests with that status (Retry-After: `retry_after`); "drop-mid" streams two
    # chunks and then breaks the connection.
    fail_first: int = 2
    retry_after: str = "1"
    failed: int = 0
    closing: asyncio.Event = field(default_factory=asyncio.Event)


def _split(text: str, n: int) -> list[str]:
    size = max(1, -(-len(text) // max(1, n)))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def make_app(behaviour: StubBehaviour) -> Starlette:
    async def completions(request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        behaviour.requests.append(body)
        model = str(body.get("model", "stub-model"))
        messages: list[dict[str, Any]] = body.get("messages", [])
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        text = str(messages[last_user].get("content") or "") if last_user >= 0 else ""
        tool_results = [str(m.get("content")) for m in messages[last_user + 1 :] if m.get("role") == "tool"]

        for status in (429, 529):
            if f"flaky-{status}" in text and behaviour.failed < behaviour.fail_first:
                behaviour.failed += 1
                return JSONResponse(
                    {"error": {"message": f"stub {status}", "type": "rate_limit_error", "code": None}},
                    status_code=status,
                    headers={"Retry-After": behaviour.retry_after},
                )
        if not tool_results and "fail-500" in text:
            return JSONResponse(
                {"error": {"message": "stub failure", "type": "server_error", "code": None}}, status_code=500
            )

        async def events() -> AsyncIterator[bytes]:
            if not tool_results and "stall" in text:
                await behaviour.closing.wait()
                return
            yield _chunk(model, {"role": "assistant", "content": ""})
            if "drop-mid" in text:
                yield _chunk(model, {"content": "partial "})
                yield _chunk(model, {"content": "answer"})
                raise ConnectionResetError("stub drops the stream")
            match = re.search(r"call-tool(?::([A-Za-z0-9_.-]+))?", text)
            if match and not tool_results:
                name = match.group(1) or DEFAULT_TOOL
                args = behaviour.tool_arguments_raw
                if args is None:
                    args = json.dumps(behaviour.tool_arguments)
                half = len(args) // 2
                yield _chunk(
                    model,
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_stub_1",
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    },
                )
                for piece in (args[:half], args[half:]):
                    yield _chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                yield _chunk(model, {}, "tool_calls")
                reply = args
            else:
                if tool_results:
                    reply = "tool said: " + "; ".join(tool_results)
                else:
                    reply = behaviour.reply_prefix + text
                for piece in _split(reply, behaviour.content_chunks):
                    yield _chunk(model, {"content": piece})
                yield _chunk(model, {}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                # Arbitrary but distinct counts, so a test can check they are summed exactly.
                usage = (7 * len(messages) + len(text), len(reply) + 1)
                behaviour.usages.append(usage)
                tail = {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": usage[0],
                        "completion_tokens": usage[1],
                        "total_tokens": sum(usage),
                    },
                }
                yield f"data: {json.dumps(tail)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave pytest's signal handlers alone
        yield


@contextlib.asynccontextmanager
async def run_stub(behaviour: StubBehaviour | None = None) -> AsyncIterator[str]:
    behaviour = behaviour if behaviour is not None else StubBehaviour()
    config = uvicorn.Config(
        make_app(behaviour),
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_level="warning",
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # surface a startup failure
                raise RuntimeError("stub server exited before starting")
            await asyncio.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        behaviour.closing.set()
        server.should_exit = True
        await task
