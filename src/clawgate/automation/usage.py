"""Usage accounting: tokens per run, per agent, per model and per day, and what they cost.

The run service sums the provider's token counts into each run's record (`usage`:
`{input, output, total, costUsd?}`); at the run's end this ledger adds them to a daily
aggregate per (agent, model) in the store, kept `usage_retention_days`, and to the
`clawgate_tokens_total{model,kind}` counters. Cost comes from the `model_prices` table
(USD per million tokens); a model without a price has no cost, never a guessed one.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from clawgate.providers.pricing import cost_usd
from clawgate.settings import Settings
from clawgate.state.clock import Clock
from clawgate.store.base import log_write_failure
from clawgate.store.records import RunRecord
from clawgate.store.usage_store import UsageRow, UsageStore

log = structlog.get_logger("clawgate.usage")

# A run's model comes from its client (`model`): any string. A day keeps at most
# `usage_models_max` models by name; the runs of every later one are summed under this name.
OTHER_MODELS = "(other models)"


def day_of(ts: float) -> str:
    return _day_name(int(ts // 86_400))


@functools.lru_cache(maxsize=8)
def _day_name(day: int) -> str:
    # Every run end asks; the UTC day changes once a day, so the formatting is cached per day.
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d")


class UsageLedger:
    def __init__(self, settings: Settings, clock: Clock, store: UsageStore) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        # Prometheus counters keyed by (model, kind): a handful of models, fixed kinds.
        self.tokens: Counter[tuple[str, str]] = Counter()
        # The models the store holds for the current day (at most `usage_models_max`), read
        # back from the store at start and at the first run end of a day, so a restart does
        # not add more.
        self._day: str | None = None
        self._day_models: set[str] = set()

    def on_run_end(self, rec: RunRecord) -> Awaitable[None] | None:
        """The run service's end hook. The run's counts are queued into the store's next write
        before this returns, and not awaited: the write holds no run slot, and a read issued
        after the run's final answer still sees it (a failed write is logged). Only the first
        run end of a day returns an awaitable: it reads back the day's stored models first."""
        usage = rec.usage
        if not usage:
            return None
        model = str(usage.get("model") or rec.model or "unknown")
        if len(self.tokens) < 2 * self.settings.usage_models_max or (model, "input") in self.tokens:
            self.tokens[(model, "input")] += usage["input"]
            self.tokens[(model, "output")] += usage["output"]
        row = UsageRow(
            day=day_of(rec.ended_at or self.clock.time()),
            agent_id=rec.agent_id,
            model=model,
            input=int(usage["input"]),
            output=int(usage["output"]),
            runs=1,
        )
        if row.day != self._day:
            return self._first_of_day(row)
        self._queue(row)
        return None

    async def open(self) -> None:
        """Open the store and read back today's models: the day's first run end needs no read.
        A store that cannot answer now (Redis down at start) leaves that read to the first
        run end, as on a new day."""
        await self.store.open()
        try:
            await self._load_day(day_of(self.clock.time()))
        except Exception as exc:
            self._day = None
            log.warning("usage: could not read today's models at start", error=str(exc))

    async def _first_of_day(self, row: UsageRow) -> None:
        await self._load_day(row.day)
        self._queue(row)

    async def _load_day(self, day: str) -> None:
        self._day, self._day_models = day, set()
        stored = await self.store.rows(day, day)
        if self._day == day:
            self._day_models.update(r.model for r in stored if r.model != OTHER_MODELS)

    def _queue(self, row: UsageRow) -> None:
        row.model = self._bucket(row.model)
        asyncio.ensure_future(self.store.add(row)).add_done_callback(log_write_failure)

    def _bucket(self, model: str) -> str:
        """`model`, or OTHER_MODELS once the day holds `usage_models_max` other models."""
        models = self._day_models
        if model in models:
            return model
        if len(models) < self.settings.usage_models_max:
            models.add(model)
            return model
        return OTHER_MODELS

    async def sweep(self) -> int:
        cutoff = day_of(self.clock.time() - self.settings.usage_retention_days * 86400)
        return await self.store.sweep(before_day=cutoff)

    async def cost(self, days: int) -> dict[str, Any]:
        today = datetime.fromtimestamp(self.clock.time(), UTC).date()
        start = (today - timedelta(days=days - 1)).isoformat()
        rows = await self.store.rows(since_day=start, until_day=today.isoformat())
        prices = self.settings.model_prices
        daily: dict[str, dict[str, Any]] = {}
        by_model: dict[str, dict[str, Any]] = {}
        by_agent: dict[str, dict[str, Any]] = {}
        for r in rows:
            cost = cost_usd(r.model, r.input, r.output, prices)
            for bucket, key in ((daily, r.day), (by_model, r.model), (by_agent, r.agent_id)):
                acc = bucket.setdefault(key, _zero())
                _add(acc, r, cost)
        totals = _zero()
        for acc in daily.values():
            for name in ("input", "output", "totalTokens", "runs"):
                totals[name] += acc[name]
            totals["totalCost"] = _sum_cost(totals["totalCost"], acc["totalCost"])
        return {
            "updatedAt": int(time.time() * 1000),
            "startDate": start,
            "endDate": today.isoformat(),
            "days": days,
            "daily": [{"date": d, **daily[d]} for d in sorted(daily)],
            "byModel": [{"model": m, **by_model[m]} for m in sorted(by_model)],
            "byAgent": [{"agentId": a, **by_agent[a]} for a in sorted(by_agent)],
            "totals": {
                "totalInput": totals["input"],
                "totalOutput": totals["output"],
                "totalTokens": totals["totalTokens"],
                "totalCost": totals["totalCost"],
                "runs": totals["runs"],
            },
            "priced": sorted(prices),
        }


def _zero() -> dict[str, Any]:
    return {"input": 0, "output": 0, "totalTokens": 0, "runs": 0, "totalCost": None}


def _sum_cost(a: float | None, b: float | None) -> float | None:
    if a is None and b is None:
        return None
    return round((a or 0.0) + (b or 0.0), 8)


def _add(acc: dict[str, Any], r: UsageRow, cost: float | None) -> None:
    acc["input"] += r.input
    acc["output"] += r.output
    acc["totalTokens"] += r.input + r.output
    acc["runs"] += r.runs
    acc["totalCost"] = _sum_cost(acc["totalCost"], cost)
