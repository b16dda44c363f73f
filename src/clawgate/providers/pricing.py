"""What tokens cost: the `model_prices` table (USD per million tokens) applied to a run's usage.
A model without a price has no cost, never a guessed one."""

from __future__ import annotations

from typing import Any

from clawgate.settings import ModelPrice


def cost_usd(model: str, tokens_in: int, tokens_out: int, prices: dict[str, ModelPrice]) -> float | None:
    price = prices.get(model)
    if price is None:
        return None
    return round((tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1e6, 8)


def with_cost(
    usage: dict[str, Any] | None, model: str, prices: dict[str, ModelPrice]
) -> dict[str, Any] | None:
    if usage is None:
        return None
    cost = cost_usd(model, usage["input"], usage["output"], prices)
    return {**usage, "model": model} | ({"costUsd": cost} if cost is not None else {})
