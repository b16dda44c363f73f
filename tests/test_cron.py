"""Scheduled runs: schedules (at, every, cron with time zones and DST), firing on the fake clock,
history, concurrency, error backoff, a missed occurrence after downtime, and exactly one firing
per occurrence with two gateways on Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from clawgate.automation.schedule import ScheduleError, error_backoff_ms, next_fire_ms, validate
from clawgate.client import Client, ClientError
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from clawgate.store.cron_records import CronSchedule
from conftest import GatewayFactory, settle, unique_prefix
from helpers import poll_until, provider_sleeping, wait_until

BERLIN = ZoneInfo("Europe/Berlin")


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


# -- pure schedules ------------------------------------------------------------------------------
def test_at_fires_once() -> None:
    s = CronSchedule(kind="at", at="2026-12-01T10:00:00Z")
    at = ms(datetime(2026, 12, 1, 10, tzinfo=UTC))
    assert next_fire_ms(s, at - 1, created_ms=0) == at
    assert next_fire_ms(s, at, created_ms=0) is None
    # No offset means UTC.
    assert next_fire_ms(CronSchedule(kind="at", at="2026-12-01T10:00:00"), 0, created_ms=0) == at


def test_every_counts_from_its_anchor() -> None:
    s = CronSchedule(kind="every", every_ms=60_000)
    assert next_fire_ms(s, 0, created_ms=1_000) == 1_000
    assert next_fire_ms(s, 1_000, created_ms=1_000) == 61_000
    assert next_fire_ms(s, 60_999, created_ms=1_000) == 61_000
    # Long after the anchor, it jumps to the next slot (missed ones are not replayed).
    assert next_fire_ms(s, 10 * 60_000 + 5, created_ms=1_000) == 10 * 60_000 + 1_000
    assert next_fire_ms(CronSchedule(kind="every", every_ms=1_000, anchor_ms=500), 600, created_ms=0) == 1_500


def test_cron_in_a_time_zone() -> None:
    s = CronSchedule(kind="cron", expr="0 9 * * *", tz="America/New_York")
    after = ms(datetime(2026, 7, 1, 12, tzinfo=UTC))  # 08:00 in New York (EDT)
    assert next_fire_ms(s, after, created_ms=0) == ms(datetime(2026, 7, 1, 13, tzinfo=UTC))


def test_dst_spring_forward_fires_once_at_the_first_valid_time() -> None:
    s = CronSchedule(kind="cron", expr="30 2 * * *", tz="Europe/Berlin")
    before = ms(datetime(2026, 3, 29, 1, 0, tzinfo=BERLIN))
    first = next_fire_ms(s, before, created_ms=0)
    assert first == ms(datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN))  # 02:30 does not exist that night
    assert first is not None
    assert next_fire_ms(s, first, created_ms=0) == ms(datetime(2026, 3, 30, 2, 30, tzinfo=BERLIN))


def test_dst_fall_back_fires_the_repeated_time_once() -> None:
    s = CronSchedule(kind="cron", expr="30 2 * * *", tz="Europe/Berlin")
    before = ms(datetime(2026, 10, 25, 1, 0, tzinfo=BERLIN))
    first = next_fire_ms(s, before, created_ms=0)
    assert first == ms(datetime(2026, 10, 25, 2, 30, fold=0, tzinfo=BERLIN))
    assert first is not None
    second = next_fire_ms(s, first, created_ms=0)
    assert second == ms(datetime(2026, 10, 26, 2, 30, tzinfo=BERLIN))


def test_validation_names_the_field_and_backoff_ladder() -> None:
    cases = [
        (CronSchedule(kind="cron", expr="61 * * * *"), "schedule.expr"),
        (CronSchedule(kind="cron", expr="* * * * *", tz="Mars/Base"), "schedule.tz"),
        (CronSchedule(kind="every", every_ms=10), "schedule.everyMs"),
        (CronSchedule(kind="at", at="tomorrow"), "schedule.at"),
    ]
    for schedule, field in cases:
        with pytest.raises(ScheduleError) as err:
            validate(schedule)
        assert err.value.field == field
    assert [error_backoff_ms(n) for n in range(7)] == [
        0,
        30_000,
        60_000,
        300_000,
        900_000,
        3_600_000,
        3_600_000,
    ]


# -- a live gateway on the fake clock ------------------------------------------------------------


async def tick(clock: FakeClock, gw: RunningGateway, seconds: float, *, settled: bool = True) -> None:
    await clock.advance_async(seconds, settle=20)
    await asyncio.sleep(0.02)
    if settled:
        await settle(gw.gateway)
    await asyncio.sleep(0.02)


async def entries(c: Client, job_id: str) -> list[dict[str, Any]]:
    return (await c.call("cron.runs", {"jobId": job_id}))["entries"]


async def recorded(c: Client, job_id: str) -> list[dict[str, Any]]:
    """The job's history once the end of its last fired run is recorded (out of its `running`
    list, and its entry written). The run's end hook records it after the run has left
    `runs.active`, in store round trips (real time): `settle()` does not wait for it, and an
    occurrence due meanwhile would find the job still busy. Call it after the firing counted."""

    async def fetch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        job = (await c.call("cron.get", {"jobId": job_id}))["job"]  # before the entries: never newer
        return job, await entries(c, job_id)

    def done(got: tuple[dict[str, Any], list[dict[str, Any]]]) -> bool:
        state, history = got[0]["state"], got[1]
        return not state["running"] and state.get("lastRunId") in {e["runId"] for e in history}

    return (await poll_until(fetch, done, f"the end of job {job_id}'s run to be recorded"))[1]


async def test_every_job_fires_on_schedule_and_keeps_history(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    gw = await start_gateway()
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        job = (
            await c.call(
                "cron.add",
                {
                    "name": "ticker",
                    "schedule": {"kind": "every", "everyMs": 60_000},
                    "message": "[[reply:tick]]",
                },
            )
        )["job"]
        job_id = job["id"]
        assert job["state"]["nextRunAtMs"] == int(clock.time() * 1000) + 60_000  # not at once
        await tick(clock, gw, 60)
        await wait_until(lambda: gw.gateway.cron.fired == 1, "first firing")
        await recorded(c, job_id)
        for n in range(2, 4):
            await tick(clock, gw, 60)
            await wait_until(lambda n=n: gw.gateway.cron.fired == n, f"firing {n}")
            await recorded(c, job_id)
        await settle(gw.gateway)
        history = await entries(c, job_id)
        assert [e["status"] for e in history] == ["ok", "ok", "ok"]
        assert len({e["runId"] for e in history}) == 3
        session = f"agent:main:cron:{job_id}"
        messages = (await c.call("chat.history", {"sessionKey": session}))["messages"]
        assert [m["content"] for m in messages if m["role"] == "assistant"] == ["tick"] * 3
        got = (await c.call("cron.get", {"jobId": job_id}))["job"]
        assert got["state"]["lastStatus"] == "ok" and got["state"]["running"] == []
        # Disabled: no more firings. Removed: gone, with its history.
        await c.call("cron.update", {"jobId": job_id, "patch": {"enabled": False}})
        await tick(clock, gw, 600)
        assert gw.gateway.cron.fired == 3
        assert (await c.call("cron.remove", {"jobId": job_id}))["removed"] is True
        with pytest.raises(ClientError) as err:
            await c.call("cron.get", {"jobId": job_id})
        assert err.value.code == "NOT_FOUND"


async def test_at_job_runs_once_and_can_delete_itself(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    gw = await start_gateway()
    at = datetime.fromtimestamp(clock.time() + 120, UTC).isoformat()
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        job = (
            await c.call(
                "cron.add",
                {
                    "name": "once",
                    "schedule": {"kind": "at", "at": at},
                    "message": "x",
                    "deleteAfterRun": True,
                },
            )
        )["job"]
        await tick(clock, gw, 119)
        assert gw.gateway.cron.fired == 0
        await tick(clock, gw, 1)
        await wait_until(lambda: gw.gateway.cron.fired == 1, "the one firing")
        await settle(gw.gateway)
        await tick(clock, gw, 0)
        # Deleted by the run's end hook, after the run has left `runs.active` (settle's view).
        listed = await poll_until(
            lambda: c.call("cron.list", {}), lambda r: r["jobs"] == [], "the job to delete itself"
        )
        assert listed["jobs"] == []
        with pytest.raises(ClientError):
            await c.call("cron.get", {"jobId": job["id"]})


async def test_busy_job_skips_and_errors_back_off(start_gateway: GatewayFactory, clock: FakeClock) -> None:
    gw = await start_gateway()
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        slow = (
            await c.call(
                "cron.add",
                {
                    "name": "slow",
                    "schedule": {"kind": "every", "everyMs": 10_000},
                    "message": "[[delay:25]] x",
                },
            )
        )["job"]["id"]
        await tick(clock, gw, 10, settled=False)
        # The first run's delay starts behind its history read: the clock moves on once it sleeps
        # (until 35 s), so that run is still going at 20 s and has ended by 50 s.
        await provider_sleeping(clock, 25, what="the first run's delay")
        await tick(clock, gw, 10, settled=False)  # the first run is still going: this occurrence is skipped
        await wait_until(lambda: gw.gateway.cron.skipped == 1, "the skipped occurrence")
        # Counted before its history entry is written (a store round trip): poll for the entry.
        history = await poll_until(
            lambda: entries(c, slow),
            lambda h: any(e["status"] == "skipped" for e in h),
            "the skipped occurrence's history entry",
        )
        skipped = [e for e in history if e["status"] == "skipped"]
        assert len(skipped) == 1 and "maxConcurrentRuns 1" in skipped[0]["error"]
        await c.call("cron.remove", {"jobId": slow})
        await tick(clock, gw, 30)  # let the slow run finish

        failing = (
            await c.call(
                "cron.add",
                {
                    "name": "bad",
                    "schedule": {"kind": "every", "everyMs": 10_000},
                    "message": "[[error:nope]]",
                },
            )
        )["job"]["id"]
        await tick(clock, gw, 10)
        await settle(gw.gateway)
        await recorded(c, failing)  # its first firing (no earlier run to mistake for it)
        job = (await c.call("cron.get", {"jobId": failing}))["job"]
        assert job["state"]["consecutiveErrors"] == 1 and job["state"]["lastError"] == "nope"
        # The next run waits out the 30 s backoff, not the 10 s schedule.
        assert job["state"]["nextRunAtMs"] >= int(clock.time() * 1000) + 30_000 - 1
        fired = gw.gateway.cron.fired
        await tick(clock, gw, 20)
        assert gw.gateway.cron.fired == fired


async def test_run_now_and_bad_params(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        job = (
            await c.call(
                "cron.add",
                {"name": "manual", "schedule": {"kind": "every", "everyMs": 3_600_000}, "message": "m"},
            )
        )["job"]
        run_id = (await c.call("cron.run", {"jobId": job["id"]}))["runId"]
        assert (await c.wait(run_id))["status"] == "ok"
        for params, field in (
            ({"name": "x", "schedule": {"kind": "cron", "expr": "nope"}, "message": "m"}, "schedule.expr"),
            ({"name": "x", "schedule": {"kind": "every", "everyMs": 60_000}}, "payload.message"),
            ({"name": "x", "schedule": {"kind": "weekly"}, "message": "m"}, "params.schedule.kind"),
        ):
            with pytest.raises(ClientError) as err:
                await c.call("cron.add", params)
            assert err.value.code == "INVALID_REQUEST"
            assert (err.value.details or {}).get("field") == field


async def test_missed_occurrences_fire_once_after_downtime(
    start_gateway: GatewayFactory, clock: FakeClock, tmp_path: Path
) -> None:
    first = await start_gateway()
    async with Client(first.url, max_reconnect_attempts=0) as c:
        job_id = (
            await c.call(
                "cron.add", {"name": "m", "schedule": {"kind": "every", "everyMs": 60_000}, "message": "x"}
            )
        )["job"]["id"]
        await tick(clock, first, 60)
        await wait_until(lambda: first.gateway.cron.fired == 1, "first firing")
        # Ended and recorded before the stop: the restart must find only missed occurrences.
        await recorded(c, job_id)
    await settle(first.gateway)
    await first.stop()
    clock.advance(10 * 60)  # down for ten occurrences
    second = await start_gateway()
    await tick(clock, second, 0)
    await wait_until(lambda: second.gateway.cron.fired == 1, "the catch-up firing")
    await tick(clock, second, 1)
    assert second.gateway.cron.fired == 1
    async with Client(second.url, max_reconnect_attempts=0) as c:
        history = await recorded(c, job_id)  # the catch-up run's end hook wrote its entry
        job = (await c.call("cron.get", {"jobId": job_id}))["job"]
        assert job["state"]["nextRunAtMs"] > int(clock.time() * 1000)
        assert len(history) == 2


@pytest.mark.redis
async def test_two_gateways_on_redis_fire_each_occurrence_once(
    start_gateway: GatewayFactory, clock: FakeClock, redis_url: str
) -> None:
    shared = {"store": redis_url, "redis_prefix": unique_prefix(), "cron_poll_s": 5}
    a = await start_gateway(**shared)
    b = await start_gateway(**shared)
    async with Client(a.url, max_reconnect_attempts=0) as c:
        job_id = (
            await c.call(
                "cron.add",
                {
                    "name": "r",
                    "schedule": {"kind": "every", "everyMs": 30_000},
                    "message": "x",
                    "maxConcurrentRuns": 100,  # this test is about claims, not about busy jobs
                },
            )
        )["job"]["id"]
        b.gateway.cron.wake.set()
        for i in range(1, 7):
            await clock.advance_async(30, step=5, settle=20)
            # Each occurrence is read and claimed on Redis in real time: let it be claimed before
            # the clock passes the next one (a claim made after it skips the missed occurrence).
            await wait_until(
                lambda i=i: a.gateway.cron.fired + b.gateway.cron.fired >= i,
                f"firing {i} {a.gateway.cron.stats()} {b.gateway.cron.stats()}",
            )
        await wait_until(
            lambda: a.gateway.cron.fired + b.gateway.cron.fired >= 6,
            f"six firings {a.gateway.cron.stats()} {b.gateway.cron.stats()}",
        )
        for gw in (a, b):
            await settle(gw.gateway)
        total = a.gateway.cron.fired + b.gateway.cron.fired
        # An occurrence's history entry is written by its run's end hook, on whichever
        # gateway executed it, after the run has left `runs.active`: poll (bounded) for it.
        history = await poll_until(
            lambda: entries(c, job_id), lambda h: len(h) >= total, f"{total} history entries"
        )
        run_ids = [e["runId"] for e in history]
        assert len(run_ids) == len(set(run_ids))
        scheduled = [e["scheduledForMs"] for e in history]
        assert len(scheduled) == len(set(scheduled)) == total
    for gw in (a, b):
        await gw.gateway.cron.store.delete_job(job_id)


async def test_history_is_bounded_by_count_and_age(start_gateway: GatewayFactory, clock: FakeClock) -> None:
    gw = await start_gateway(cron_history_max=2, cron_history_ttl_s=100)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        job_id = (
            await c.call(
                "cron.add", {"name": "h", "schedule": {"kind": "every", "everyMs": 10_000}, "message": "x"}
            )
        )["job"]["id"]
        for n in range(1, 4):
            await tick(clock, gw, 10)
            await wait_until(lambda n=n: gw.gateway.cron.fired == n, f"firing {n}")
            await recorded(c, job_id)
            await settle(gw.gateway)
        assert len(await entries(c, job_id)) == 2
        await c.call("cron.update", {"jobId": job_id, "patch": {"enabled": False}})
        await tick(clock, gw, 101)
        await gw.gateway.maintenance.run_once()
        assert await entries(c, job_id) == []


def test_cli_add_list_run_runs_rm(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from clawgate.testing import GatewayProcess, clean_env

    def cli(*args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "clawgate", "cron", *args, "--url", gw.url],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
            check=True,
        )
        return json.loads(out.stdout)

    with GatewayProcess(tmp_path / "state") as gw:
        job = cli("add", "nightly", "-m", "[[reply:hi]]", "--cron", "0 3 * * *", "--tz", "Europe/Berlin")
        assert job["schedule"] == {
            **job["schedule"],
            "kind": "cron",
            "expr": "0 3 * * *",
            "tz": "Europe/Berlin",
        }
        assert [j["id"] for j in cli("list")] == [job["id"]]
        run_id = cli("run", job["id"])["runId"]
        for _ in range(100):
            runs = cli("runs", job["id"])
            if runs:
                break
        assert runs[0]["runId"] == run_id and runs[0]["status"] == "ok"
        assert cli("rm", job["id"])["removed"] is True
        assert cli("list") == []
