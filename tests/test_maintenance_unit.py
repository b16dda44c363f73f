"""The maintenance scheduler's own rules, without a gateway: stop while a sweep runs, logs, counts.

A failed sweep is logged with its name (and so is a failing error callback); stopping the
scheduler while an async sweep is in flight cancels that sweep and returns only once the
loop has ended; a sweep's count is its int result, anything else counts 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from clawgate.state import maintenance as maintenance_module
from clawgate.state.clock import FakeClock
from clawgate.state.maintenance import Maintenance
from clawgate.state.registry import StateRegistry
from clawgate.state.ttlmap import TTLMap


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The scheduler's log events. A fresh logger proxy: the module's may be cached by an earlier test."""
    with capture_logs() as captured:
        monkeypatch.setattr(maintenance_module, "log", structlog.get_logger("clawgate.maintenance"))
        yield captured


async def test_a_failed_sweep_is_logged_with_its_name(clock: FakeClock, logs: list[dict[str, Any]]) -> None:
    reg = StateRegistry()
    reg.add_sweep("fine", lambda: 1)
    reg.add_sweep("broken_archive", lambda: 1 / 0)
    maint = Maintenance(reg, clock, 60)  # no error callback: still counted and logged
    assert await maint.run_once() == {"fine": 1}
    failures = [e for e in logs if e["event"] == "sweep failed"]
    assert len(failures) == 1
    assert failures[0]["sweep"] == "broken_archive"
    assert failures[0]["log_level"] == "error"
    assert failures[0]["exc_info"] is True
    assert maint.errors == {"broken_archive": 1}


async def test_a_failing_error_callback_is_logged_with_the_sweep_name(
    clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    reg = StateRegistry()
    called: list[str] = []

    def callback(name: str) -> None:
        called.append(name)
        raise RuntimeError("metrics down")

    reg.add_sweep("boom", lambda: 1 / 0)
    reg.add_sweep("after", lambda: 4)
    maint = Maintenance(reg, clock, 60, on_sweep_error=callback)
    assert await maint.run_once() == {"after": 4}
    assert called == ["boom"]
    events = [(e["event"], e.get("sweep")) for e in logs]
    assert events == [("sweep failed", "boom"), ("sweep error callback failed", "boom")]
    assert maint.errors == {"boom": 1}


async def test_counts_are_int_results_only(clock: FakeClock) -> None:
    reg = StateRegistry()
    reg.add_sweep("int", lambda: 3)
    reg.add_sweep("zero", lambda: 0)
    reg.add_sweep("bool", lambda: True)  # an int too
    reg.add_sweep("float", lambda: 2.5)
    reg.add_sweep("text", lambda: "7")
    maint = Maintenance(reg, clock, 60)
    assert await maint.run_once() == {"int": 3, "zero": 0, "bool": 1, "float": 0, "text": 0}


async def test_stop_while_an_async_sweep_runs_cancels_it_and_waits_for_the_loop(clock: FakeClock) -> None:
    reg = StateRegistry()
    entered = asyncio.Event()
    cancelled: list[str] = []
    ran_after: list[str] = []

    async def slow_sweep() -> int:
        entered.set()
        try:
            await asyncio.Event().wait()  # never set: only a cancellation ends it
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise
        return 1

    reg.add_sweep("slow", slow_sweep)
    reg.add_sweep("after", lambda: ran_after.append("after") or 0)
    maint = Maintenance(reg, clock, 10)
    maint.start()
    await asyncio.sleep(0)
    await clock.advance_async(10)
    await asyncio.wait_for(entered.wait(), 5)
    task = maint._task
    assert task is not None
    assert maint.running
    # What had happened when stop() returned: the loop had ended and the sweep had unwound.
    at_return: list[tuple[bool, list[str]]] = []
    stopper = asyncio.create_task(maint.stop())
    stopper.add_done_callback(lambda _: at_return.append((task.done(), list(cancelled))))
    # A bounded wait that does not cancel stop(): a loop that swallowed the cancellation never ends.
    await asyncio.wait({stopper}, timeout=5)
    if not stopper.done():
        task.cancel()
        stopper.cancel()
        pytest.fail("stop() did not return: the loop swallowed its cancellation")
    assert at_return == [(True, ["slow"])]
    assert task.cancelled()
    assert ran_after == []  # the tick was abandoned, not finished
    assert maint.errors == {}  # a cancellation is not a sweep failure
    assert not maint.running
    await clock.advance_async(100)
    assert cancelled == ["slow"]
    assert maint.ticks == 1


async def test_stop_returns_only_once_the_running_sweep_has_unwound(clock: FakeClock) -> None:
    reg = StateRegistry()
    entered = asyncio.Event()
    unwound: list[str] = []

    async def slow_sweep() -> int:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            unwound.append("slow")
        return 1

    reg.add_sweep("slow", slow_sweep)
    maint = Maintenance(reg, clock, 10)
    maint.start()
    await asyncio.sleep(0)
    await clock.advance_async(10)
    await asyncio.wait_for(entered.wait(), 5)
    task = maint._task
    assert task is not None
    await maint.stop()
    assert unwound == ["slow"]
    assert task.done()


async def test_stop_while_sleeping_between_ticks(clock: FakeClock) -> None:
    reg = StateRegistry()
    m: TTLMap[str, int] = TTLMap("m", clock, ttl_s=5)
    reg.register(m)
    maint = Maintenance(reg, clock, 10)
    maint.start()
    await asyncio.sleep(0)
    task = maint._task
    assert task is not None
    await asyncio.wait_for(maint.stop(), 5)
    assert task.done()
    assert maint._task is None
    m.set("x", 1)
    await clock.advance_async(100)
    assert maint.ticks == 0
    assert len(m) == 1  # nothing swept after stop


async def test_running_reflects_the_task(clock: FakeClock) -> None:
    maint = Maintenance(StateRegistry(), clock, 10)
    assert (maint.ticks, maint.errors, maint.last_removed) == (0, {}, {})  # readable before any tick
    assert not maint.running
    maint.start()
    assert maint.running
    await asyncio.wait_for(maint.stop(), 5)
    assert not maint.running


async def test_ticks_follow_the_interval_exactly(clock: FakeClock) -> None:
    reg = StateRegistry()
    maint = Maintenance(reg, clock, 7)
    maint.start()
    try:
        await asyncio.sleep(0)
        await clock.advance_async(6.999)
        assert maint.ticks == 0
        await clock.advance_async(0.001)
        assert maint.ticks == 1
        await clock.advance_async(7)
        assert maint.ticks == 2
    finally:
        await maint.stop()


async def test_run_once_ticks_serialise(clock: FakeClock) -> None:
    """Two ticks at once (the loop and an explicit run_once) never run the same sweep concurrently."""
    reg = StateRegistry()
    gate = asyncio.Event()
    active: list[int] = []
    overlap: list[int] = []

    async def sweep() -> int:
        active.append(1)
        if len(active) > 1:
            overlap.append(len(active))
        await gate.wait()
        active.pop()
        return 1

    reg.add_sweep("s", sweep)
    maint = Maintenance(reg, clock, 60)
    first = asyncio.create_task(maint.run_once())
    second = asyncio.create_task(maint.run_once())
    for _ in range(5):
        await asyncio.sleep(0)
    assert active == [1]
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [{"s": 1}, {"s": 1}]
    assert overlap == []
    assert maint.ticks == 2


class _RegistryFailingOnce(StateRegistry):
    """A registry whose sweep list cannot be read on the first tick: a fault outside any sweep."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    @property
    def sweeps(self) -> dict[str, Any]:
        self.reads += 1
        if self.reads == 1:
            raise RuntimeError("registry unreadable")
        return super().sweeps


async def test_a_tick_that_fails_outside_any_sweep_is_logged_and_the_loop_goes_on(
    clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    reg = _RegistryFailingOnce()
    reg.add_sweep("s", lambda: 2)
    maint = Maintenance(reg, clock, 10)
    maint.start()
    try:
        await asyncio.sleep(0)
        await clock.advance_async(10)
        assert maint.running
        assert [e["event"] for e in logs] == ["maintenance tick failed"]
        assert logs[0]["log_level"] == "error"
        await clock.advance_async(10)
        assert maint.last_removed == {"s": 2}
        assert maint.ticks == 2
    finally:
        await maint.stop()
