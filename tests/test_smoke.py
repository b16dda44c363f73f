"""End-to-end smoke: handshake, one run, status sizes back to baseline."""

from __future__ import annotations

from clawgate.client import Client
from clawgate.server.serve import RunningGateway
from conftest import settle


async def test_one_run_round_trip(gateway: RunningGateway, client: Client) -> None:
    final = await client.run_agent("hello there", idempotency_key="smoke-1")
    assert final["status"] == "ok"
    assert final["result"]["payloads"][0]["text"] == "ok: hello there"
    await settle(gateway.gateway)
    status = await client.status()
    assert status["state"]["runs_active"] == 0
    assert status["state"]["run_contexts"] == 0
    history = await client.call("chat.history", {"sessionKey": "agent:main:main"})
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
