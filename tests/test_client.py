"""The Python client against a real gateway: calls, runs, streams, waits, spawns, errors, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from clawgate.client import Client, ClientError, ConnectionLost, SyncClient
from clawgate.server.serve import RunningGateway
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle
from helpers import advance_until, wait_until


async def _collect(frames: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [frame async for frame in frames]


def _shape(frames: list[dict[str, Any]]) -> list[tuple[int, str, str | None]]:
    out = []
    for f in frames:
        p = f["payload"]
        out.append((p["seq"], p["stream"], p["data"].get("phase") or p["data"].get("delta")))
    return out


async def test_call_returns_payload(client: Client, clock: FakeClock) -> None:
    health = await client.call("health")
    assert health["ok"] is True
    assert health["ts"] == int(clock.time() * 1000)
    assert client.hello["type"] == "hello-ok"
    assert client.hello["protocol"] == 4
    assert "agent" in client.hello["features"]["methods"]


async def test_run_agent_final_and_accepted(client: Client) -> None:
    accepted: list[dict[str, Any]] = []
    final = await client.run_agent(
        "hello there", idempotency_key="cl-run-1", session_key="agent:main:cl", on_accepted=accepted.append
    )
    assert final["runId"] == "cl-run-1"
    assert final["status"] == "ok"
    assert final["result"]["payloads"][0]["text"] == "ok: hello there"
    assert len(accepted) == 1
    assert accepted[0]["status"] == "accepted"
    assert accepted[0]["runId"] == "cl-run-1"
    assert accepted[0]["sessionKey"] == "agent:main:cl"
    # The same key joins the same run: no second run, same answer.
    again = await client.run_agent("something else", idempotency_key="cl-run-1", session_key="agent:main:cl")
    assert again["runId"] == "cl-run-1"
    assert again["result"]["payloads"][0]["text"] == "ok: hello there"


async def test_stream_agent_yields_the_run_events_in_order(client: Client) -> None:
    frames = await _collect(client.stream_agent("[[reply:abcdef]] [[chunks:3]]", idempotency_key="cl-s1"))
    assert _shape(frames) == [
        (1, "lifecycle", "start"),
        (2, "assistant", "ab"),
        (3, "assistant", "cd"),
        (4, "assistant", "ef"),
        (5, "lifecycle", "end"),
    ]
    assert frames[3]["payload"]["data"]["text"] == "abcdef"
    assert {f["payload"]["runId"] for f in frames} == {"cl-s1"}
    # stream(run_id) after the run ended replays what this connection received.
    replay = await _collect(client.stream("cl-s1", timeout=5))
    assert _shape(replay) == _shape(frames)


async def test_stream_agent_raises_request_errors(client: Client) -> None:
    with pytest.raises(ClientError) as info:
        await _collect(client.stream_agent("hi", idempotency_key="k", session_key="not-a-key"))
    assert info.value.code == "INVALID_REQUEST"


async def test_stream_follows_a_run_started_by_another_connection(
    gateway: RunningGateway, client: Client
) -> None:
    session = "agent:main:watched"
    async with Client(gateway.url, max_reconnect_attempts=0) as watcher:
        collector = asyncio.create_task(
            _collect(watcher.stream("cl-other-1", session_key=session, timeout=10))
        )
        await wait_until(
            lambda: gateway.gateway.bus.session_subs.get(session) is not None, "the watcher's subscription"
        )
        final = await client.run_agent(
            "[[reply:xyz]] [[chunks:2]]", idempotency_key="cl-other-1", session_key=session
        )
        frames = await asyncio.wait_for(collector, 10)
    assert final["status"] == "ok"
    assert [seq for seq, _, _ in _shape(frames)] == [1, 2, 3, 4]
    assert _shape(frames)[0] == (1, "lifecycle", "start")
    assert _shape(frames)[-1] == (4, "lifecycle", "end")
    assert (
        "".join(f["payload"]["data"]["delta"] for f in frames if f["payload"]["stream"] == "assistant")
        == "xyz"
    )


async def test_wait_on_running_then_finished_run(
    gateway: RunningGateway, client: Client, clock: FakeClock
) -> None:
    run = asyncio.create_task(client.run_agent("[[delay:5]] slow", idempotency_key="cl-wait-1"))
    await wait_until(lambda: gateway.gateway.runs.running == 1, "the run to start")
    pending = await client.wait("cl-wait-1", timeout_ms=0)
    assert pending["status"] == "timeout"
    assert "endedAt" not in pending
    waiter = asyncio.create_task(client.wait("cl-wait-1", timeout_ms=600_000))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    # The provider's sleep starts behind the run's history read: advance once it sleeps.
    due = clock.time() + 5
    await wait_until(lambda: clock.sleeping_until(due) >= 1, "the provider's sleep")
    await clock.advance_async(5)
    done = await asyncio.wait_for(waiter, 5)
    assert done["status"] == "ok"
    assert done["endedAt"] == int(clock.time() * 1000)
    assert done["endedAt"] - done["startedAt"] == 5000
    assert (await run)["status"] == "ok"


async def test_wait_unknown_run_is_not_found_with_fields(client: Client) -> None:
    with pytest.raises(ClientError) as info:
        await client.wait("no-such-run", timeout_ms=0)
    err = info.value
    assert err.code == "NOT_FOUND"
    assert err.retryable is False
    assert err.retry_after_ms is None
    assert err.details == {"runId": "no-such-run"}
    assert "no-such-run" in err.message


async def test_spawn_and_wait_for_the_child(gateway: RunningGateway, client: Client) -> None:
    answer = await client.spawn(
        "agent:main:main", "look into it", mode="session", cleanup="keep", idempotencyKey="cl-spawn-1"
    )
    assert answer["status"] == "accepted"
    assert answer["childSessionKey"].startswith("agent:main:subagent:")
    done = await client.wait(answer["runId"], timeout_ms=10_000)
    assert done["status"] == "ok"
    history = await client.call("chat.history", {"sessionKey": answer["childSessionKey"]})
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "look into it"),
        ("assistant", "ok: look into it"),
    ]
    # Same idempotency key: the same child, not a second one.
    again = await client.spawn("agent:main:main", "look into it", mode="session", idempotencyKey="cl-spawn-1")
    assert again["runId"] == answer["runId"]
    await settle(gateway.gateway)
    listed = await client.call("subagents.list", {"sessionKey": "agent:main:main"})
    assert [r["runId"] for r in listed["runs"]] == [answer["runId"]]


async def test_unavailable_error_carries_retry_fields(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(max_tracked_runs=1)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        held = asyncio.create_task(c.run_agent("[[delay:1]]", idempotency_key="cl-hold"))
        await wait_until(lambda: rg.gateway.runs.running == 1, "the first run")
        with pytest.raises(ClientError) as info:
            await c.run_agent("refused", idempotency_key="cl-refused")
        err = info.value
        assert err.code == "UNAVAILABLE"
        assert err.retryable is True
        assert err.retry_after_ms == 1000
        assert "maxTrackedRuns 1" in err.details["reason"]
        # The held run may not have reached its provider's sleep yet (its history read is a
        # store round trip): an advance before that sleep starts would be lost on it, so move
        # the clock until the run ends rather than once.
        await advance_until(clock, held.done, "the held run to end")
        assert held.result()["status"] == "ok"


async def test_invalid_params_error_and_connection_stays_up(client: Client) -> None:
    with pytest.raises(ClientError) as info:
        await client.call("agent.wait", {"runId": "x", "timeoutMs": -1})
    assert info.value.code == "INVALID_REQUEST"
    assert info.value.retryable is False
    assert (await client.call("health"))["ok"] is True


async def test_bad_token_is_unauthorized_without_retries(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(token="s3cret")
    bad = Client(rg.url, token="wrong", max_reconnect_attempts=5)
    with pytest.raises(ClientError) as info:
        await bad.connect()
    assert info.value.code == "UNAUTHORIZED"
    assert bad.connects == 0
    async with Client(rg.url, token="s3cret", max_reconnect_attempts=0) as good:
        assert (await good.call("health"))["ok"] is True


async def test_reconnects_after_the_gateway_restarts_on_the_same_port(
    start_gateway: GatewayFactory,
) -> None:
    first = await start_gateway(shutdown_grace_s=0)
    port = first.port
    client = Client(first.url, max_reconnect_attempts=0)
    await client.connect()
    try:
        assert (await client.run_agent("before", idempotency_key="cl-rc-1"))["status"] == "ok"
        await first.stop()
        await wait_until(lambda: not client.connected, "the client to notice the close")
        with pytest.raises(ConnectionLost) as info:
            await client.call("health")
        assert info.value.code == "CONNECTION_LOST"
        assert info.value.retryable is True

        second = await start_gateway(port=port, shutdown_grace_s=0)
        assert second.port == port
        final = await client.run_agent("after", idempotency_key="cl-rc-2")
        assert final["status"] == "ok"
        assert final["result"]["payloads"][0]["text"] == "ok: after"
        assert client.reconnects == 1
        # The run from before the restart is still known (same state dir).
        assert (await client.wait("cl-rc-1", timeout_ms=0))["status"] == "ok"
    finally:
        await client.close()


async def test_reconnect_with_backoff_while_the_gateway_comes_back(start_gateway: GatewayFactory) -> None:
    first = await start_gateway(shutdown_grace_s=0)
    port = first.port
    client = Client(first.url, max_reconnect_attempts=8)
    await client.connect()
    try:
        await first.stop()
        await wait_until(lambda: not client.connected, "the client to notice the close")
        call = asyncio.create_task(client.call("health"))
        await asyncio.sleep(0.25)  # the call is retrying its connect with backoff meanwhile
        assert not call.done()
        await start_gateway(port=port, shutdown_grace_s=0)
        assert (await asyncio.wait_for(call, 30))["ok"] is True
        assert client.reconnects == 1
    finally:
        await client.close()


async def test_closed_client_fails_fast(gateway: RunningGateway) -> None:
    client = Client(gateway.url)
    await client.connect()
    await client.close()
    with pytest.raises(ConnectionLost):
        await client.call("health")


async def test_sync_client(gateway: RunningGateway) -> None:
    def script() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
        with SyncClient(gateway.url, max_reconnect_attempts=0) as c:
            final = c.run_agent("sync hello", idempotency_key="cl-sync-1")
            waited = c.wait("cl-sync-1", 0)
            health = c.call("health")
            try:
                c.wait("missing", 0)
            except ClientError as exc:
                code = exc.code
            else:
                code = "no error"
        return final, waited, health, code

    # The gateway runs on this loop: the blocking client must run in another thread.
    final, waited, health, code = await asyncio.to_thread(script)
    assert final["status"] == "ok"
    assert final["result"]["payloads"][0]["text"] == "ok: sync hello"
    assert waited["status"] == "ok"
    assert health["ok"] is True
    assert code == "NOT_FOUND"
