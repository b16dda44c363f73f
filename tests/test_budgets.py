"""Token budgets: per session (`sessions.patch {budgetTokens}`; new runs past it are refused with
FORBIDDEN naming the budget and the tokens used; kept in the store across restarts, on SQLite
and Redis) and per batch (`clawgate batch --budget-tokens`)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from clawgate.batch import BatchOptions, run_batch
from clawgate.client import Client, ClientError
from clawgate.store.sqlite import SqliteStore
from conftest import GatewayFactory, settle, unique_prefix

KEY = "agent:main:budget"


async def spent(c: Client, n: int, key: str = KEY, tag: str = "b") -> int:
    total = 0
    for i in range(n):
        final = await c.run_agent(f"[[reply:{'y' * 40}]]", session_key=key, idempotency_key=f"{tag}-{i}")
        assert final["status"] == "ok"
        total += final["result"]["meta"]["usage"]["total"]
    return total


async def refused(c: Client, key: str = KEY, run_id: str = "over") -> ClientError:
    with pytest.raises(ClientError) as err:
        await c.run_agent("[[reply:no]]", session_key=key, idempotency_key=run_id)
    return err.value


async def check_budget(start_gateway: GatewayFactory, **settings: Any) -> None:
    gw = await start_gateway(**settings)
    async with Client(gw.url, max_reconnect_attempts=0) as c:
        out = await c.call("sessions.patch", {"key": KEY, "budgetTokens": 1})
        assert out["budgetTokens"] == 1
        used = await spent(c, 1)  # under the budget when it starts: it runs to its end
        assert used > 1
        await settle(gw.gateway)
        err = await refused(c)
        assert err.code == "FORBIDDEN"
        assert "token budget" in err.message and f"{used} of 1 tokens" in err.message
        assert err.details["budgetTokens"] == 1 and err.details["tokensUsed"] == used
        # chat.send is refused the same way; another session is not affected.
        with pytest.raises(ClientError) as chat_err:
            await c.call("chat.send", {"sessionKey": KEY, "message": "x", "idempotencyKey": "chat-over"})
        assert chat_err.value.code == "FORBIDDEN"
        await spent(c, 1, key="agent:main:other", tag="o")
        # A larger budget lets runs in until it is used up again.
        await c.call("sessions.patch", {"key": KEY, "budgetTokens": used + 1})
        more = await spent(c, 1, tag="c")
        await settle(gw.gateway)
        err = await refused(c, run_id="over-2")
        assert f"{used + more} of {used + 1} tokens" in err.message
        # 0 removes the budget.
        await c.call("sessions.patch", {"key": KEY, "budgetTokens": 0})
        await spent(c, 1, tag="d")
        await c.call("sessions.patch", {"key": KEY, "budgetTokens": 5})
        await settle(gw.gateway)
        assert (await c.call("status"))["budgets"]["refused"] >= 3
    await gw.stop()
    # The budget and the count live in the store: a restarted gateway still refuses.
    gw2 = await start_gateway(**settings)
    async with Client(gw2.url, max_reconnect_attempts=0) as c:
        assert (await refused(c, run_id="after-restart")).code == "FORBIDDEN"


async def test_session_budget_refuses_new_runs_sqlite(start_gateway: GatewayFactory) -> None:
    await check_budget(start_gateway)


@pytest.mark.redis
async def test_session_budget_refuses_new_runs_redis(start_gateway: GatewayFactory, redis_url: str) -> None:
    await check_budget(start_gateway, store=redis_url, redis_prefix=unique_prefix())


async def test_sessions_table_without_budget_columns_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE sessions (key TEXT PRIMARY KEY, session_id TEXT NOT NULL, created_at REAL NOT NULL, "
        "updated_at REAL NOT NULL, kind TEXT NOT NULL, agent_id TEXT NOT NULL, label TEXT, model TEXT, "
        "depth INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO sessions VALUES ('agent:main:old', 'sid', 1.0, 2.0, 'main', 'main', NULL, NULL, 0)"
    )
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        meta = await store.get_session("agent:main:old")
        assert meta is not None and meta.budget_tokens is None and meta.tokens_used == 0
        await store.add_session_tokens("agent:main:old", 7)
        meta = await store.get_session("agent:main:old")
        assert meta is not None and meta.tokens_used == 7
    finally:
        await store.close()


async def test_batch_stops_submitting_at_its_budget(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await start_gateway()
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "message": f"task {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    summary = await run_batch(
        tasks,
        url=gw.url,
        out_path=out,
        options=BatchOptions(progress=False, concurrency=1, budget_tokens=1),
        console=Console(quiet=True),
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 1 and summary.completed == 1  # the first task used the budget up
    assert summary.over_budget == 5 and not summary.all_ok
    assert summary.tokens == lines[0]["usage"]["total"] >= 1
    # A rerun with a larger budget resumes where the budget stopped it.
    again = await run_batch(
        tasks,
        url=gw.url,
        out_path=out,
        options=BatchOptions(progress=False, concurrency=1, budget_tokens=10**9),
        console=Console(quiet=True),
    )
    assert again.over_budget == 0 and again.completed == 5 and again.all_ok
