"""A circuit breaker per provider target (pure: reads the injected clock, does no I/O).

closed --(`failure_threshold` consecutive failures)--> open --(`cooldown_s`)--> half-open
half-open lets one call through: success closes the circuit, failure opens it again. While
open, calls fail fast with a clear error instead of waiting on a provider that is down.
"""

from __future__ import annotations

from clawgate.state.clock import Clock

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    __slots__ = ("clock", "cooldown_s", "failure_threshold", "failures", "opened_at", "opens", "probing")

    def __init__(self, clock: Clock, *, failure_threshold: int, cooldown_s: float) -> None:
        self.clock = clock
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.failures = 0  # consecutive
        self.opened_at: float | None = None
        self.probing = False
        self.opens = 0

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if self.clock.time() - self.opened_at >= self.cooldown_s:
            return HALF_OPEN
        return OPEN

    def retry_in_s(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock.time())

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one probe at a time does."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.failure_threshold:
            if self.opened_at is None or self.probing:
                self.opens += 1
            self.opened_at = self.clock.time()
        self.probing = False

    def abandon(self) -> None:
        """A call ended without an outcome (cancelled): let the next probe through."""
        self.probing = False
