"""A mock OpenAI-compatible LLM for benchmarks: streamed chat completions, counted.

    .venv/bin/python benchmarks/mock_llm.py --port 8765 --latency-ms 50

Serves `POST /v1/chat/completions` (streamed as server-sent events when the request
says `stream: true`, else one JSON answer) and `GET /v1/models`, on loopback only.
Every answer waits `--latency-ms` before its first byte, then sends its text in a few
chunks. The answer is a tool call to `sessions_spawn` when, and only when, a user
message after the last assistant message contains the marker `[[spawn]]`, the request
offers a `sessions_spawn` tool, and no tool result has come back since; otherwise it is
text.
The subagent's task never contains the marker, so a child answers with text.

`GET /stats` returns the calls counted since the start (or the last `POST /reset`):
`calls`, `spawn_calls` (answers that were a `sessions_spawn` call), `text_calls`,
`no_spawn_tool` (a marker seen but no such tool offered), `last_call_end` (the wall
clock, `time.time()`, when the last answer was complete).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SPAWN_MARKER = "[[spawn]]"
SPAWN_TOOL = "sessions_spawn"
CHILD_TASK = "child task: say done"
REPLY_WORDS = ("mock ", "reply ", "from ", "the ", "benchmark ", "llm")
MODEL_ID = "mock-model"


@dataclass
class Stats:
    calls: int = 0
    spawn_calls: int = 0
    text_calls: int = 0
    no_spawn_tool: int = 0
    last_call_end: float = 0.0  # time.time() when the last answer was complete


def _text_of(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def wants_spawn(body: dict[str, Any]) -> tuple[bool, bool]:
    """(marker in a user message of the current turn, spawn tool offered).

    The current turn is the user messages after the last assistant message (OpenClaw
    sends its runtime context as a second user message after the user's text). A tool
    result there means the spawn's result came back: the answer is text.
    """
    marker = False
    for message in reversed(body.get("messages") or []):
        role = message.get("role")
        if role == "tool":
            return False, False
        if role == "assistant":
            break
        if role == "user" and SPAWN_MARKER in _text_of(message.get("content")):
            marker = True
    tools = body.get("tools") or []
    offered = any((t.get("function") or {}).get("name") == SPAWN_TOOL for t in tools)
    return marker, offered


def _chunk(cid: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    payload = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}


def _dump(path: Path, body: dict[str, Any]) -> None:
    path.write_text(json.dumps(body, indent=1))


def build_app(latency_s: float, stats: Stats, dump: Path | None = None) -> Starlette:
    async def completions(request: Request) -> Response:
        body = await request.json()
        if dump is not None:
            _dump(dump, body)
        stats.calls += 1
        marker, offered = wants_spawn(body)
        spawn = marker and offered
        if marker and not offered:
            stats.no_spawn_tool += 1
        if spawn:
            stats.spawn_calls += 1
        else:
            stats.text_calls += 1
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        arguments = json.dumps({"task": CHILD_TASK, "cleanup": "delete"})
        if not body.get("stream"):
            await asyncio.sleep(latency_s)
            message: dict[str, Any] = {"role": "assistant", "content": "".join(REPLY_WORDS)}
            if spawn:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": SPAWN_TOOL, "arguments": arguments},
                        }
                    ],
                }
            answer = JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": MODEL_ID,
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": "tool_calls" if spawn else "stop"}
                    ],
                    "usage": _usage(),
                }
            )
            stats.last_call_end = time.time()
            return answer
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def stream() -> AsyncIterator[bytes]:
            await asyncio.sleep(latency_s)
            yield _chunk(cid, {"role": "assistant", "content": ""})
            if spawn:
                head = {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": SPAWN_TOOL, "arguments": ""},
                }
                yield _chunk(cid, {"tool_calls": [head]})
                half = len(arguments) // 2
                for part in (arguments[:half], arguments[half:]):
                    yield _chunk(cid, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                yield _chunk(cid, {}, "tool_calls")
            else:
                for word in REPLY_WORDS:
                    yield _chunk(cid, {"content": word})
                yield _chunk(cid, {}, "stop")
            if include_usage:
                tail = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time())}
                tail |= {"model": MODEL_ID, "choices": [], "usage": _usage()}
                yield b"data: " + json.dumps(tail).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            stats.last_call_end = time.time()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def models(_: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "mock"}]}
        )

    async def get_stats(_: Request) -> Response:
        return JSONResponse(asdict(stats))

    async def reset(_: Request) -> Response:
        stats.calls = stats.spawn_calls = stats.text_calls = stats.no_spawn_tool = 0
        stats.last_call_end = 0.0
        return JSONResponse(asdict(stats))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/stats", get_stats, methods=["GET"]),
            Route("/reset", reset, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="wait before each answer's first byte")
    parser.add_argument(
        "--dump", type=Path, help="write each request's body to this file (the last one stays)"
    )
    args = parser.parse_args()
    app = build_app(args.latency_ms / 1000.0, Stats(), args.dump)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
