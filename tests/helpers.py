"""Helpers shared by the tests (the gateway process helper ships in `clawgate.testing`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from clawgate.state.clock import FakeClock

T = TypeVar("T")


async def wait_until(pred: Callable[[], bool], what: str = "condition", timeout: float = 20.0) -> None:
    """Yield to the loop until `pred()` holds; fail after `timeout` seconds of real time.

    For state that changes as the gateway's tasks run, never for TTLs (those move with the
    fake clock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def poll_until(
    fetch: Callable[[], Awaitable[T]],
    pred: Callable[[T], bool],
    what: str = "condition",
    timeout: float = 20.0,
) -> T:
    """Await `fetch()` until `pred` holds for what it returns, and return that; fail after
    `timeout` seconds of real time (with the last value in the message).

    `wait_until` for a condition that needs an await to observe (a client call, a store read):
    state written behind the test's back (a run's end hook, a delivery's store write), which
    a fixed sleep only hopes has landed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await fetch()
        if pred(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {value!r}")
        await asyncio.sleep(0.01)


async def advance_until(
    clock: FakeClock, pred: Callable[[], bool], what: str = "condition", step_s: float = 1.0
) -> None:
    """Move the fake clock by `step_s` at a time until `pred()` holds (at most 20 s of real time).

    For a wait that starts when the gateway gets to it (a provider's sleep behind a store round
    trip): a single advance made before that point would be lost on it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        clock.advance(step_s)
        await asyncio.sleep(0.002)


async def provider_sleeping(
    clock: FakeClock, delay_s: float, n: int = 1, what: str = "the provider's sleep"
) -> None:
    """Wait (in real time) until `n` tasks sleep until exactly `clock.time() + delay_s`.

    For a test that must advance by exactly `delay_s` (it checks that nothing happens before):
    a `[[delay:S]]` sleep starts behind the run's store round trip, after the "start" event,
    and an advance made before it is lost on it. A count of pending timers is no substitute
    (another timer can meet it first). The gateway's own loops sleep on the clock too (ticks
    every `tick_interval_s`, 30 s by default; maintenance every `maintenance_interval_s`, 60 s):
    where one of them is due at the same moment, count it in `n`."""
    due = clock.time() + delay_s
    await wait_until(lambda: clock.sleeping_until(due) >= n, what)


# Heavy packages that only some configurations need, which a plain SQLite + scripted gateway
# must not import (tests/test_lean_start.py, tests/test_perf_guards.py): the OpenAI provider,
# the Redis store, benchmark plots, test tools, device-proof crypto, the CLI's tables, and the
# typer / pydantic stack the CLI and the settings no longer use.
HEAVY = (
    "openai",
    "redis",
    "matplotlib",
    "numpy",
    "hypothesis",
    "schemathesis",
    # device proofs only (imported when a client sends one); CLI tables and colours
    "cryptography",
    "rich",
    "pygments",
    # optional imports of structlog (greenlet-local context) and uvicorn (--reload watcher)
    "greenlet",
    "watchfiles",
    # the CLI is click (uvicorn imports it anyway), not typer (which imports pydantic);
    # the settings are msgspec, not pydantic-settings
    "typer",
    "pydantic",
    "pydantic_core",
    "pydantic_settings",
)
