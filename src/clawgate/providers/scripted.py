"""The `scripted` provider: offline, deterministic, driven by directives in the last user message.

A directive is `[[name]]` or `[[name:arg]]` anywhere in the text of the LAST user message:

    directive             effect
    (none)                reply ``ok: <first 200 chars of the message, directives stripped>``
    [[reply:TEXT]]        reply exactly TEXT (wins over `size`)
    [[size:N]]            reply with N bytes of deterministic ASCII text (load tests)
    [[chunks:N]]          stream the reply as N roughly equal TextDelta pieces (default: `chunks`)
    [[delay:SECONDS]]     `await clock.sleep(SECONDS)` before each chunk (default: `delay_s`)
    [[stall]]             wait forever (`clock.sleep(10**9)`) -- for run-timeout tests
    [[error:MSG]]         raise ProviderError(MSG), not retryable
    [[error-once:MSG]]    raise ProviderError(MSG, retryable=True) on the first attempt of a run
    [[tool:NAME JSON]]    first turn: request tool NAME with the JSON object as arguments
                          (repeatable); next turn (tool results present): reply
                          ``done: <tool results joined by '; '>`` (at most 500 chars)
    [[fail:N:KIND]]       the first N attempts of the run fail, retryable, as KIND:
                          429 (rate limit), 529 / 503 (overloaded), 500, timeout
    [[retry-after:S]]     the failures above carry a Retry-After of S seconds
    [[fail-model:MODEL]]  every call to MODEL fails as overloaded (fallback and breaker tests;
                          the default model is called ``scripted``)
    [[cut:K]]             the stream stops after K chunks (a provider that drops halfway)

Order of effects: error, error-once, fail, stall, tool calls, reply. Unknown `[[...]]`
text is not a directive and stays in the message. A malformed argument (e.g.
`[[chunks:x]]`) makes the turn fail with a non-retryable ProviderError.

Parsing is pure (`parse_directives`), so it is tested without an event loop.
The only time source is the injected `Clock`, so tests fast-forward delays.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from clawgate.errors import ProviderError
from clawgate.providers.base import (
    ChatMessage,
    Finished,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    Usage,
)
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry

DEFAULT_ECHO_CHARS = 200
TOOL_RESULT_MAX_CHARS = 500
MAX_SIZE_BYTES = 64 * 1024 * 1024
STALL_S = 10**9
# Bound on the per-run attempt memory used by `error-once`; the oldest run is evicted first.
MAX_TRACKED_ATTEMPTS = 10_000

_KNOWN = frozenset(
    {
        "reply",
        "chunks",
        "delay",
        "stall",
        "error",
        "error-once",
        "tool",
        "size",
        "fail",
        "fail-model",
        "cut",
        "retry-after",
    }
)
# `[[fail:N:KIND]]` kinds and what they simulate (an OpenAI-compatible server's answers).
FAIL_KINDS = {
    "429": ("rate_limit", "provider returned 429: rate limited"),
    "529": ("overloaded", "provider returned 529: overloaded"),
    "503": ("overloaded", "provider returned 503: unavailable"),
    "500": ("server", "provider returned 500: internal error"),
    "timeout": ("timeout", "provider timed out"),
}
_SIZE_PATTERN = b"abcdefghijklmnopqrstuvwxyz0123456789 "


@dataclass(slots=True)
class Script:
    """What the last user message asks the scripted provider to do."""

    text: str = ""  # the message with directives removed (stripped)
    reply: str | None = None
    size: int | None = None
    chunks: int | None = None
    delay_s: float | None = None
    stall: bool = False
    error: str | None = None
    error_once: str | None = None
    tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_n: int = 0  # the first `fail_n` attempts of the run fail with `fail_kind`
    fail_kind: str = "429"
    fail_model: str | None = None  # every call to this model fails as overloaded
    cut_after: int | None = None  # the stream stops after this many chunks
    retry_after_s: float | None = None


def parse_directives(text: str) -> Script:
    """Extract the directives of `text`. Raises ValueError on a malformed directive argument."""
    script = Script()
    kept: list[str] = []
    pos = 0
    n = len(text)
    while True:
        start = text.find("[[", pos)
        if start < 0:
            kept.append(text[pos:])
            break
        parsed = _parse_one(text, start + 2, script)
        if parsed is None:  # not a directive: keep the brackets as text
            kept.append(text[pos : start + 2])
            pos = start + 2
            continue
        kept.append(text[pos:start])
        pos = parsed
        if pos >= n:
            break
    script.text = _join_collapsed(kept)
    return script


def _join_collapsed(pieces: list[str]) -> str:
    """Join the text around removed directives without doubling the whitespace at the seams."""
    out = ""
    for piece in pieces:
        if out and out[-1].isspace() and piece[:1].isspace():
            piece = piece.lstrip()
        out += piece
    return out.strip()


def _parse_one(text: str, i: int, script: Script) -> int | None:
    """Parse the directive whose name starts at `i`; apply it to `script`; return the end index."""
    j = i
    while j < len(text) and (text[j].isalpha() or text[j] == "-"):
        j += 1
    name = text[i:j]
    if name not in _KNOWN:
        return None
    if text.startswith("]]", j):
        arg: str | None = None
        end = j + 2
    elif text.startswith(":", j):
        if name == "tool":
            return _parse_tool(text, j + 1, script)
        close = text.find("]]", j + 1)
        if close < 0:
            return None
        arg = text[j + 1 : close]
        end = close + 2
    else:
        return None
    _apply(name, arg, script)
    return end


def _parse_tool(text: str, i: int, script: Script) -> int | None:
    """`[[tool:NAME]]` or `[[tool:NAME {json object}]]`; the JSON may itself contain `]]`."""
    j = i
    while j < len(text) and not text[j].isspace() and not text.startswith("]]", j):
        j += 1
    tool_name = text[i:j]
    if not tool_name:
        raise ValueError("[[tool:...]] needs a tool name")
    while j < len(text) and text[j].isspace():
        j += 1
    arguments: Any = {}
    if not text.startswith("]]", j):
        try:
            arguments, j = json.JSONDecoder().raw_decode(text, j)
        except json.JSONDecodeError as exc:
            raise ValueError(f"[[tool:{tool_name} ...]] has invalid JSON: {exc.msg}") from exc
        if not isinstance(arguments, dict):
            raise ValueError(f"[[tool:{tool_name} ...]] arguments must be a JSON object")
        while j < len(text) and text[j].isspace():
            j += 1
        if not text.startswith("]]", j):
            raise ValueError(f"[[tool:{tool_name} ...]] is not closed by ]]")
    script.tools.append((tool_name, arguments))
    return j + 2


def _apply(name: str, arg: str | None, script: Script) -> None:
    if name == "stall":
        script.stall = True
        return
    if arg is None:
        raise ValueError(f"[[{name}]] needs an argument: [[{name}:...]]")
    if name == "reply":
        script.reply = arg
    elif name == "error":
        script.error = arg
    elif name == "error-once":
        script.error_once = arg
    elif name == "chunks":
        script.chunks = _int_arg(name, arg, minimum=1)
    elif name == "size":
        script.size = _int_arg(name, arg, minimum=0, maximum=MAX_SIZE_BYTES)
    elif name == "fail":
        count, _, kind = arg.partition(":")
        script.fail_n = _int_arg(name, count, minimum=0, maximum=1_000_000)
        kind = kind or "429"
        if kind not in FAIL_KINDS:
            raise ValueError(f"[[fail:{arg}]]: kind must be one of {', '.join(FAIL_KINDS)}")
        script.fail_kind = kind
    elif name == "fail-model":
        script.fail_model = arg
    elif name == "cut":
        script.cut_after = _int_arg(name, arg, minimum=0)
    elif name == "retry-after":
        script.retry_after_s = _float_arg(name, arg)
    elif name == "delay":
        try:
            delay = float(arg)
        except ValueError:
            raise ValueError(f"[[delay:{arg}]] is not a number") from None
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"[[delay:{arg}]] must be a finite number >= 0")
        script.delay_s = delay


def _float_arg(name: str, arg: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"[[{name}:{arg}]] is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"[[{name}:{arg}]] must be a finite number >= 0")
    return value


def _int_arg(name: str, arg: str, *, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(arg.strip())
    except ValueError:
        raise ValueError(f"[[{name}:{arg}]] is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"[[{name}:{arg}]] is out of range")
    return value


def split_chunks(text: str, n: int) -> list[str]:
    """Split `text` into at most `n` non-empty pieces whose lengths differ by at most one."""
    if not text:
        return []
    n = max(1, min(n, len(text)))
    base, extra = divmod(len(text), n)
    pieces: list[str] = []
    pos = 0
    for k in range(n):
        size = base + (1 if k < extra else 0)
        pieces.append(text[pos : pos + size])
        pos += size
    return pieces


def sized_text(size: int) -> str:
    """`size` bytes (ASCII, so also `size` characters) of deterministic text."""
    reps, rest = divmod(size, len(_SIZE_PATTERN))
    return (_SIZE_PATTERN * reps + _SIZE_PATTERN[:rest]).decode("ascii")


def _last_user_index(messages: list[ChatMessage]) -> int | None:
    for idx in range(len(messages) - 1, -1, -1):
        if messages[idx].role == "user":
            return idx
    return None


class ScriptedProvider:
    """Deterministic offline provider (see the module docstring for the directive table).

    `error-once` remembers which run ids have already been attempted in an
    OrderedDict bounded to MAX_TRACKED_ATTEMPTS entries (oldest evicted first),
    so a long-lived gateway never grows it without bound. Tool call ids come from
    a per-provider counter (`call_1`, `call_2`, ...), unique within the process.
    """

    name = "scripted"

    def __init__(self, clock: Clock, *, delay_s: float = 0.0, chunks: int = 1) -> None:
        self._clock = clock
        self._delay_s = max(0.0, delay_s)
        self._chunks = max(1, chunks)
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self.attempts_max = MAX_TRACKED_ATTEMPTS
        self._call_ids = itertools.count(1)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        messages = request.messages
        last_user = _last_user_index(messages)
        user_text = messages[last_user].content if last_user is not None else ""
        after = messages[last_user + 1 :] if last_user is not None else list(messages)
        try:
            script = parse_directives(user_text)
        except ValueError as exc:
            raise ProviderError(f"scripted: {exc}") from None

        delay = script.delay_s if script.delay_s is not None else self._delay_s
        chunks = script.chunks if script.chunks is not None else self._chunks

        if script.error is not None:
            raise ProviderError(script.error)
        if script.error_once is not None:
            answered = any(m.role == "assistant" for m in after)
            first_attempt = self._record_attempt(request.run_id)
            if not answered and first_attempt:
                raise ProviderError(script.error_once, retryable=True)
        self._simulate_faults(script, request)
        if script.stall:
            await self._clock.sleep(STALL_S)

        tool_results = [m.content for m in after if m.role == "tool"]
        if script.tools and not tool_results:
            if delay > 0:
                await self._clock.sleep(delay)
            for tool_name, arguments in script.tools:
                call = ToolCall(id=f"call_{next(self._call_ids)}", name=tool_name, arguments=dict(arguments))
                yield ToolCallRequest(call)
            yield Finished("tool_calls", _usage(messages, ""))
            return

        if script.tools:
            reply = f"done: {'; '.join(tool_results)}"[:TOOL_RESULT_MAX_CHARS]
        elif script.reply is not None:
            reply = script.reply
        elif script.size is not None:
            reply = sized_text(script.size)
        else:
            reply = f"ok: {script.text[:DEFAULT_ECHO_CHARS]}"

        for n, piece in enumerate(split_chunks(reply, chunks)):
            if script.cut_after is not None and n >= script.cut_after:
                raise ProviderError("provider stream ended before the reply was complete", kind="stream_cut")
            if delay > 0:
                await self._clock.sleep(delay)
            yield TextDelta(piece)
        yield Finished(usage=_usage(messages, reply))

    def _simulate_faults(self, script: Script, request: ProviderRequest) -> None:
        if script.fail_model is not None and (request.model or "scripted") == script.fail_model:
            raise ProviderError(
                f"provider returned 529: {script.fail_model} overloaded",
                retryable=True,
                kind="overloaded",
                retry_after_s=script.retry_after_s,
            )
        if script.fail_n:
            count = self._attempts.get(request.run_id, 0)
            self._record_attempt(request.run_id)
            if count < script.fail_n:
                kind, message = FAIL_KINDS[script.fail_kind]
                raise ProviderError(message, retryable=True, kind=kind, retry_after_s=script.retry_after_s)

    def register_state(self, registry: StateRegistry) -> None:
        """The per-run attempt memory of `error-once` / `fail` (size-bounded)."""
        registry.add("scripted_attempts", self._attempts.__len__, ttl_s=None, max_size=self.attempts_max)

    def _record_attempt(self, run_id: str) -> bool:
        """Count an attempt of `run_id`; True if it is the first one we remember."""
        count = self._attempts.pop(run_id, 0)
        self._attempts[run_id] = count + 1
        while len(self._attempts) > MAX_TRACKED_ATTEMPTS:
            self._attempts.popitem(last=False)
        return count == 0

    async def aclose(self) -> None:
        return None


def _usage(messages: list[ChatMessage], reply: str) -> Usage:
    """Deterministic token counts: one token per started 4 characters (and 1 per message)."""
    prompt = sum(len(m.content) // 4 + 1 for m in messages)
    return Usage(input=prompt, output=(len(reply) + 3) // 4)
