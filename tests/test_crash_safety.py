"""SIGKILL a gateway subprocess at seed-dependent points, restart it on the same state dir, check.

Each seed drives a mix of `agent` runs and `sessions.spawn` (mode run/session, cleanup
keep/delete) against a real `clawgate gateway` process, kills it with SIGKILL after a
seed-dependent delay, restarts it on the same port and state dir, and checks what a
crash must not break:
- the SQLite file passes `PRAGMA integrity_check` (on a copy taken right after the kill,
  so the WAL recovery is exercised as the restart would, and again after a clean stop);
- every run whose `accepted` answer reached the client has an end (`agent.wait`: final
  status, never NOT_FOUND, never still running);
- every accepted spawn's "ended" hook line is in ended.jsonl, once, or more often only
  with `redelivery: true` (subagents/hooks.py);
- transcripts are well-formed rows (known role, text content, timestamp);
- the maintenance sweeper runs after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from clawgate.client import Client, ClientError
from clawgate.protocol.constants import INTERRUPTED
from clawgate.testing import GatewayProcess
from conftest import GatewayProcessFactory
from helpers import wait_until

KILL_DELAYS = [0.1, 0.4, 0.7, 1.0]
FINAL = {"ok", "error", "timeout", "aborted"}
ROLES = {"user", "assistant", "system"}
SESSIONS = ["agent:main:main", "agent:main:crash-a", "agent:main:crash-b", "agent:ops:main"]


def _gateway(gateway_process: GatewayProcessFactory, state: Path) -> GatewayProcess:
    ended = state / "ended.jsonl"
    return gateway_process(
        state,
        args=["--log-level", "warning"],
        settings={
            "lifecycle_error_grace_s": 0.2,
            "ended_hook_log": ended,
            "max_children_per_agent": 50,
            "shutdown_grace_s": 2,
            "agents": '{"ops": {}}',
        },
    )


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _integrity_of_copy(state: Path, scratch: Path) -> str:
    """Check a copy of the killed gateway's files: recovery runs on the copy, not the original."""
    scratch.mkdir()
    for name in ("clawgate.db", "clawgate.db-wal"):
        if (state / name).exists():
            shutil.copy2(state / name, scratch / name)
    conn = sqlite3.connect(scratch / "clawgate.db")
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _messages(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id, session_key, role, content, ts, run_id FROM messages").fetchall()
    finally:
        conn.close()


def _ended_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Each line is one os.write of a whole line, so no half line can appear.
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _drive(url: str, rng: random.Random, accepted_runs: set[str], accepted_spawns: set[str]) -> None:
    """Issue a paced mix of requests until cancelled (by the kill) or the budget is spent."""
    tasks: list[asyncio.Task[Any]] = []

    def on_accepted(payload: dict[str, Any]) -> None:
        accepted_runs.add(payload["runId"])

    async def one_agent(i: int, c: Client) -> None:
        delay = rng.choice(["0.02", "0.05", "0.1"])
        chunks = rng.randint(1, 4)
        msg = f"[[delay:{delay}]] [[chunks:{chunks}]] crash text {i}"
        if rng.random() < 0.1:
            msg = f"[[error:boom {i}]]"
        with contextlib.suppress(ClientError):
            await c.call_final(
                "agent",
                {
                    "message": msg,
                    "idempotencyKey": f"crash-{i}-{rng.random()}",
                    "sessionKey": rng.choice(SESSIONS),
                },
                on_accepted=on_accepted,
            )

    async def one_spawn(i: int, c: Client) -> None:
        params = {
            "sessionKey": rng.choice(SESSIONS),
            "task": f"[[delay:{rng.choice(['0.02', '0.05'])}]] sub task {i}",
            "mode": rng.choice(["run", "session"]),
            "cleanup": rng.choice(["keep", "delete"]),
            "label": f"l{i}",
        }
        with contextlib.suppress(ClientError):
            res = await c.call("sessions.spawn", params)
            assert res["status"] == "accepted"
            accepted_spawns.add(res["runId"])

    async with Client(url, max_reconnect_attempts=0) as c:
        try:
            for i in range(120):
                make = one_spawn if rng.random() < 0.35 else one_agent
                tasks.append(asyncio.create_task(make(i, c)))
                await asyncio.sleep(rng.uniform(0.003, 0.015))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_all_ended(c: Client, run_ids: set[str]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for run_id in sorted(run_ids):
        res = await c.call("agent.wait", {"runId": run_id, "timeoutMs": 10000}, timeout=20)
        results[run_id] = res
    return results


async def _wait_for_ended_lines(path: Path, spawn_ids: set[str]) -> list[dict[str, Any]]:
    for _ in range(300):
        lines = _ended_lines(path)
        if spawn_ids <= {line["run_id"] for line in lines}:
            return lines
        await asyncio.sleep(0.05)
    seen = {line["run_id"] for line in _ended_lines(path)}
    raise AssertionError(f"spawns without an ended line: {sorted(spawn_ids - seen)}")


@pytest.mark.parametrize("seed", range(len(KILL_DELAYS)))
async def test_sigkill_and_restart_keeps_every_promise(
    tmp_path: Path, gateway_process: GatewayProcessFactory, seed: int
) -> None:
    rng = random.Random(seed)
    state = tmp_path / "state"
    gw = _gateway(gateway_process, state)
    accepted_runs: set[str] = set()
    accepted_spawns: set[str] = set()
    try:
        await gw.astart()
        driver = asyncio.create_task(_drive(gw.url, rng, accepted_runs, accepted_spawns))
        await asyncio.sleep(KILL_DELAYS[seed] + rng.uniform(0, 0.05))
        # The kill point, at the earliest once something was accepted: on a loaded machine the
        # first answer can take longer than the shortest delay (and a kill before it checks nothing).
        await wait_until(
            lambda: bool(accepted_runs or accepted_spawns) or driver.done(), "a first accepted request"
        )
        gw.kill()
        with contextlib.suppress(ClientError, OSError, asyncio.CancelledError):
            await asyncio.wait_for(driver, 10)
        assert accepted_runs or accepted_spawns, "nothing was accepted before the kill"

        # The files as the kill left them: recovery on a copy must find a sound database.
        assert _integrity_of_copy(state, tmp_path / "copy") == "ok"

        await gw.astart()
        async with Client(gw.url, max_reconnect_attempts=0) as c:
            results = await _wait_all_ended(c, accepted_runs | accepted_spawns)
            for run_id, res in results.items():
                assert res["status"] in FINAL, (run_id, res)
                assert "endedAt" in res, (run_id, res)
                if res["status"] == "error":
                    # Only the two causes this test creates: a scripted error, or the kill.
                    assert res["error"] == INTERRUPTED or "boom" in res["error"], (run_id, res)
                else:
                    assert res["status"] == "ok", (run_id, res)
            lines = await _wait_for_ended_lines(state / "ended.jsonl", accepted_spawns)
            status = await c.call("status")
            assert status["maintenance"]["running"] is True
            sessions = (await c.call("sessions.list", {"limit": 1000}))["sessions"]
            for s in sessions:
                hist = await c.call("chat.history", {"sessionKey": s["key"], "limit": 1000})
                for m in hist["messages"]:
                    assert m["role"] in ROLES, m
                    assert m["content"] is not None, m
            # While running: WAL lets a reader check the live file.
            assert _integrity(state / "clawgate.db") == "ok"

        by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for line in lines:
            by_run[line["run_id"]].append(line)
        for run_id, items in by_run.items():
            firsts = [x for x in items if not x["redelivery"]]
            assert len(firsts) <= 1, (run_id, items)
            assert {x["reason"] for x in items} <= {"completed", "deleted", "swept", "released"}, items
            # One reason per run, however often it is delivered.
            assert len({x["reason"] for x in items}) == 1, items
        for run_id in accepted_spawns:
            assert by_run[run_id], run_id

        interrupted = [r for r in results.values() if r.get("error") == INTERRUPTED]
        print(
            f"seed={seed} kill_after={KILL_DELAYS[seed]}s runs={len(accepted_runs)} "
            f"spawns={len(accepted_spawns)} interrupted={len(interrupted)} "
            f"redeliveries={sum(1 for x in lines if x['redelivery'])}"
        )
    finally:
        await gw.astop()
    assert _integrity(state / "clawgate.db") == "ok"
    rows = _messages(state / "clawgate.db")
    assert rows, "no transcript rows at all"
    for row in rows:
        _id, key, role, content, ts, _run_id = row
        assert isinstance(key, str) and key.startswith("agent:"), row
        assert role in ROLES, row
        assert isinstance(content, str), row
        assert isinstance(ts, float) and ts > 0, row
    # A run whose end says ok has its reply in the transcript, once (written in the same or an
    # earlier transaction than its end, so no kill point can separate them).
    replies = Counter(row[5] for row in rows if row[2] == "assistant")
    for run_id in accepted_runs:
        if results[run_id]["status"] == "ok":
            assert replies[run_id] == 1, (run_id, results[run_id], replies[run_id])
