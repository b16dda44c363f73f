"""Helpers shared by the Redis I/O modules of scale-out (dispatch, fan-out)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from redis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from clawgate.store.redis_client import checkpoint
from clawgate.store.redis_store import CALL_TIMEOUT_S

T = TypeVar("T")


# CALL_TIMEOUT_S (the store's) is also the longest one Redis call of scale-out may take (a
# blocking read's block time included). The cluster's connections have no socket timeout of
# their own: redis-py would arm one per reply read and one per send (about 10% of a busy
# gateway's CPU), where one per call does.


async def redis_call(aw: Awaitable[T]) -> T:
    """Await one Redis call within `CALL_TIMEOUT_S` (a paused Redis raises TimeoutError, an
    OSError, like a dead one), then re-check this task's cancellation (`checkpoint`)."""
    async with asyncio.timeout(CALL_TIMEOUT_S):
        res = await aw
    checkpoint()
    return res


def as_text(v: bytes | str) -> str:
    """A Redis reply as text (bytes unless the client decodes responses)."""
    return v.decode() if isinstance(v, bytes) else v


async def guarded(
    name: str,
    loop: Callable[[], Coroutine[Any, Any, None]],
    *,
    log: FilteringBoundLogger,
    label: str,
    retry_s: float,
    on_error: Callable[[str, BaseException], None],
    max_retry_s: float = 2.0,
) -> None:
    """The body of a supervised Redis loop (`Supervisor.loop` owns the task): log, pause,
    restart. A Redis error is an outage, not a bug: logged, not counted. Any other exception
    is reported to `on_error` (the supervisor's failure count). The pause starts at `retry_s`
    and doubles while the loop keeps failing at once (Redis is down), up to `max_retry_s`, so
    an outage is not a tight reconnect loop; a loop that ran for a while before failing
    starts again from `retry_s`. (The supervisor's own restart, a fixed pause on its clock,
    is not used: this back-off runs in real time, like the Redis client's timeouts.)"""
    clock = asyncio.get_running_loop().time
    failures = 0
    while True:
        checkpoint()
        started = clock()
        try:
            await loop()
            return
        except (RedisError, OSError) as exc:
            failures = 1 if clock() - started > max_retry_s else failures + 1
            log.warning(f"{label} loop: redis error", loop=name, error=str(exc), failures=failures)
        except Exception as exc:
            failures = 1 if clock() - started > max_retry_s else failures + 1
            log.exception(f"{label} loop failed", loop=name)
            on_error(name, exc)
        await asyncio.sleep(pause_s(failures, retry_s=retry_s, max_retry_s=max_retry_s))


def pause_s(failures: int, *, retry_s: float, max_retry_s: float) -> float:
    """The pause after the `failures`-th failure in a row: retry_s, doubling, capped."""
    return float(min(max_retry_s, retry_s * 2.0 ** max(0, min(failures - 1, 30))))
