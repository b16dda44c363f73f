"""Writing a run's end through a store outage.

A run that was executing when the store became unreachable (Redis restarting, a network
cut) still finishes; its end must reach the store once it answers again, or the run would
stay "running" there and later be ended a second time as interrupted. So the end write is
retried with capped exponential backoff and jitter, for at most `retry_for_s`.

A retried write may meet its own earlier attempt: the connection broke after Redis ran the
write but before the reply came back. The store then answers with the end it holds, which
is equal to ours; that is our end, not another one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog

from clawgate.errors import StoreError
from clawgate.store.base import Fence, Store
from clawgate.store.records import RunRecord

log = structlog.get_logger("clawgate.runs")

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0


def next_delay(prev_s: float, *, rand: Callable[[], float] = random.random) -> float:
    """Doubling, capped at MAX_DELAY_S, with up to 50% jitter off (never below the first delay)."""
    base = min(MAX_DELAY_S, max(FIRST_DELAY_S, prev_s * 2))
    return max(FIRST_DELAY_S, base * (1 - 0.5 * rand()))


EndWriter = Callable[[RunRecord, Fence | None], Awaitable[RunRecord | None]]


async def persist_end(
    store: Store,
    rec: RunRecord,
    fence: Fence | None,
    *,
    retry_for_s: float,
    writer: EndWriter | None = None,
) -> RunRecord | None:
    """`writer` (default `store.end_run`; the webhooks' writer adds the run's delivery to the
    same write), retried on StoreError until it answers or `retry_for_s` passed (then the last
    error is raised). Returns what `end_run` returns, `rec` itself for our own end."""
    write = writer or store.end_run
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    delay = 0.0
    attempts = 0
    while True:
        attempts += 1
        try:
            stored = await write(rec, fence)
        except StoreError as exc:
            if store.closed or loop.time() >= deadline:
                if retry_for_s <= 0:
                    raise  # no retry asked for: the caller logs it
                log.error(
                    "run end not written: the store did not answer in time",
                    run_id=rec.run_id, attempts=attempts, retry_for_s=retry_for_s, error=str(exc),
                )  # fmt: skip
                raise
            if attempts == 1:
                log.warning(
                    "run end write failed; retrying until the store answers",
                    run_id=rec.run_id,
                    error=str(exc),
                )
            delay = next_delay(delay)
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            continue
        if attempts > 1:
            log.info("run end written after a store outage", run_id=rec.run_id, attempts=attempts)
            if stored is not None and stored is not rec and stored == rec:
                return rec  # our own earlier attempt had landed
        return stored
