"""Provider faults: backoff honouring Retry-After, the circuit breaker, fallback models, the
per-provider concurrency limit and a stream that stops halfway. The scripted provider simulates
each fault; the OpenAI provider meets them from a local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clawgate.client import Client
from clawgate.providers.backoff import backoff_delay
from clawgate.providers.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from clawgate.runs.service import PARTIAL_MARK
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle
from helpers import wait_until
from openai_stub import StubBehaviour, run_stub


# -- pure parts ----------------------------------------------------------------------------------
def test_backoff_is_jittered_exponential_capped_and_never_below_retry_after() -> None:
    assert backoff_delay(1, base_s=1, max_delay_s=30, rand=lambda: 1.0) == 1
    assert backoff_delay(3, base_s=1, max_delay_s=30, rand=lambda: 1.0) == 4
    assert backoff_delay(3, base_s=1, max_delay_s=30, rand=lambda: 0.5) == 2
    assert backoff_delay(10, base_s=1, max_delay_s=30, rand=lambda: 1.0) == 30
    assert backoff_delay(1, base_s=1, max_delay_s=30, retry_after_s=7, rand=lambda: 0.1) == 7
    assert backoff_delay(1, base_s=1, max_delay_s=30, retry_after_s=600, rand=lambda: 0.1) == 30
    assert backoff_delay(2, base_s=0, max_delay_s=30, rand=lambda: 1.0) == 0


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = FakeClock()
    b = CircuitBreaker(clock, failure_threshold=3, cooldown_s=10)
    for _ in range(2):
        assert b.allow()
        b.failure()
    b.success()  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == OPEN and not b.allow() and b.opens == 1
    assert b.retry_in_s() == 10
    clock.advance(10)
    assert b.state == HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    b.failure()
    assert b.state == OPEN and b.opens == 2
    clock.advance(10)
    assert b.allow()
    b.abandon()  # a cancelled probe lets the next one through
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()


# -- scripted provider through a live gateway -----------------------------------------------------
async def advance_until_done(
    clock: FakeClock, client: Client, run_id: str, step: float = 0.5
) -> dict[str, Any]:
    # At most 400 steps of the fake clock; the run's end write is real time (the store's thread),
    # so after them keep polling, without moving the clock, for up to 20 s in all.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    steps = 0
    while True:
        res = await client.call("agent.wait", {"runId": run_id, "timeoutMs": 0})
        if "endedAt" in res:
            return res
        if steps < 400:
            await clock.advance_async(step)
            steps += 1
        elif loop.time() > deadline:
            raise AssertionError(f"run {run_id} did not end")
        await asyncio.sleep(0.001)


async def test_rate_limit_is_retried_with_backoff_honouring_retry_after(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    gw = await start_gateway(provider_retry_base_s=0.5, provider_max_retries=4)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        events: list[dict[str, Any]] = []
        c.on_event = events.append
        await c.call(
            "agent",
            {"message": "[[fail:2:429]] [[retry-after:3]] [[reply:made it]]", "idempotencyKey": "rl-1"},
            timeout=5,
        )
        await wait_until(lambda: gw.gateway.runs.provider_retries["rate_limit"] == 1, "first retry")
        # Retry-After is a floor: 2.9 s later the run is still waiting.
        await clock.advance_async(2.9)
        await asyncio.sleep(0.05)
        assert gw.gateway.runs.provider_retries["rate_limit"] == 1
        res = await advance_until_done(clock, c, "rl-1")
        assert res["status"] == "ok"
        assert gw.gateway.runs.provider_retries["rate_limit"] == 2
        status = await c.call("status")
        assert status["provider"]["retries"] == {"rate_limit": 2}
        assert status["provider"]["errors"] == {"rate_limit": 2}
        lifecycle = [
            e["payload"]["data"]
            for e in events
            if e.get("event") == "agent" and e["payload"]["stream"] == "lifecycle"
        ]
        assert [d.get("willRetry", False) for d in lifecycle if d["phase"] == "error"] == [True, True]


async def test_retries_stop_at_the_limit_and_the_run_ends_as_error(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    gw = await start_gateway(provider_retry_base_s=0.5, provider_max_retries=2, provider_breaker_failures=50)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        await c.call("agent", {"message": "[[fail:10:529]]", "idempotencyKey": "ov-1"}, timeout=5)
        res = await advance_until_done(clock, c, "ov-1")
        assert res["status"] == "error" and "529" in res["error"]
        assert gw.gateway.runs.provider_retries["overloaded"] == 2


async def test_circuit_opens_then_fallback_model_serves_and_probe_closes_it(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    gw = await start_gateway(
        fallback_models=["backup"],
        provider_breaker_failures=2,
        provider_breaker_cooldown_s=30,
        provider_max_retries=3,
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("[[fail-model:scripted]] [[reply:from backup]]", idempotency_key="fb-1")
        assert final["status"] == "ok" and final["result"]["payloads"][0]["text"] == "from backup"
        stats = (await c.call("status"))["provider"]
        assert stats["circuits"]["scripted"]["state"] == "open"
        assert stats["circuits"]["backup"]["state"] == "closed"
        assert stats["fallbacksUsed"] == 1
        # While the primary's circuit is open, turns go straight to the fallback: no retry.
        retries = dict(gw.gateway.runs.provider_retries)
        final = await c.run_agent("[[reply:second]]", idempotency_key="fb-2")
        assert final["result"]["payloads"][0]["text"] == "second"
        assert dict(gw.gateway.runs.provider_retries) == retries
        # After the cooldown one probe goes to the primary; it succeeds and closes the circuit.
        clock.advance(30)
        final = await c.run_agent("[[reply:primary again]]", idempotency_key="fb-3")
        assert final["status"] == "ok"
        assert (await c.call("status"))["provider"]["circuits"]["scripted"]["state"] == "closed"
        metrics = gw.gateway.render_metrics().decode()
        assert 'clawgate_provider_errors_total{kind="overloaded",provider="scripted"} 2.0' in metrics
        assert 'clawgate_provider_circuit_open{model="scripted",provider="scripted"} 0.0' in metrics


async def test_all_circuits_open_fails_fast_naming_the_provider(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(
        provider_breaker_failures=1, provider_breaker_cooldown_s=60, provider_max_retries=5
    )
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        first = await c.run_agent("[[fail-model:scripted]]", idempotency_key="cb-1")
        assert first["status"] == "error"
        assert "circuit open" in first["error"] and "scripted" in first["error"]
        # Failing fast: one provider call opened the circuit, the retries never reached it.
        assert gw.gateway.runs.provider_retries["overloaded"] == 1
        second = await c.run_agent("[[reply:would work]]", idempotency_key="cb-2")
        assert second["status"] == "error" and "circuit open" in second["error"]


async def test_a_stream_cut_halfway_ends_as_error_with_the_partial_text_marked(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway()
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent(
            "[[reply:aaaa bbbb cccc dddd]] [[chunks:4]] [[cut:2]]",
            session_key="agent:main:cut",
            idempotency_key="cut-1",
        )
        assert final["status"] == "error"
        assert "stopped halfway" in final["error"]
        assert final["result"]["payloads"][0]["text"] == "aaaa bbbb "
        history = (await c.call("chat.history", {"sessionKey": "agent:main:cut"}))["messages"]
        assert history[-1]["role"] == "assistant"
        assert history[-1]["content"] == "aaaa bbbb " + PARTIAL_MARK
        assert not gw.gateway.runs.provider_retries  # output was out: no retry


async def test_concurrency_limit_per_provider(start_gateway: GatewayFactory, clock: FakeClock) -> None:
    gw = await start_gateway(provider_max_concurrency=1, main_concurrency=4)
    provider: Any = gw.gateway.provider
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        due = clock.time() + 5
        for i in range(3):
            await c.call(
                "agent",
                {
                    "message": "[[delay:5]] [[reply:x]]",
                    "idempotencyKey": f"cc-{i}",
                    "sessionKey": f"agent:main:cc{i}",
                },
            )
        await wait_until(lambda: gw.gateway.runs.running == 3, "3 runs running")
        # A run reaches the provider behind its history read (a store round trip), after it is
        # counted as running: wait until one is in the provider (asleep) and the other two wait
        # for its slot.
        await wait_until(
            lambda: clock.sleeping_until(due) >= 1 and len(provider.slots._waiters or ()) == 2,
            "one run in the provider and two waiting for its slot",
        )
        assert provider.in_flight == 1
        assert clock.sleeping_until(due) == 1
        for i in range(3):
            assert (await advance_until_done(clock, c, f"cc-{i}", step=1))["status"] == "ok"
        assert provider.in_flight == 0


# -- the OpenAI provider against a local server that produces the faults --------------------------
@pytest.fixture
async def stub_gw(start_gateway: GatewayFactory) -> Any:
    behaviour = StubBehaviour()
    async with run_stub(behaviour) as base_url:
        rg = await start_gateway(
            provider="openai",
            openai_base_url=base_url,
            openai_model="stub-model",
            shutdown_grace_s=0,
            provider_retry_base_s=0.2,
        )
        yield rg, behaviour
        await rg.stop()


async def test_openai_429_and_529_are_retried_honouring_retry_after(stub_gw: Any, clock: FakeClock) -> None:
    rg, behaviour = stub_gw
    gw: RunningGateway = rg
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        for status, kind in ((429, "rate_limit"), (529, "overloaded")):
            behaviour.failed = 0
            run_id = f"oa-{status}"
            await c.call("agent", {"message": f"flaky-{status} hi", "idempotencyKey": run_id}, timeout=5)
            await wait_until(lambda k=kind: gw.gateway.runs.provider_retries[k] >= 1, f"a {status} retry")
            res = await advance_until_done(clock, c, run_id, step=0.5)
            assert res["status"] == "ok"
            assert gw.gateway.runs.provider_retries[kind] == 2
        assert behaviour.failed == 2


async def test_openai_stream_dropped_halfway_keeps_the_partial_text(stub_gw: Any) -> None:
    rg, _behaviour = stub_gw
    gw: RunningGateway = rg
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("drop-mid now", session_key="agent:main:drop", idempotency_key="drop-1")
        assert final["status"] == "error" and "stopped halfway" in final["error"]
        assert final["result"]["payloads"][0]["text"] == "partial answer"
        history = (await c.call("chat.history", {"sessionKey": "agent:main:drop"}))["messages"]
        assert history[-1]["content"] == "partial answer" + PARTIAL_MARK
    await settle(gw.gateway)
