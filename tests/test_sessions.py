"""Sessions and transcripts through a real gateway and a real SQLite file: history across a
restart, sessions.list filters, patch / reset / delete."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clawgate.client import Client, ClientError
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle
from helpers import advance_until


async def history(c: Client, key: str, limit: int | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"sessionKey": key}
    if limit is not None:
        params["limit"] = limit
    answer = await c.call("chat.history", params)
    assert answer["sessionKey"] == key
    messages: list[dict[str, Any]] = answer["messages"]
    return messages


async def listed(c: Client, **params: Any) -> dict[str, dict[str, Any]]:
    answer = await c.call("sessions.list", params)
    return {s["key"]: s for s in answer["sessions"]}


async def test_transcript_survives_restart(start_gateway: GatewayFactory, clock: FakeClock) -> None:
    key = "agent:main:durable"
    rg1 = await start_gateway()
    async with Client(rg1.url, max_reconnect_attempts=0) as c:
        await c.run_agent("[[reply:first answer]]", session_key=key, idempotency_key="d-1")
        clock.advance(5)
        await c.run_agent("[[error:went wrong]]", session_key=key, idempotency_key="d-2")
        clock.advance(5)
        await c.run_agent("third [[chunks:2]]", session_key=key, idempotency_key="d-3")
        before = await history(c, key)
        sessions_before = await listed(c)
    await rg1.stop()

    assert [(m["role"], m["content"], m.get("runId")) for m in before] == [
        ("user", "[[reply:first answer]]", "d-1"),
        ("assistant", "first answer", "d-1"),
        ("user", "[[error:went wrong]]", "d-2"),  # a failed run keeps its question, has no answer
        ("user", "third [[chunks:2]]", "d-3"),
        ("assistant", "ok: third", "d-3"),
    ]
    start = int(clock.time() * 1000) - 10_000
    assert [m["ts"] for m in before] == [start, start, start + 5000, start + 10_000, start + 10_000]

    rg2 = await start_gateway()
    async with Client(rg2.url, max_reconnect_attempts=0) as c:
        assert await history(c, key) == before
        assert await history(c, key, limit=2) == before[-2:]
        sessions_after = await listed(c)
        assert sessions_after[key] == sessions_before[key]
        assert sessions_after[key]["kind"] == "other"
        # The restored session goes on: the next run is appended after the old messages.
        await c.run_agent("[[reply:fourth]]", session_key=key, idempotency_key="d-4")
        after = await history(c, key)
        assert after[:5] == before
        assert [(m["role"], m["content"]) for m in after[5:]] == [
            ("user", "[[reply:fourth]]"),
            ("assistant", "fourth"),
        ]
        same = (await listed(c))[key]
        assert same["sessionId"] == sessions_before[key]["sessionId"]
        assert same["createdAt"] == sessions_before[key]["createdAt"]


async def test_sessions_list_filters(gateway: RunningGateway, client: Client, clock: FakeClock) -> None:
    t0 = clock.time()
    await client.run_agent("old", session_key="agent:alpha:old", idempotency_key="f-1")
    clock.advance(20 * 60)
    await client.run_agent("recent", session_key="agent:alpha:recent", idempotency_key="f-2")
    clock.advance(60)
    await client.run_agent("beta", session_key="agent:beta:main", idempotency_key="f-3")

    everything = await client.call("sessions.list", {})
    # Most recently updated first.
    assert [s["key"] for s in everything["sessions"]] == [
        "agent:beta:main",
        "agent:alpha:recent",
        "agent:alpha:old",
    ]
    old = {s["key"]: s for s in everything["sessions"]}["agent:alpha:old"]
    assert old["createdAt"] == old["updatedAt"] == int(t0 * 1000)
    assert isinstance(old["sessionId"], str) and old["sessionId"]
    assert {s["key"]: s["kind"] for s in everything["sessions"]} == {
        "agent:beta:main": "main",
        "agent:alpha:recent": "other",
        "agent:alpha:old": "other",
    }

    assert set(await listed(client, activeMinutes=10)) == {"agent:alpha:recent", "agent:beta:main"}
    assert set(await listed(client, activeMinutes=0.5)) == {"agent:beta:main"}
    assert set(await listed(client, prefix="agent:alpha:")) == {"agent:alpha:old", "agent:alpha:recent"}
    assert set(await listed(client, prefix="agent:alpha:", activeMinutes=10)) == {"agent:alpha:recent"}
    assert set(await listed(client, prefix="agent:gamma:")) == set()
    # A prefix is a prefix, not a pattern.
    assert set(await listed(client, prefix="agent:%")) == set()
    assert len((await client.call("sessions.list", {"limit": 2}))["sessions"]) == 2

    with pytest.raises(ClientError) as info:
        await client.call("sessions.list", {"activeMinutes": -1})
    assert info.value.code == "INVALID_REQUEST"


async def test_patch_reset_delete(gateway: RunningGateway, client: Client, clock: FakeClock) -> None:
    key = "agent:main:work"
    await client.run_agent("[[reply:one]]", session_key=key, idempotency_key="p-1")
    original = (await listed(client))[key]
    assert "label" not in original

    clock.advance(10)
    assert await client.call("sessions.patch", {"key": key, "label": "important"}) == {"ok": True, "key": key}
    patched = (await listed(client))[key]
    assert patched["label"] == "important"
    assert patched["sessionId"] == original["sessionId"]
    assert patched["updatedAt"] == original["updatedAt"] + 10_000
    # A run afterwards keeps the label.
    await client.run_agent("[[reply:two]]", session_key=key, idempotency_key="p-2")
    assert (await listed(client))[key]["label"] == "important"
    assert len(await history(client, key)) == 4

    assert await client.call("sessions.reset", {"key": key}) == {"ok": True, "key": key}
    reset = (await listed(client))[key]
    assert reset["sessionId"] != original["sessionId"]
    assert reset["label"] == "important"
    assert await history(client, key) == []
    # The reset session is used afresh.
    await client.run_agent("[[reply:three]]", session_key=key, idempotency_key="p-3")
    assert [m["content"] for m in await history(client, key)] == ["[[reply:three]]", "three"]

    assert await client.call("sessions.delete", {"key": key}) == {"ok": True, "key": key, "deleted": True}
    assert key not in await listed(client)
    assert await history(client, key) == []
    # Deleted means deleted: the next run starts a new session with a new id and no label.
    await client.run_agent("[[reply:four]]", session_key=key, idempotency_key="p-4")
    reborn = (await listed(client))[key]
    assert reborn["sessionId"] not in (original["sessionId"], reset["sessionId"])
    assert "label" not in reborn
    assert [m["content"] for m in await history(client, key)] == ["[[reply:four]]", "four"]

    with pytest.raises(ClientError) as info:
        await client.call("sessions.reset", {"key": "agent:main:never-was"})
    assert info.value.code == "NOT_FOUND"
    # Deleting is idempotent: a second delete, or one of a key never used, is not an error.
    gone = {"ok": True, "key": key, "deleted": False}
    assert await client.call("sessions.delete", {"key": "agent:main:never-was"}) == {
        **gone,
        "key": "agent:main:never-was",
    }
    assert await client.call("sessions.delete", {"key": key}) == {"ok": True, "key": key, "deleted": True}
    assert await client.call("sessions.delete", {"key": key}) == gone
    with pytest.raises(ClientError) as info:
        await client.call("sessions.patch", {"key": "not a key", "label": "x"})
    assert info.value.code == "INVALID_REQUEST"
    assert "agent:main:never-was" not in await listed(client)


async def test_reset_and_delete_refused_while_a_run_is_active(
    gateway: RunningGateway, client: Client, clock: FakeClock
) -> None:
    key = "agent:main:busy"
    task = asyncio.create_task(
        client.run_agent("[[delay:1]][[reply:done]]", session_key=key, idempotency_key="b-1")
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while gateway.gateway.runs.running == 0:
        assert loop.time() < deadline
        await asyncio.sleep(0.002)
    for method in ("sessions.reset", "sessions.delete"):
        with pytest.raises(ClientError) as info:
            await client.call(method, {"key": key})
        assert info.value.code == "FORBIDDEN"
        assert info.value.details == {"runId": "b-1"}
    # The provider's sleep starts behind the run's history read: one advance made before it
    # would be lost on it.
    await advance_until(clock, task.done, "the run to end")
    assert task.result()["status"] == "ok"
    await settle(gateway.gateway)
    assert [m["content"] for m in await history(client, key)] == ["[[delay:1]][[reply:done]]", "done"]
    assert await client.call("sessions.delete", {"key": key}) == {"ok": True, "key": key, "deleted": True}
