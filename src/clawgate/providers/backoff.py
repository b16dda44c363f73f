"""Retry delays for provider turns (pure).

Exponential backoff with full jitter (a uniform draw in [0, base * 2^attempt], capped), so a
fleet of runs hit by the same 429 does not retry in lockstep. A provider's Retry-After is a
floor: the delay is never shorter than what the provider asked for, and never longer than the cap.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    max_delay_s: float,
    retry_after_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry)."""
    ceiling = min(max_delay_s, base_s * (2 ** (attempt - 1)))
    delay: float = ceiling * rand()
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return min(delay, max_delay_s)
