"""HTTP on the gateway's port: /healthz, /readyz (admission), /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from clawgate.client import Client, ClientError
from clawgate.server.serve import RunningGateway
from conftest import GatewayFactory, settle
from helpers import wait_until


async def scrape(rg: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of /metrics by (name, sorted labels)."""
    async with httpx.AsyncClient(base_url=rg.http_url) as http:
        res = await http.get("/metrics")
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(res.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def state(samples: dict[Any, float], structure: str) -> float:
    return samples[("clawgate_state_entries", (("structure", structure),))]


def runs_total(samples: dict[Any, float], status: str) -> float:
    return samples[("clawgate_runs_total", (("status", status),))]


async def test_healthz(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        res = await http.get("/healthz")
        assert res.status_code == 200
        body = res.json()
        assert body["ok"] is True
        assert isinstance(body["uptimeMs"], int)
        assert (await http.get("/nope")).status_code == 404
        assert (await http.post("/healthz")).status_code == 405


async def test_readyz_ok_when_admission_is_open(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        res = await http.get("/readyz")
    assert res.status_code == 200
    assert res.json() == {"ready": True, "reason": "ok"}


async def test_readyz_503_while_admission_is_closed(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_tracked_runs=1)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c, httpx.AsyncClient(base_url=rg.http_url) as http:
        assert (await http.get("/readyz")).status_code == 200
        accepted: list[dict[str, Any]] = []
        stalled = asyncio.create_task(
            c.run_agent("[[stall]]", idempotency_key="held-open", on_accepted=accepted.append)
        )
        # The run may start before its `accepted` answer reaches this client: wait for both.
        await wait_until(lambda: gw.runs.running == 1 and bool(accepted))
        assert accepted[0]["status"] == "accepted"

        res = await http.get("/readyz")
        assert res.status_code == 503
        assert res.json() == {"ready": False, "reason": "tracking 1 runs (maxTrackedRuns 1)"}
        # New runs are refused, retryably, instead of tracked.
        try:
            await c.run_agent("one more", idempotency_key="refused")
            raise AssertionError("admission let a run in")
        except ClientError as exc:
            assert exc.code == "UNAVAILABLE"
            assert exc.retryable is True
            assert exc.retry_after_ms == 1000
        samples = await scrape(rg)
        assert samples[("clawgate_admission_open", ())] == 0
        assert state(samples, "runs_active") == 1
        assert samples[("clawgate_runs_active", ())] == 1

        assert (await c.abort("held-open")) == {"runId": "held-open", "aborted": True}
        final = await asyncio.wait_for(stalled, 10)
        assert final["status"] == "aborted"
        await settle(gw)
        res = await http.get("/readyz")
        assert res.status_code == 200
        status = await c.status()
        assert status["admission"] == {"open": True, "reason": None, "refused": 1}


async def test_readyz_503_over_memory_budget(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(memory_budget_bytes=1024)
    async with httpx.AsyncClient(base_url=rg.http_url) as http:
        res = await http.get("/readyz")
    assert res.status_code == 503
    assert res.json()["reason"].startswith("RSS ")
    assert res.json()["reason"].endswith("over memoryBudgetBytes 1024")
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        try:
            await c.call("sessions.spawn", {"sessionKey": "agent:main:main", "task": "t"})
            raise AssertionError("spawn admitted over the memory budget")
        except ClientError as exc:
            assert exc.code == "UNAVAILABLE"
            assert exc.retryable
        # Reads are never refused.
        assert (await c.call("health"))["ok"] is True


async def test_metrics_exports_state_runs_and_connections(gateway: RunningGateway, client: Client) -> None:
    gw = gateway.gateway
    before = await scrape(gateway)
    for name in gw.registry.sizes():
        # Nonzero at start: this test's own connection, and one circuit breaker per configured model.
        assert state(before, name) == 0 or name in ("connections", "event_sinks", "provider_breakers")
    assert state(before, "runs_active") == 0
    assert state(before, "connections") == 1
    assert runs_total(before, "ok") == 0
    assert before[("clawgate_connections", ())] == 1
    assert before[("clawgate_admission_open", ())] == 1
    assert before[("clawgate_process_rss_bytes", ())] > 0

    for i in range(3):
        assert (await client.run_agent(f"m{i}", idempotency_key=f"metrics-{i}"))["status"] == "ok"
    err = await client.run_agent("[[error:provider down]]", idempotency_key="metrics-err")
    assert err["status"] == "error"
    await settle(gw)

    after = await scrape(gateway)
    assert runs_total(after, "ok") == 3
    assert runs_total(after, "error") == 1
    assert runs_total(after, "timeout") == 0
    assert state(after, "run_results") == 4
    assert state(after, "runs_active") == 0
    assert after[("clawgate_run_duration_seconds_count", ())] == 4
    assert after[("clawgate_run_duration_seconds_bucket", (("le", "+Inf"),))] == 4
    assert after[("clawgate_runs_queued", ())] == 0


async def test_metrics_count_sweep_errors(gateway: RunningGateway) -> None:
    gw = gateway.gateway
    gw.registry.add_sweep("always_fails", lambda: 1 / 0)
    ticks = gw.maintenance.ticks
    await gw.maintenance.run_once()
    await gw.maintenance.run_once()
    samples = await scrape(gateway)
    assert samples[("clawgate_sweep_errors_total", (("sweep", "always_fails"),))] == 2
    assert samples[("clawgate_maintenance_ticks_total", ())] == ticks + 2
    # The other sweeps were not counted as failing.
    failing = {labels for (name, labels) in samples if name == "clawgate_sweep_errors_total"}
    assert failing == {(("sweep", "always_fails"),)}
