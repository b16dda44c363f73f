"""Helpers shared by the tests (the gateway process helper ships in `clawgate.testing`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


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
