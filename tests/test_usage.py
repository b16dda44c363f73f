"""Usage accounting: per-run usage with cost, daily aggregates per agent and model, usage.status
and usage.cost, /metrics, retention, the batch summary, and the same aggregates on Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from clawgate.automation.usage import OTHER_MODELS
from clawgate.batch import BatchOptions, run_batch
from clawgate.client import Client
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle, unique_prefix

PRICES = {"scripted": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}}


def expected_cost(usage: dict[str, Any]) -> float:
    return round((usage["input"] * 1.0 + usage["output"] * 4.0) / 1e6, 8)


async def run_some(c: Client, n: int, agent: str = "main") -> list[dict[str, Any]]:
    finals = []
    for i in range(n):
        finals.append(
            await c.run_agent(
                f"[[reply:{'x' * (10 * (i + 1))}]]",
                session_key=f"agent:{agent}:u{i}",
                idempotency_key=f"{agent}-u{i}",
            )
        )
    return finals


async def test_runs_carry_usage_and_cost_and_usage_cost_adds_them_up(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(model_prices=PRICES)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        finals = await run_some(c, 3) + await run_some(c, 2, agent="helper")
        usages = [f["result"]["meta"]["usage"] for f in finals]
        for u in usages:
            assert u["model"] == "scripted" and u["total"] == u["input"] + u["output"]
            assert u["costUsd"] == expected_cost(u)
        await settle(gw.gateway)
        waited = await c.call("agent.wait", {"runId": "main-u0", "timeoutMs": 0})
        assert waited["usage"] == usages[0]
        cost = await c.call("usage.cost", {"days": 7})
        totals = cost["totals"]
        assert totals["totalInput"] == sum(u["input"] for u in usages)
        assert totals["totalOutput"] == sum(u["output"] for u in usages)
        assert totals["runs"] == 5
        assert totals["totalCost"] == pytest.approx(sum(u["costUsd"] for u in usages))
        assert {a["agentId"]: a["runs"] for a in cost["byAgent"]} == {"helper": 2, "main": 3}
        assert [m["model"] for m in cost["byModel"]] == ["scripted"]
        assert len(cost["daily"]) == 1
        status = await c.call("usage.status")
        assert status["today"]["runs"] == 5
    metrics = gw.gateway.render_metrics().decode()
    total_in = sum(u["input"] for u in usages)
    assert f'clawgate_tokens_total{{kind="input",model="scripted"}} {float(total_in)}' in metrics


async def test_no_price_means_no_cost_and_retention_sweeps_old_days(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    gw = await start_gateway(usage_retention_days=2)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        (final,) = await run_some(c, 1)
        assert "costUsd" not in final["result"]["meta"]["usage"]
        await settle(gw.gateway)
        assert (await c.call("usage.cost", {"days": 2}))["totals"]["totalCost"] is None
        assert (await c.call("usage.cost", {"days": 2}))["totals"]["runs"] == 1
        clock.advance(3 * 86400)
        await gw.gateway.maintenance.run_once()
        assert (await c.call("usage.cost", {"days": 2}))["totals"]["runs"] == 0
        assert await gw.gateway.usage.store.rows("1970-01-01", "2999-12-31") == []


async def test_a_day_keeps_at_most_usage_models_max_models_and_sums_the_rest(
    start_gateway: GatewayFactory,
) -> None:
    """The model of a run's usage comes from the client (`model`): any string. A day's
    aggregates keep the first `usage_models_max` models by name and sum every later one into
    OTHER_MODELS, so a client cannot add a row on disk per run."""
    gw = await start_gateway(usage_models_max=2)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        for i in range(5):
            await c.run_agent("[[reply:ok]]", session_key=f"agent:main:m{i}", model=f"model-{i}")
        await c.run_agent("[[reply:ok]]", session_key="agent:main:again", model="model-0")
        await settle(gw.gateway)
        cost = await c.call("usage.cost", {"days": 1})
    assert {m["model"]: m["runs"] for m in cost["byModel"]} == {"model-0": 2, "model-1": 1, OTHER_MODELS: 3}
    assert cost["totals"]["runs"] == 6
    rows = await gw.gateway.usage.store.rows("1970-01-01", "2999-12-31")
    assert sorted(r.model for r in rows) == sorted(["model-0", "model-1", OTHER_MODELS])


async def test_batch_results_and_summary_carry_tokens_and_cost(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(model_prices=PRICES)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "message": f"task {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    summary = await run_batch(
        tasks, url=gw.url, out_path=out, options=BatchOptions(progress=False), console=Console(quiet=True)
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(line["usage"]["total"] > 0 for line in lines)
    assert summary.tokens == sum(line["usage"]["total"] for line in lines)
    assert summary.cost_usd == pytest.approx(sum(line["usage"]["costUsd"] for line in lines))


@pytest.mark.redis
async def test_usage_aggregates_on_redis(start_gateway: GatewayFactory, redis_url: str) -> None:
    gw = await start_gateway(store=redis_url, redis_prefix=unique_prefix(), model_prices=PRICES)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        finals = await run_some(c, 3)
        await settle(gw.gateway)
        cost = await c.call("usage.cost", {"days": 1})
    usages = [f["result"]["meta"]["usage"] for f in finals]
    assert cost["totals"]["totalTokens"] == sum(u["total"] for u in usages)
    assert cost["totals"]["runs"] == 3
    client = gw.gateway.usage.store.store.client  # type: ignore[attr-defined]
    keys = [k async for k in client.scan_iter(match=f"{gw.gateway.settings.redis_prefix}:usage:*")]
    assert keys
    for key in keys:
        assert await client.ttl(key) > 0
