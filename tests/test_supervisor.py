"""The task supervisor: strong references, failures counted by task name, loops restarted, a bounded close."""

from __future__ import annotations

import asyncio

from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from clawgate.state.supervisor import Supervisor
from conftest import GatewayFactory


async def _fail(message: str) -> None:
    await asyncio.sleep(0)
    raise RuntimeError(message)


async def test_a_spawned_task_is_held_until_it_ends_and_its_failure_is_counted() -> None:
    failed: list[str] = []
    sup = Supervisor(on_error=lambda name, exc: failed.append(f"{name}: {exc}"))
    release = asyncio.Event()

    async def waits() -> str:
        await release.wait()
        return "done"

    ok = sup.spawn(waits(), name="waiter")
    bad = sup.spawn(_fail("boom"), name="connection-close")
    assert len(sup) == 2
    await asyncio.gather(bad, return_exceptions=True)
    await asyncio.sleep(0)
    assert len(sup) == 1
    assert sup.errors == {"connection-close": 1}
    assert failed == ["connection-close: boom"]
    release.set()
    assert await ok == "done"
    await asyncio.sleep(0)
    assert len(sup) == 0
    assert sup.describe() == {"tasks": 0, "loops": [], "errors": {"connection-close": 1}}


async def test_a_loop_that_raises_runs_again_after_its_pause() -> None:
    clock = FakeClock()
    sup = Supervisor(sleep=clock.sleep)
    runs: list[int] = []
    finished = asyncio.Event()

    async def body() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise ValueError(f"attempt {len(runs)}")
        finished.set()

    sup.loop("sampler", body, retry_s=5)
    for _ in range(10):
        await asyncio.sleep(0)
    assert runs == [0]  # the pause is on the clock: nothing runs again before it passes
    assert sup.errors == {"sampler": 1}
    assert sup.describe()["loops"] == ["sampler"]
    for _ in range(2):
        clock.advance(5)
        for _ in range(10):
            await asyncio.sleep(0)
    await asyncio.wait_for(finished.wait(), 5)
    assert runs == [0, 1, 2]
    assert sup.errors == {"sampler": 2}
    await sup.stop_loop("sampler")
    assert sup.describe()["loops"] == []


async def test_aclose_cancels_everything_and_reports_stragglers() -> None:
    sup = Supervisor()
    stubborn_release = asyncio.Event()

    async def forever() -> None:
        await asyncio.Event().wait()

    async def stubborn() -> None:
        while not stubborn_release.is_set():
            try:
                await stubborn_release.wait()
            except asyncio.CancelledError:
                continue  # refuses to stop

    plain = sup.spawn(forever(), name="plain")
    sup.loop("ticks", forever, retry_s=1)
    sup.spawn(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    assert await sup.aclose(timeout_s=0.05) == ["stubborn"]
    assert plain.cancelled()
    assert sup.closed
    assert sup.errors == {}
    stubborn_release.set()
    await asyncio.wait_for(asyncio.gather(*sup.tasks), 5)


async def test_task_errors_show_in_status_and_metrics(start_gateway: GatewayFactory) -> None:
    rg: RunningGateway = await start_gateway()
    gw = rg.gateway
    errors_before = gw.internal_errors
    task = gw.supervisor.spawn(_fail("lost"), name="connection-close")
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert gw.internal_errors == errors_before + 1
    status = await gw.status()
    assert status["tasks"]["errors"] == {"connection-close": 1}
    assert "ticks" in status["tasks"]["loops"]
    text = gw.render_metrics().decode()
    assert 'clawgate_task_errors_total{task="connection-close"} 1.0' in text


async def test_an_idle_supervisor_is_still_the_one_handed_down(start_gateway: GatewayFactory) -> None:
    """A supervisor holding no task is not falsy: `tasks or Supervisor()` keeps the gateway's."""
    assert Supervisor()
    rg: RunningGateway = await start_gateway()
    gw = rg.gateway
    loops = set((await gw.status())["tasks"]["loops"])
    assert {
        "ticks",
        "clawgate-maintenance",
        "clawgate-webhooks",
        "clawgate-cron",
        "clawgate-disk-sampler",
        "clawgate-rss-sampler",
    } <= loops
