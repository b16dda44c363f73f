"""The FakeClock every TTL test relies on, and the SystemClock's bounds (clawgate.state.clock).

Timers and sleepers wake exactly at their deadline, in deadline order (first scheduled first
on a tie); cancelled timers never fire and are dropped once they are more than 64 and half
of the queue; `advance_async` wakes periodic sleepers once per step.
"""

from __future__ import annotations

import asyncio
import random

from clawgate.state.clock import FakeClock, wait_woken


async def test_timers_fire_exactly_at_their_deadline_in_order(clock: FakeClock) -> None:
    fired: list[str] = []
    clock.call_later(2, lambda: fired.append("b"))
    clock.call_later(1, lambda: fired.append("a"))
    clock.call_later(2, lambda: fired.append("b2"))  # same deadline: after b
    clock.call_later(-5, lambda: fired.append("now"))  # a negative delay means now
    clock.advance(0)
    assert fired == ["now"]
    clock.advance(0.999)
    assert fired == ["now"]
    clock.advance(0.001)
    assert fired == ["now", "a"]
    clock.advance(1)
    assert fired == ["now", "a", "b", "b2"]
    assert clock.pending_sleepers == 0


async def test_time_and_monotonic_move_together(clock: FakeClock) -> None:
    t0, m0 = clock.time(), clock.monotonic()
    assert FakeClock(start=5.0).time() == 5.0
    clock.advance(2.5)
    assert clock.time() == t0 + 2.5
    assert clock.monotonic() == m0 + 2.5
    await clock.advance_async(1)
    assert (clock.time(), clock.monotonic()) == (t0 + 3.5, m0 + 3.5)


async def test_sleep_wakes_exactly_at_its_deadline(clock: FakeClock) -> None:
    sleeper = asyncio.create_task(clock.sleep(3))
    await asyncio.sleep(0)
    assert clock.pending_sleepers == 1
    await clock.advance_async(2.999)
    assert not sleeper.done()
    await clock.advance_async(0.001)
    assert sleeper.done()
    assert clock.pending_sleepers == 0


async def test_sleep_of_zero_or_less_only_yields(clock: FakeClock) -> None:
    for delay in (0, -1):
        sleeper = asyncio.create_task(clock.sleep(delay))
        for _ in range(3):  # a few loop iterations, no clock advance and no real time waited
            await asyncio.sleep(0)
        assert sleeper.done()
    assert clock.pending_sleepers == 0
    assert clock._sleepers == []


async def test_a_zero_sleep_lets_other_ready_tasks_run_first(clock: FakeClock) -> None:
    order: list[str] = []

    async def other() -> None:
        order.append("other")

    task = asyncio.create_task(other())
    await clock.sleep(0)
    order.append("after the sleep")
    assert order == ["other", "after the sleep"]
    await task


async def test_advance_async_drops_float_noise_below_1e_12(clock: FakeClock) -> None:
    m0 = clock.monotonic()  # fine enough to see 1e-12 (time() is not, at its epoch offset)
    await clock.advance_async(1e-12)
    assert clock.monotonic() == m0
    await clock.advance_async(2e-12)
    assert clock.monotonic() == m0 + 2e-12


async def test_a_negative_delay_is_now_not_before_now(clock: FakeClock) -> None:
    fired: list[str] = []
    clock.call_later(0, lambda: fired.append("zero"))
    clock.call_later(-5, lambda: fired.append("negative"))  # due now, so after the earlier "now"
    clock.advance(0)
    assert fired == ["zero", "negative"]


async def test_a_cancelled_sleep_is_skipped_when_its_deadline_passes(clock: FakeClock) -> None:
    sleeper = asyncio.create_task(clock.sleep(1))
    other = asyncio.create_task(clock.sleep(1))
    await asyncio.sleep(0)
    sleeper.cancel()
    await asyncio.sleep(0)
    assert clock.pending_sleepers == 1
    clock.advance(1)  # must not try to wake the cancelled sleeper
    await asyncio.sleep(0)
    assert other.done() and not other.cancelled()
    assert sleeper.cancelled()


async def test_cancelled_timers_never_fire_and_count_once(clock: FakeClock) -> None:
    fired: list[int] = []
    timers = [clock.call_later(i + 1, lambda i=i: fired.append(i)) for i in range(4)]
    timers[1].cancel()
    timers[1].cancel()  # twice: counted once
    assert clock._cancelled == 1
    assert clock.pending_sleepers == 3
    clock.advance(10)
    assert fired == [0, 2, 3]
    assert clock._cancelled == 0  # the cancelled timer left the queue
    timers[0].cancel()  # cancelling a fired timer still only marks it
    assert clock.pending_sleepers == 0


async def test_cancelled_timers_are_dropped_past_64_and_half_the_queue(clock: FakeClock) -> None:
    rng = random.Random(7)
    t0 = clock.time()
    fired: list[float] = []
    delays = [rng.uniform(1, 100) for _ in range(200)]
    timers = [clock.call_later(d, lambda d=d: fired.append(d)) for d in delays]
    order = list(range(200))
    rng.shuffle(order)
    for n, i in enumerate(order[:100], start=1):
        timers[i].cancel()
        assert len(clock._sleepers) == 200, n  # not yet half the queue (or not past 64)
    timers[order[100]].cancel()  # 101 cancelled: more than half of 200
    assert len(clock._sleepers) == 99
    assert clock._cancelled == 0
    kept = sorted(delays[i] for i in order[101:])
    for _ in range(100):
        clock.advance(1)
        assert fired == [d for d in kept if t0 + d <= clock.time()]
    assert fired == kept


async def test_few_cancelled_timers_are_kept_until_more_than_64(clock: FakeClock) -> None:
    timers = [clock.call_later(1, lambda: None) for _ in range(65)]
    for t in timers[:64]:
        t.cancel()
    assert len(clock._sleepers) == 65  # 64 cancelled, more than half, but not more than 64
    timers[64].cancel()
    assert clock._sleepers == []


async def test_cancelled_count_drops_by_one_per_cancelled_timer_passed(clock: FakeClock) -> None:
    timers = [clock.call_later(i + 1, lambda: None) for i in range(60)]
    for t in timers:
        t.cancel()
    assert clock._cancelled == 60
    clock.advance(30)
    assert clock._cancelled == 30
    clock.advance(30)
    assert clock._cancelled == 0


async def test_cancelled_count_drops_as_cancelled_timers_pass(clock: FakeClock) -> None:
    """A cancelled timer that surfaces on its own no longer counts towards a compaction."""
    early = [clock.call_later(1, lambda: None) for _ in range(60)]
    late = [clock.call_later(50, lambda: None) for _ in range(70)]
    for t in early:
        t.cancel()
    clock.advance(1)
    assert clock._cancelled == 0
    for t in late[:64]:
        t.cancel()
    assert len(clock._sleepers) == 70  # 64 counted, not 124


async def test_advance_async_wakes_a_periodic_sleeper_once_per_step(clock: FakeClock) -> None:
    ticks: list[float] = []

    async def periodic() -> None:
        while True:
            await clock.sleep(1)
            ticks.append(clock.time())

    task = asyncio.create_task(periodic())
    await asyncio.sleep(0)
    t0 = clock.time()
    await clock.advance_async(3, step=1)
    assert ticks == [t0 + 1, t0 + 2, t0 + 3]
    await clock.advance_async(3)  # one step: one wake
    assert ticks == [t0 + 1, t0 + 2, t0 + 3, t0 + 6]
    await clock.advance_async(0.5, step=1)  # a last partial step still advances
    assert clock.time() == t0 + 6.5
    await clock.advance_async(2.5, step=1)
    # Steps of 1, 1, 0.5: the sleeper due at 7 wakes at 7.5, the one due at 8.5 at 8.5.
    assert ticks[-2:] == [t0 + 7.5, t0 + 8.5]
    assert clock.time() == t0 + 9
    task.cancel()


async def test_wait_woken_counts_from_the_call_even_when_time_moves_in_the_same_loop_turn(
    clock: FakeClock,
) -> None:
    """The webhook and cron workers decide how long to wait, then wait. When the clock moved
    in the loop turn between the two (here: a callback queued by the deciding step itself,
    as a test's `advance` or another task can), the wait must still end at the decided
    deadline. A sleeping task started beside the wait armed its timer a turn late, at the
    moved time plus the full delay, and the worker slept through its due delivery."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    async def decide_then_wait() -> None:
        loop.call_soon(clock.advance, 5.0)  # time moves right after the decision, same turn
        await wait_woken(clock, wake, 2.0)

    waiter = asyncio.ensure_future(decide_then_wait())
    for _ in range(5):
        await asyncio.sleep(0)
    assert waiter.done() and wake.is_set()
    assert clock.pending_sleepers == 0


async def test_wait_woken_ends_on_the_event_and_drops_its_timer(clock: FakeClock) -> None:
    wake = asyncio.Event()
    waiter = asyncio.ensure_future(wait_woken(clock, wake, 60.0))
    await asyncio.sleep(0)
    assert clock.pending_sleepers == 1
    wake.set()
    await waiter
    assert clock.pending_sleepers == 0  # cancelled with the wait
    forever = asyncio.ensure_future(wait_woken(clock, asyncio.Event(), None))
    clock.advance(10**6)
    await asyncio.sleep(0)
    assert not forever.done() and clock.pending_sleepers == 0
    forever.cancel()


async def test_wait_woken_with_nothing_left_to_wait_returns_after_one_turn(clock: FakeClock) -> None:
    for timeout_s in (0.0, -1.0):
        waiter = asyncio.ensure_future(wait_woken(clock, asyncio.Event(), timeout_s))
        for _ in range(2):
            await asyncio.sleep(0)
        assert waiter.done()  # the FakeClock's own timers only fire on `advance`


async def test_sleeping_until_counts_the_pending_sleeps_due_at_that_time(clock: FakeClock) -> None:
    """What the tests wait for before advancing: sleeps (not timers) due at one deadline."""
    t = clock.time()
    clock.call_later(5, lambda: None)  # a timer is not a sleep
    a = asyncio.create_task(clock.sleep(5))
    b = asyncio.create_task(clock.sleep(5))
    c = asyncio.create_task(clock.sleep(7))
    await asyncio.sleep(0)
    assert [clock.sleeping_until(t + d) for d in (5, 6, 7)] == [2, 0, 1]
    c.cancel()
    await asyncio.sleep(0)
    assert clock.sleeping_until(t + 7) == 0  # a cancelled sleep no longer counts
    clock.advance(5)
    await asyncio.gather(a, b)
    assert clock.sleeping_until(t + 5) == 0
