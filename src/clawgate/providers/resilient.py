"""Provider faults: a concurrency limit, a circuit breaker per model, and fallback models.

Wraps the configured provider. Each turn goes to the first target (the run's model, then
`fallback_models` in order) whose circuit lets it through; a turn waits for one of
`provider_max_concurrency` slots. Retries with backoff are the agent loop's job
(`agent/loop.py`): this wrapper decides *where* a turn goes, the loop decides *when* it is
tried again. When every target's circuit is open the turn fails fast, naming the provider.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from clawgate.errors import ProviderError
from clawgate.providers.base import Finished, Provider, ProviderEvent, ProviderRequest
from clawgate.providers.breaker import CircuitBreaker
from clawgate.state.clock import Clock
from clawgate.state.registry import StateRegistry


class ResilientProvider:
    def __init__(
        self,
        inner: Provider,
        clock: Clock,
        *,
        default_model: str,
        fallback_models: list[str],
        max_concurrency: int,
        breaker_failures: int,
        breaker_cooldown_s: float,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.clock = clock
        self.default_model = default_model
        self.fallback_models = list(fallback_models)
        self.slots = asyncio.Semaphore(max_concurrency)
        self.max_concurrency = max_concurrency
        self._breaker_args = {"failure_threshold": breaker_failures, "cooldown_s": breaker_cooldown_s}
        # One breaker per target model: the configured ones only, so this never grows past
        # 1 + len(fallback_models) + the distinct models runs ask for (bounded below).
        self.breakers: dict[str, CircuitBreaker] = {}
        self.max_breakers = 64 + len(fallback_models)
        self.errors: Counter[str] = Counter()
        self.fallbacks_used = 0
        self.in_flight = 0
        for model in self._targets(None):  # the configured targets exist from the start
            self._breaker(model)

    def _breaker(self, model: str) -> CircuitBreaker:
        breaker = self.breakers.get(model)
        if breaker is None:
            if len(self.breakers) >= self.max_breakers:
                # Forget a closed breaker rather than grow: it holds no state worth keeping.
                closed = next(
                    (m for m, b in self.breakers.items() if b.failures == 0 and b.opened_at is None), None
                )
                if closed is not None:
                    del self.breakers[closed]
            breaker = CircuitBreaker(self.clock, **self._breaker_args)  # type: ignore[arg-type]
            self.breakers[model] = breaker
        return breaker

    def _targets(self, model: str | None, fallbacks: list[str] | None = None) -> list[str]:
        primary = model or self.default_model
        chain = self.fallback_models if fallbacks is None else fallbacks
        return [primary, *(m for m in chain if m != primary)]

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        targets = self._targets(request.model, request.fallback_models)
        chosen: str | None = None
        for model in targets:
            if self._breaker(model).allow():
                chosen = model
                break
        if chosen is None:
            retry = min(self._breaker(m).retry_in_s() for m in targets)
            self.errors["circuit_open"] += 1
            raise ProviderError(
                f"provider {self.name} is unavailable: circuit open for {', '.join(targets)} "
                f"(next probe in {retry:.0f} s)",
                kind="circuit_open",
                retry_after_s=retry,
            )
        if chosen != targets[0]:
            self.fallbacks_used += 1
        breaker = self.breakers[chosen]
        outcome = False
        async with self.slots:
            self.in_flight += 1
            try:
                inner_model = None if chosen == self.default_model and request.model is None else chosen
                async for event in self.inner.stream(replace(request, model=inner_model)):
                    if isinstance(event, Finished):  # the consumer may stop reading here
                        breaker.success()
                        outcome = True
                    yield event
            except ProviderError as exc:
                self.errors[exc.kind] += 1
                if exc.retryable or exc.kind in (
                    "server",
                    "overloaded",
                    "rate_limit",
                    "timeout",
                    "connection",
                ):
                    breaker.failure()
                else:
                    breaker.success()  # the provider answered; the request was at fault
                outcome = True
                raise
            finally:
                self.in_flight -= 1
                if not outcome:
                    breaker.abandon()

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inFlight": self.in_flight,
            "maxConcurrency": self.max_concurrency,
            "errors": dict(self.errors),
            "fallbacksUsed": self.fallbacks_used,
            "circuits": {
                model: {"state": b.state, "failures": b.failures, "opens": b.opens}
                for model, b in self.breakers.items()
            },
        }

    def register_state(self, registry: StateRegistry) -> None:
        register = getattr(self.inner, "register_state", None)
        if register is not None:
            register(registry)
        registry.add("provider_breakers", self.breakers.__len__, ttl_s=None, max_size=self.max_breakers)

    async def aclose(self) -> None:
        await self.inner.aclose()
