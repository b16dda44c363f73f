"""`clawgate batch`: every task exactly once, malformed lines skipped, backoff, crash and resume.

The in-process tests drive `run_batch` against a gateway on a real socket; the
crash tests run the gateway and `clawgate batch` as separate processes and
SIGKILL them midway, then check the results file and the SQLite store.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from clawgate.batch import (
    BadLine,
    BatchOptions,
    default_out_path,
    default_session_key,
    parse_tasks,
    run_batch,
)
from clawgate.server.serve import RunningGateway
from clawgate.testing import GatewayProcess, clean_env
from conftest import GatewayFactory, GatewayProcessFactory, settle

INTERRUPTED = "interrupted by gateway restart"


def _write_tasks(path: Path, tasks: list[dict[str, Any]], extra_lines: list[str] | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for task in tasks:
            fh.write(json.dumps(task) + "\n")
        for line in extra_lines or []:
            fh.write(line + "\n")
    return path


def _results(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# -- parsing --------------------------------------------------------------------------------------
def test_parse_reports_each_malformed_line_with_its_number() -> None:
    lines = [
        '{"id": "a", "message": "one"}',
        "not json at all",
        '{"message": "no id"}',
        '{"id": "b"}',
        "",
        '["a", "list"]',
        '{"id": "a", "message": "again"}',
        '{"id": "c", "message": "x", "spawn": {"mode": "forever"}}',
        '{"id": "d", "message": "x", "timeout": -1}',
        '{"id": 7, "message": "numeric id", "spawn": {"mode": "session"}, "timeout": 5}',
    ]
    tasks, bad = parse_tasks(lines)
    assert [(t.key, t.line) for t in tasks] == [("a", 1), ("7", 10)]
    assert tasks[1].id == 7
    assert tasks[1].spawn == {"mode": "session", "cleanup": "keep"}
    assert tasks[1].timeout == 5.0
    assert [b.line for b in bad] == [2, 3, 4, 6, 7, 8, 9]
    assert bad[0].reason.startswith("not JSON")
    assert bad[1] == BadLine(3, "missing id (a string or an integer)")
    assert bad[2] == BadLine(4, "missing message (a non-empty string)")
    assert bad[3] == BadLine(6, "not a JSON object")
    assert bad[4] == BadLine(7, "duplicate id 'a' (first on line 1)")
    assert "spawn.mode" in bad[5].reason
    assert "timeout" in bad[6].reason


def test_default_paths_and_session_keys() -> None:
    assert default_out_path(Path("/x/tasks.jsonl")) == Path("/x/tasks.results.jsonl")
    assert default_session_key("t-1_a") == "agent:main:batch:t-1_a"
    odd = default_session_key("a/b c")
    assert odd.startswith("agent:main:batch:a_b_c-")
    assert odd != default_session_key("a_b c")  # sanitized alike, still apart


# -- in-process gateway -----------------------------------------------------------------------------
async def test_two_thousand_tasks_each_done_exactly_once(gateway: RunningGateway, tmp_path: Path) -> None:
    n = 2000
    tasks = _write_tasks(
        tmp_path / "tasks.jsonl", [{"id": f"t{i}", "message": f"task {i}"} for i in range(n)]
    )
    out = tmp_path / "out.jsonl"
    opts = BatchOptions(concurrency=64, connections=4, progress=False)
    summary = await run_batch(tasks, url=gateway.url, out_path=out, options=opts, console=_quiet())
    assert (summary.ok, summary.error, summary.unfinished, summary.skipped) == (n, 0, 0, 0)
    assert summary.completed == n
    assert summary.all_ok
    lines = _results(out)
    assert len(lines) == n
    assert Counter(line["id"] for line in lines) == Counter(f"t{i}" for i in range(n))
    for line in lines:
        i = int(line["id"][1:])
        assert line["status"] == "ok"
        assert line["runId"] == f"batch:t{i}"
        assert line["text"] == f"ok: task {i}"
        assert line["error"] is None
        assert line["attempts"] == 1
        assert line["acceptedMs"] is not None and line["acceptedMs"] <= line["totalMs"]
    await settle(gateway.gateway)
    assert await gateway.gateway.store.count_runs() == n
    assert await gateway.gateway.store.count_runs(default_session_key("t5")) == 1

    # A rerun skips everything: nothing is submitted, the file is untouched.
    before = out.read_bytes()
    again = await run_batch(tasks, url=gateway.url, out_path=out, options=opts, console=_quiet())
    assert (again.skipped, again.completed, again.ok) == (n, 0, 0)
    assert again.all_ok
    assert out.read_bytes() == before
    assert await gateway.gateway.store.count_runs() == n


async def test_malformed_lines_are_reported_and_skipped(gateway: RunningGateway, tmp_path: Path) -> None:
    good = [{"id": f"g{i}", "message": f"good {i}"} for i in range(5)]
    tasks = _write_tasks(
        tmp_path / "tasks.jsonl",
        good,
        [
            '{"id": "g1", "message": "dup"}',
            "{broken",
            '{"id": "x"}',
            '{"id": "s", "message": "m", "spawn": 3}',
        ],
    )
    out = tmp_path / "tasks.results.jsonl"
    buf = io.StringIO()
    summary = await run_batch(
        tasks, url=gateway.url, options=BatchOptions(progress=False), console=Console(file=buf, width=300)
    )
    assert summary.out_path == out
    assert [b.line for b in summary.bad_lines] == [6, 7, 8, 9]
    assert summary.invalid == 4
    assert summary.ok == 5
    assert not summary.all_ok  # malformed lines make the exit code 1
    report = buf.getvalue()
    for number in (6, 7, 8, 9):
        assert f"tasks.jsonl:{number}: skipped" in report
    assert sorted(line["id"] for line in _results(out)) == [f"g{i}" for i in range(5)]


async def test_request_errors_and_run_errors_end_as_error_lines(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    tasks = _write_tasks(
        tmp_path / "tasks.jsonl",
        [
            {"id": "fine", "message": "fine"},
            {"id": "boom", "message": "[[error:kaput]]"},
            {"id": "badkey", "message": "x", "sessionKey": "nope"},
        ],
    )
    out = tmp_path / "out.jsonl"
    summary = await run_batch(
        tasks, url=gateway.url, out_path=out, options=BatchOptions(progress=False), console=_quiet()
    )
    assert (summary.ok, summary.error, summary.retried) == (1, 2, 0)
    by_id = {line["id"]: line for line in _results(out)}
    assert by_id["boom"]["status"] == "error"
    assert by_id["boom"]["error"] == "kaput"
    assert by_id["badkey"]["status"] == "error"
    assert by_id["badkey"]["error"].startswith("INVALID_REQUEST")
    assert by_id["badkey"]["attempts"] == 1
    # Error lines are final: a rerun skips them but still exits 1.
    again = await run_batch(
        tasks, url=gateway.url, out_path=out, options=BatchOptions(progress=False), console=_quiet()
    )
    assert (again.skipped, again.skipped_not_ok, again.completed) == (3, 2, 0)
    assert not again.all_ok


async def test_unavailable_is_retried_until_everything_completes(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    rg = await start_gateway(max_tracked_runs=2)
    n = 24
    tasks = _write_tasks(tmp_path / "tasks.jsonl", [{"id": i, "message": f"squeeze {i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    summary = await run_batch(
        tasks,
        url=rg.url,
        out_path=out,
        options=BatchOptions(concurrency=16, connections=2, progress=False),
        console=_quiet(),
    )
    assert (summary.ok, summary.unfinished) == (n, 0)
    assert summary.retried > 0
    # Every retry answered a refusal (and nothing else was retried).
    assert summary.retried == rg.gateway.admission.refused
    lines = _results(out)
    assert sorted(line["id"] for line in lines) == list(range(n))
    assert sum(line["attempts"] - 1 for line in lines) == summary.retried
    assert all(line["status"] == "ok" for line in lines)
    await settle(rg.gateway)
    assert await rg.gateway.store.count_runs() == n


async def test_spawn_tasks(gateway: RunningGateway, tmp_path: Path) -> None:
    tasks = _write_tasks(
        tmp_path / "tasks.jsonl",
        [
            {"id": f"s{i}", "message": f"child work {i}", "spawn": {"mode": "session", "cleanup": "keep"}}
            for i in range(8)
        ]
        + [{"id": "sd", "message": "deleted child", "spawn": {"mode": "run", "cleanup": "delete"}}],
    )
    out = tmp_path / "out.jsonl"
    summary = await run_batch(
        tasks, url=gateway.url, out_path=out, options=BatchOptions(progress=False), console=_quiet()
    )
    assert summary.ok == 9
    lines = {line["id"]: line for line in _results(out)}
    assert lines["s3"]["text"] == "ok: child work 3"
    assert lines["sd"]["text"] == "ok: deleted child"
    await settle(gateway.gateway)
    records = await gateway.gateway.store.list_subagents("agent:main:batch", 100)
    assert sorted(r.label for r in records) == [*sorted(f"batch:s{i}" for i in range(8)), "batch:sd"]
    assert {r.run_id for r in records} == {line["runId"] for line in lines.values()}
    assert not (tmp_path / "out.jsonl.spawns").exists()  # the journal goes once all is done


# -- crash and resume (separate processes) ------------------------------------------------------------
def _gateway(gateway_process: GatewayProcessFactory, state_dir: Path, **settings: object) -> GatewayProcess:
    return gateway_process(
        state_dir,
        args=["--log-level", "warning"],
        settings={"main_concurrency": 8, "shutdown_grace_s": 1, **settings},
    )


def _start_batch(tasks: Path, out: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-c",
        "from clawgate.cli.main import main; main()",
        "batch",
        str(tasks),
        "--url",
        f"ws://127.0.0.1:{port}/",
        "--out",
        str(out),
        "--concurrency",
        "16",
        "--no-progress",
    ]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=clean_env())


def _wait_lines(out: Path, at_least: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"batch ended (rc {proc.returncode}) before {at_least} results")
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} results after {timeout} s")


def _wait_running(db: Path, timeout: float = 60) -> None:
    """Until the store shows a run executing (a kill now cuts one off): on a loaded machine
    the batch client can be the slow side, and a kill right after its 60th result could
    find the gateway between runs, with nothing to interrupt."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            if conn.execute("SELECT 1 FROM runs WHERE status = 'running' LIMIT 1").fetchone():
                return
        finally:
            conn.close()
        time.sleep(0.002)
    raise AssertionError(f"no run executing after {timeout} s")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _crash_tasks(path: Path, n: int, spawns: int) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = [
        {"id": f"c{i}", "message": f"crash task {i} [[delay:0.05]]"} for i in range(n)
    ]
    for i in range(0, n, n // spawns if spawns else n + 1):
        tasks[i]["spawn"] = {"mode": "session", "cleanup": "keep"}
    _write_tasks(path, tasks)
    return tasks


def _summary_value(report: str, row: str) -> int:
    match = re.search(rf"│ {row}\s*│\s*(\d+) │", report)
    assert match is not None, (row, report)
    return int(match.group(1))


def _check_exactly_once(db: Path, tasks: list[dict[str, Any]], lines: list[dict[str, Any]]) -> int:
    """Every task: one result line, ok; one ok run in the store; returns the interrupted run count."""
    assert len(lines) == len(tasks), "one result line per task"
    by_id = {line["id"]: line for line in lines}
    assert set(by_id) == {t["id"] for t in tasks}
    assert all(line["status"] == "ok" for line in lines), [line for line in lines if line["status"] != "ok"]
    conn = sqlite3.connect(db)
    try:
        runs = conn.execute("SELECT run_id, session_key, status, data FROM runs").fetchall()
        subagents = [json.loads(row[0]) for row in conn.execute("SELECT data FROM subagents")]
        # A run id reused for a second execution would still be one row in `runs`; the
        # transcript keeps one assistant message per execution, so it shows any re-run.
        replies = Counter(
            dict(conn.execute("SELECT run_id, count(*) FROM messages WHERE role='assistant' GROUP BY run_id"))
        )
    finally:
        conn.close()
    assert replies and max(replies.values()) == 1, "no run executed twice"
    assert sum(replies.values()) == len(tasks), "one reply per task in all the transcripts"
    run_by_id = {r[0]: (r[1], r[2], json.loads(r[3]).get("error")) for r in runs}
    label_of = {s["run_id"]: s["label"] for s in subagents}
    ok_runs_per_task: Counter[str] = Counter()
    interrupted = 0
    for run_id, (session, status, error) in run_by_id.items():
        if run_id in label_of:
            task_id = label_of[run_id].removeprefix("batch:")
        else:
            assert run_id.startswith("batch:"), run_id
            task_id = run_id.removeprefix("batch:").split(":retry")[0]
            assert session == default_session_key(task_id)
        if status == "ok":
            ok_runs_per_task[task_id] += 1
        else:
            assert error == INTERRUPTED, (run_id, status, error)
            interrupted += 1
    assert ok_runs_per_task == Counter({t["id"]: 1 for t in tasks}), "exactly one ok run per task"
    assert sum(1 for _, status, _ in run_by_id.values() if status == "ok") == len(tasks)
    for line in lines:
        assert run_by_id[line["runId"]][1] == "ok", line
    return interrupted


@pytest.mark.slow
def test_crash_of_gateway_and_batch_then_resume(
    tmp_path: Path, gateway_process: GatewayProcessFactory
) -> None:
    n = 300
    tasks_path = tmp_path / "tasks.jsonl"
    tasks = _crash_tasks(tasks_path, n, spawns=0)
    out = tmp_path / "results.jsonl"
    state = tmp_path / "state"
    # The gateway forgets idempotency keys almost at once, so a blind resubmission of a run
    # that finished before the crash would execute it again: only the batch's own
    # `agent.wait` check before submitting keeps each task to one execution.
    gw = _gateway(gateway_process, state, dedupe_ttl_s=0.001).start()
    batch = _start_batch(tasks_path, out, gw.port, tmp_path / "batch1.log")
    try:
        _wait_lines(out, 60, batch)
        _wait_running(state / "clawgate.db")
        # Everything dies at once: the gateway with runs queued and running, the client mid-flight.
        gw.kill()
        _kill(batch)
        done_before = len(_results(out))
        assert done_before < n
        gw.start()  # the same port and state dir
        batch = _start_batch(tasks_path, out, gw.port, tmp_path / "batch2.log")
        assert batch.wait(timeout=90) == 0, (tmp_path / "batch2.log").read_text()
    finally:
        _kill(batch)
    assert gw.stop()[0] == 0
    lines = _results(out)
    interrupted = _check_exactly_once(state / "clawgate.db", tasks, lines)
    # Runs cut off while running were retried under a new key, and counted.
    retried_lines = [line for line in lines if ":retry" in str(line["runId"]) or line["attempts"] > 1]
    assert interrupted > 0
    assert len(retried_lines) >= 1
    report = (tmp_path / "batch2.log").read_text()
    assert _summary_value(report, r"skipped \(done before\)") == done_before
    assert _summary_value(report, "ok") == n - done_before
    assert _summary_value(report, "retried") >= interrupted


@pytest.mark.slow
def test_gateway_killed_and_restarted_under_a_running_batch(
    tmp_path: Path, gateway_process: GatewayProcessFactory
) -> None:
    n = 300
    tasks_path = tmp_path / "tasks.jsonl"
    tasks = _crash_tasks(tasks_path, n, spawns=6)
    out = tmp_path / "results.jsonl"
    state = tmp_path / "state"
    gw = _gateway(gateway_process, state).start()
    batch = _start_batch(tasks_path, out, gw.port, tmp_path / "batch1.log")
    try:
        _wait_lines(out, 60, batch)
        _wait_running(state / "clawgate.db")
        gw.kill()
        gw.start()  # the same port and state dir
        # The same batch process rides through: reconnects, resumes, retries interrupted runs.
        assert batch.wait(timeout=90) == 0, (tmp_path / "batch1.log").read_text()
        before = out.read_bytes()
        rerun = _start_batch(tasks_path, out, gw.port, tmp_path / "batch2.log")
        assert rerun.wait(timeout=60) == 0
        assert out.read_bytes() == before
    finally:
        _kill(batch)
    gw.stop()
    lines = _results(out)
    interrupted = _check_exactly_once(state / "clawgate.db", tasks, lines)
    assert interrupted > 0
    assert sum(1 for line in lines if ":retry1" in str(line["runId"])) >= 1


def test_demo_runs_the_bundled_tasks_and_exits_zero() -> None:
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "clawgate.cli.demo"], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "200 runs completed" in proc.stdout
    assert _summary_value(proc.stdout, "ok") == 199
    assert _summary_value(proc.stdout, "error") == 1
    assert re.search(r"│ runs_active\s+│\s+0 │", proc.stdout)
    assert re.search(r"│ run_contexts\s+│\s+0 │", proc.stdout)
