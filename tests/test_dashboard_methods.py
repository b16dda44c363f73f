"""`runs.list` (bounded pages of runs, both stores) and the `/ui` static files, over the real server."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from clawgate.client import Client, ClientError
from clawgate.server.serve import RunningGateway
from clawgate.store.base import Store
from clawgate.store.records import RunRecord
from clawgate.store.redis_store import RedisStore
from clawgate.store.run_pages import RunsPageQuery
from clawgate.store.sqlite import SqliteStore
from clawgate.testing.redis import drop_redis_prefix
from conftest import REDIS_URL, GatewayFactory, settle, unique_prefix


async def _run(client: Client, run_id: str, message: str, session: str = "agent:main:main") -> None:
    await client.call_final("agent", {"message": message, "idempotencyKey": run_id, "sessionKey": session})


async def _all_pages(client: Client, **params: object) -> list[dict[str, object]]:
    runs: list[dict[str, object]] = []
    cursor: str | None = None
    for _ in range(50):
        page = await client.call("runs.list", {**params, **({"cursor": cursor} if cursor else {})})
        runs += page["runs"]
        cursor = page["cursor"]
        if cursor is None:
            return runs
    raise AssertionError("runs.list never returned a last page")


async def test_runs_list_pages_newest_first_without_gaps_or_repeats(
    client: Client, gateway: RunningGateway
) -> None:
    for i in range(5):
        await _run(client, f"r{i}", f"hello {i}", "agent:main:a" if i % 2 else "agent:main:b")
    await settle(gateway.gateway)

    first = await client.call("runs.list", {"limit": 2})
    assert [r["runId"] for r in first["runs"]] == ["r4", "r3"]
    assert first["cursor"] is not None
    everything = await _all_pages(client, limit=2)
    assert [r["runId"] for r in everything] == ["r4", "r3", "r2", "r1", "r0"]
    row = everything[0]
    assert row["status"] == "ok" and row["sessionKey"] == "agent:main:b" and row["message"] == "hello 4"
    assert isinstance(row["result"], str) and row["result"]
    assert isinstance(row["acceptedAt"], int) and isinstance(row["endedAt"], int)


async def test_runs_list_filters_by_status_session_and_prefix(
    client: Client, gateway: RunningGateway
) -> None:
    await _run(client, "batch:t1", "fine", "agent:main:batch:t1")
    await _run(client, "batch:t2", "[[error:model exploded]] no", "agent:main:batch:t2")
    await _run(client, "other", "fine", "agent:main:main")
    await settle(gateway.gateway)

    failed = await _all_pages(client, status="error")
    assert [(r["runId"], r["status"]) for r in failed] == [("batch:t2", "error")]
    assert "model exploded" in str(failed[0]["error"])
    assert [r["runId"] for r in await _all_pages(client, runIdPrefix="batch:")] == ["batch:t2", "batch:t1"]
    assert [r["runId"] for r in await _all_pages(client, sessionKey="agent:main:main")] == ["other"]
    assert await _all_pages(client, status="active") == []
    assert len(await _all_pages(client, status="finished")) == 3


async def test_runs_list_shows_a_run_in_flight_as_active(client: Client, gateway: RunningGateway) -> None:
    await client.call(
        "chat.send", {"sessionKey": "agent:main:main", "message": "[[stall]]", "idempotencyKey": "slow"}
    )
    page = await client.call("runs.list", {"status": "active"})
    assert [(r["runId"], r["status"]) for r in page["runs"]] in ([("slow", "queued")], [("slow", "running")])
    await client.call("agent.abort", {"runId": "slow"})


async def test_runs_list_rejects_bad_params(client: Client) -> None:
    for bad in ({"status": "exploded"}, {"limit": 0}, {"limit": 201}, {"sessionKey": "not a key"}):
        with pytest.raises(ClientError) as info:
            await client.call("runs.list", bad)
        assert info.value.code == "INVALID_REQUEST"
    # A cursor the store did not make starts from the first page instead of failing.
    assert (await client.call("runs.list", {"cursor": "garbage"}))["runs"] == []


async def test_runs_list_is_a_read_method(gateway: RunningGateway) -> None:
    async with Client(gateway.url, scopes=["operator.read"], max_reconnect_attempts=0) as reader:
        assert (await reader.call("runs.list", {}))["cursor"] is None


# -- the store method, on both stores ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "redis":
        redis_url = REDIS_URL
        probe = aioredis.from_url(redis_url)
        try:
            await probe.ping()
        except Exception as exc:  # pragma: no cover - depends on the machine
            pytest.skip(f"no Redis at {redis_url}: {exc}")
        finally:
            await probe.aclose()
        prefix = unique_prefix()
        rs = RedisStore(redis_url, prefix=prefix)
        await rs.open()
        try:
            yield rs
        finally:
            await rs.close()
            await drop_redis_prefix(redis_url, prefix)
        return
    s = SqliteStore(tmp_path / "s.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _rec(i: int, status: str) -> RunRecord:
    now = time.time()
    final = status not in ("queued", "running")
    return RunRecord(
        run_id=f"run-{i:03d}",
        session_key="agent:main:even" if i % 2 == 0 else "agent:main:odd",
        agent_id="main",
        message=f"m{i}",
        status=status,  # type: ignore[arg-type]
        accepted_at=now,
        ended_at=now if final else None,
    )


async def test_page_runs_scan_is_bounded_and_the_cursor_goes_on(store: Store) -> None:
    for i in range(30):
        await store.put_run(_rec(i, "error" if i == 3 else "ok"))
    await store.flush()

    # A filter that matches one record in 30, scanning 7 per page: short pages, then the match.
    query = RunsPageQuery(limit=5, status="error", scan=7)
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        page = await store.page_runs(dataclasses.replace(query, cursor=cursor))
        pages += 1
        assert len(page.runs) <= 5
        seen += [r.run_id for r in page.runs]
        cursor = page.cursor
        if cursor is None:
            break
    assert seen == ["run-003"]
    assert pages >= 30 // 7  # each page looked at no more than 7 records

    unfiltered: list[str] = []
    cursor = None
    while True:
        page = await store.page_runs(RunsPageQuery(limit=4, cursor=cursor, session_key="agent:main:even"))
        unfiltered += [r.run_id for r in page.runs]
        if (cursor := page.cursor) is None:
            break
    assert sorted(unfiltered) == [f"run-{i:03d}" for i in range(0, 30, 2)]
    assert len(set(unfiltered)) == 15


async def test_page_runs_lists_runs_in_flight(store: Store) -> None:
    await store.put_run(_rec(1, "ok"))
    await store.put_run(_rec(2, "running"))
    await store.flush()
    active = await store.page_runs(RunsPageQuery(limit=10, status="active"))
    assert [r.run_id for r in active.runs] == ["run-002"]


# -- the static files -----------------------------------------------------------------------------------


async def test_ui_is_served_from_the_package_with_a_strict_policy(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        redirect = await http.get("/ui")
        assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"
        page = await http.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="app.js"' in page.text
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "connect-src 'self'" in policy
        for name in ("app.js", "gateway.js", "charts.js"):
            script = await http.get(f"/ui/{name}")
            assert script.status_code == 200
            assert script.headers["content-type"].startswith("text/javascript")
        assert (await http.get("/ui/style.css")).headers["content-type"].startswith("text/css")
        # Only the package's own files: nothing else on disk, no Python sources.
        for missing in ("/ui/__init__.py", "/ui/..%2F..%2Fsettings.py", "/ui/nothing.js"):
            assert (await http.get(missing)).status_code == 404


async def test_ui_refuses_a_foreign_origin_and_a_rebound_host(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway()
    async with httpx.AsyncClient(base_url=rg.http_url) as http:
        assert (await http.get("/ui/", headers={"Host": f"evil.example:{rg.port}"})).status_code in (
            400,
            403,
            421,
        )


# -- run labels (the batch a run belongs to) --------------------------------------------------------------


async def test_a_run_keeps_its_label_and_runs_list_filters_by_it(
    client: Client, gateway: RunningGateway
) -> None:
    for run_id, label in (("a1", "batch:nightly"), ("a2", "batch:weekly"), ("a3", None)):
        params = {"message": "hi", "idempotencyKey": run_id, **({"label": label} if label else {})}
        await client.call_final("agent", params)
    await settle(gateway.gateway)
    labelled = await _all_pages(client, label="batch:nightly")
    assert [(r["runId"], r["label"]) for r in labelled] == [("a1", "batch:nightly")]
    unlabelled = next(r for r in await _all_pages(client) if r["runId"] == "a3")
    assert "label" not in unlabelled


async def test_clawgate_batch_labels_its_runs_with_the_tasks_file(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    import io
    import json

    from rich.console import Console

    from clawgate.batch import BatchOptions, run_batch

    tasks = tmp_path / "nightly.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "message": f"task {i}"}) + "\n" for i in range(3)))
    opts = BatchOptions(concurrency=2, connections=1, progress=False)
    summary = await run_batch(tasks, url=gateway.url, options=opts, console=Console(file=io.StringIO()))
    assert summary.ok == 3
    async with Client(gateway.url, max_reconnect_attempts=0) as c:
        runs = await _all_pages(c, label="batch:nightly")
    assert sorted(r["runId"] for r in runs) == ["batch:t0", "batch:t1", "batch:t2"]
