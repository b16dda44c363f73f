"""Bounded by construction (docs/design.md, bounded by construction): audits, admission control, a CI-sized soak.

These are the regression tests for the reference gateway's OOM: every structure
keyed by a run, session, connection or request must be registered, and must be
back at its baseline once the TTLs pass, whatever the workload did.
"""

from __future__ import annotations

import asyncio
import gc
from collections import OrderedDict, deque
from typing import Any

import httpx
import psutil
import pytest

from clawgate.client import Client, ClientError
from clawgate.server.gateway import Gateway
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from clawgate.state.ttlmap import TTLMap
from conftest import GatewayFactory, settle
from helpers import advance_until, provider_sleeping, wait_until

CONTAINERS = (dict, set, list, deque, OrderedDict)

# Containers on core objects that are not keyed by run/session/connection/request:
# configuration, hook lists and counters whose size is fixed by the code, not the workload.
NOT_ID_KEYED = {
    ("Gateway", "methods"),
    ("Gateway", "stop_errors"),  # at most one per stop step, fixed by the code
    ("RunService", "tools"),
    ("RunService", "providers"),  # one per provider kind the agent profiles name
    ("RunService", "_allowed_tools"),  # one per configured agent profile
    ("McpManager", "servers"),  # one per configured MCP server
    ("RunService", "start_hooks"),
    ("RunService", "end_hooks"),
    ("RunService", "totals"),
    ("RunService", "provider_retries"),
    ("EventBus", "listeners"),
    ("SubagentService", "hooks"),
    ("Maintenance", "errors"),
    ("Maintenance", "last_removed"),
    ("StateRegistry", "_items"),
    ("StateRegistry", "_sweeps"),
    ("LatencyHistogram", "counts"),
}


def core_objects(gw: Gateway) -> list[Any]:
    return [
        gw,
        gw.runs,
        gw.runs.lanes,
        gw.bus,
        gw.sessions,
        gw.subagents,
        gw.maintenance,
        gw.admission,
        gw.registry,
        gw.runs.latency,
        gw.mcp,
    ]


def registered_containers(gw: Gateway) -> set[int]:
    """Identities of containers registered via `registry.add(name, container.__len__, ...)`."""
    ids: set[int] = set()
    for item in gw.registry.describe():
        owner = getattr(item.size, "__self__", None)
        if owner is not None:
            ids.add(id(owner))
    return ids


def unregistered_containers(gw: Gateway) -> list[str]:
    registered = registered_containers(gw)
    names = {r.name for r in gw.registry.describe()}
    problems: list[str] = []
    for obj in core_objects(gw):
        cls = type(obj).__name__
        for attr, value in vars(obj).items():
            if isinstance(value, TTLMap):
                if value.name not in names:
                    problems.append(f"{cls}.{attr}: TTLMap {value.name!r} not registered")
            elif (
                isinstance(value, CONTAINERS)
                and (cls, attr) not in NOT_ID_KEYED
                and id(value) not in registered
            ):
                problems.append(f"{cls}.{attr}: {type(value).__name__} not registered")
    return problems


def container_sizes(gw: Gateway) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for obj in core_objects(gw):
        for attr, value in vars(obj).items():
            if isinstance(value, (TTLMap, *CONTAINERS)) and (type(obj).__name__, attr) not in NOT_ID_KEYED:
                sizes[f"{type(obj).__name__}.{attr}"] = len(value)
    return sizes


async def test_every_core_container_is_registered(gateway: RunningGateway) -> None:
    assert unregistered_containers(gateway.gateway) == []


async def test_an_unregistered_id_keyed_dict_is_caught(gateway: RunningGateway) -> None:
    # The audit must catch a regression such as the reference's `seqByRun = new Map()`.
    gateway.gateway.runs.seq_by_run = {}  # type: ignore[attr-defined]
    assert unregistered_containers(gateway.gateway) == ["RunService.seq_by_run: dict not registered"]


async def _mixed_workload(rg: RunningGateway, clock: FakeClock) -> None:
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        await c.subscribe(["agent:main:mix0"], all_sessions=False)
        finals = [c.run_agent(f"plain {i}", session_key=f"agent:main:mix{i % 7}") for i in range(60)]
        finals.append(c.run_agent("[[error:provider down]]", session_key="agent:main:err"))
        finals.append(c.run_agent("[[error-once:flaky]] recovers", session_key="agent:main:flaky"))
        results = await asyncio.gather(*finals)
        assert sum(r["status"] == "ok" for r in results) == 61
        spawns = []
        for i in range(20):
            spawns.append(
                c.spawn(
                    f"agent:main:req{i % 4}",
                    f"child {i}",
                    mode="session" if i % 2 else "run",
                    cleanup="keep" if i % 3 else "delete",
                )
            )
        for res in await asyncio.gather(*spawns):
            assert res["status"] == "accepted"
        spawn_err = await c.spawn("agent:main:req9", "child fails [[error:nope]]", mode="session")
        # an aborted run and a timed-out run
        stalled = await c.call(
            "chat.send",
            {"sessionKey": "agent:main:stall", "message": "[[stall]]", "idempotencyKey": "stall-1"},
        )
        await asyncio.sleep(0.01)
        assert (await c.abort(stalled["runId"]))["aborted"] is True
        timed = asyncio.ensure_future(c.run_agent("[[stall]]", session_key="agent:main:slow", timeout=5))
        # The run's timeout timer is armed when it starts running: an advance before that would
        # be lost on it.
        await wait_until(
            lambda: any(
                r.record.session_key == "agent:main:slow" and r.record.status == "running"
                for r in gw.runs.active.values()
            ),
            "the timed run to start",
        )
        await clock.advance_async(5.0)
        assert (await timed)["status"] == "timeout"
        # the child that errored is held 15 s as a pending lifecycle error, then finalized
        await settle(gw)
        await clock.advance_async(gw.settings.lifecycle_error_grace_s + 1)
        await settle(gw)
        assert (await c.wait(spawn_err["runId"], 0))["status"] == "error"
    # a client that disconnects in the middle of its runs
    dropper = Client(rg.url, max_reconnect_attempts=0)
    await dropper.connect()
    pending = [
        asyncio.ensure_future(dropper.run_agent("[[delay:1]] bye", session_key=f"agent:main:drop{i}"))
        for i in range(5)
    ]
    await asyncio.sleep(0.05)
    await dropper.close()
    for p in pending:
        with pytest.raises(ClientError):
            await p
    # Five sessions, four main lanes: two rounds of the scripted one-second delay. Each delay
    # starts behind its run's history read (an advance before it would be lost on it), and how
    # many runs the gateway accepted before the close is not known: once the connection is gone,
    # move the clock until every run it left has ended.
    await wait_until(lambda: not gw.connections, "the dropped connection to be torn down")
    await advance_until(
        clock,
        lambda: len(gw.runs.active) == 0 and gw.runs.running == 0 and gw.runs.queued == 0,
        "the dropped client's runs to end",
    )
    await settle(gw)


async def test_mixed_workload_returns_every_structure_to_baseline(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway()
    gw = rg.gateway
    baseline_state = gw.registry.sizes()
    baseline_containers = container_sizes(gw)
    await _mixed_workload(rg, clock)
    # Past every TTL of docs/design.md, record lives (archive 60 min is the longest), sweeping as we go.
    for _ in range(4):
        await clock.advance_async(gw.settings.subagent_archive_after_s / 2 + 1)
        await gw.maintenance.run_once()
        await settle(gw)
    await clock.advance_async(gw.settings.run_context_idle_ttl_s + 1)
    await gw.maintenance.run_once()
    after_state = gw.registry.sizes()
    grown = {k: (baseline_state.get(k, 0), v) for k, v in after_state.items() if v > baseline_state.get(k, 0)}
    # LRU caches bounded by size, not per-run state: the session metadata cache and the fake
    # LLM's memory of which runs already failed once (for `[[error-once]]`).
    lru_caches = {"session_cache", "scripted_attempts"}
    assert {k: v for k, v in grown.items() if k not in lru_caches} == {}, grown
    after_containers = container_sizes(gw)
    grown_c = {
        k: v
        for k, v in after_containers.items()
        if v > baseline_containers.get(k, 0) and k != "SessionService.cache"
    }
    assert grown_c == {}
    assert await gw.store.count_subagents() == 0
    assert gw.maintenance.errors == {}
    assert unregistered_containers(gw) == []


async def test_admission_refuses_when_tracked_runs_exceed_the_limit(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_tracked_runs=3)
    async with Client(rg.url, max_reconnect_attempts=0) as c, httpx.AsyncClient() as http:
        held = [
            await c.call(
                "chat.send",
                {"sessionKey": f"agent:main:h{i}", "message": "[[delay:10]]", "idempotencyKey": f"h{i}"},
            )
            for i in range(3)
        ]
        with pytest.raises(ClientError) as refused:
            await c.run_agent("one too many", idempotency_key="over")
        assert refused.value.code == "UNAVAILABLE"
        assert refused.value.retryable is True
        assert refused.value.retry_after_ms and refused.value.retry_after_ms > 0
        with pytest.raises(ClientError) as spawn_refused:
            await c.spawn("agent:main:main", "child")
        assert spawn_refused.value.code == "UNAVAILABLE"
        assert (await http.get(f"{rg.http_url}/readyz")).status_code == 503
        # Each held run's delay starts behind its history read: advance once all three sleep.
        await provider_sleeping(clock, 10, n=3, what="the held runs' delays")
        await clock.advance_async(10.0)
        for h in held:
            assert (await c.wait(h["runId"], 1000))["status"] == "ok"
        await settle(rg.gateway)
        assert (await http.get(f"{rg.http_url}/readyz")).status_code == 200
        assert (await c.run_agent("accepted again"))["status"] == "ok"


async def test_admission_refuses_over_the_memory_budget(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(memory_budget_bytes=1)  # any real process is over one byte
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        with pytest.raises(ClientError) as refused:
            await c.run_agent("refused")
        assert refused.value.code == "UNAVAILABLE" and refused.value.retryable
        assert "memoryBudgetBytes" in refused.value.message
        rg.gateway.admission.memory_budget_bytes = 1 << 40  # pressure gone
        assert (await c.run_agent("accepted"))["status"] == "ok"


@pytest.mark.slow
async def test_ci_soak_20k_session_spawns_memory_flat(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    """A CI-sized soak: 20,000 session-mode spawns; entries back to baseline; RSS growth bounded."""
    rg = await start_gateway(
        max_children_per_agent=10_000,
        subagent_concurrency=64,
        max_tracked_runs=100_000,
        rate_limit_burst=1_000_000,
        default_run_timeout_s=86_400,
    )
    gw = rg.gateway
    proc = psutil.Process()
    baseline = gw.registry.sizes()
    total, conc = 20_000, 128
    rss_at_10pct = 0
    done = 0

    async with Client(rg.url, max_reconnect_attempts=0) as c:
        counter = iter(range(total))

        async def worker() -> None:
            nonlocal done, rss_at_10pct
            for i in counter:
                res = await c.spawn(f"agent:main:soak{i % 200}", f"t{i} [[reply:r{i}]]", mode="session")
                assert (await c.wait(res["runId"], 3_600_000))["status"] == "ok"
                done += 1
                if done == total // 10:
                    gc.collect()
                    rss_at_10pct = proc.memory_info().rss
                if done % 2000 == 0:
                    # keep TTLs flowing during the batch, as the maintenance tick would
                    await clock.advance_async(gw.settings.subagent_session_ttl_s + 1)
                    await gw.maintenance.run_once()

        await asyncio.gather(*(worker() for _ in range(conc)))
    await settle(gw)
    gc.collect()
    rss_end = proc.memory_info().rss
    await clock.advance_async(gw.settings.subagent_session_ttl_s + gw.settings.run_result_ttl_s + 1)
    await gw.maintenance.run_once()
    after = gw.registry.sizes()
    leftover = {k: v for k, v in after.items() if v > baseline.get(k, 0) and k not in ("session_cache",)}
    assert leftover == {}
    assert await gw.store.count_subagents() == 0
    growth_mb = (rss_end - rss_at_10pct) / 1e6
    # Generous: the test process also holds the client, pytest and SQLite's page cache.
    print(f"soak RSS growth 10% -> end: {growth_mb:.1f} MB")
    assert growth_mb < 25, f"RSS grew {growth_mb:.1f} MB between 10% and the end"
