"""Security limits through a real gateway: memory bounded in bytes (reply cap, byte-bounded caches,
a default memory budget, chat.history paged under maxPayload), ping floods, pre-auth socket
exhaustion, and attachment / state-dir hardening."""

from __future__ import annotations

from typing import Any

import pytest

from clawgate.agent.replycap import TRUNCATED_MARKER
from clawgate.client import Client
from clawgate.settings import (
    MEMORY_BUDGET_CEILING,
    MEMORY_BUDGET_FLOOR,
    Settings,
    default_memory_budget,
)
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle

MiB = 1024 * 1024


def reply_text(final: dict[str, Any]) -> str:
    payloads = final["result"]["payloads"]
    return str(payloads[0]["text"]) if payloads else ""


# -- provider output is bounded per run -------------------------------------------------------------
async def test_reply_over_max_reply_bytes_is_cut_with_a_visible_marker(
    start_gateway: GatewayFactory,
) -> None:
    rg = await start_gateway(max_reply_bytes=4096)
    key = "agent:main:big"
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("[[size:100000]] [[chunks:25]]", session_key=key, idempotency_key="big-1")
        assert final["status"] == "ok"
        text = reply_text(final)
        assert text.endswith(TRUNCATED_MARKER)
        assert len(text.encode()) == 4096 + len(TRUNCATED_MARKER.encode())
        # The transcript keeps the same bounded text, not what the provider tried to send.
        await settle(rg.gateway)
        page = await c.call("chat.history", {"sessionKey": key})
        assert page["messages"][-1]["role"] == "assistant"
        assert page["messages"][-1]["content"] == text


async def test_reply_cap_cuts_on_a_character_boundary(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_reply_bytes=1025)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        # 2-byte characters: byte 1025 falls in the middle of one, which is dropped whole.
        final = await c.run_agent("[[reply:" + "é" * 2000 + "]]", idempotency_key="utf8-1")
    text = reply_text(final)
    assert text == "é" * 512 + TRUNCATED_MARKER


async def test_reply_under_the_cap_is_untouched(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(max_reply_bytes=4096)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("[[size:4096]] [[chunks:3]]", idempotency_key="fits-1")
    assert len(reply_text(final)) == 4096
    assert TRUNCATED_MARKER not in reply_text(final)


# -- caches are bounded in bytes ------------------------------------------------------------------------
async def test_run_result_cache_is_bounded_in_bytes(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(run_result_max_bytes=64 * 1024)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(12):
            final = await c.run_agent("[[size:20000]]", idempotency_key=f"cache-{i}")
            assert final["status"] == "ok"
        await settle(gw)
        assert gw.runs.results.bytes <= 64 * 1024
        assert 0 < len(gw.runs.results) < 12  # entries alone (run_result_max 5000) would keep all
        # An evicted result is still answered, from the store.
        waited = await c.call("agent.wait", {"runId": "cache-0", "timeoutMs": 0})
        assert waited["status"] == "ok"
        status = await c.call("status")
    assert status["memory"]["runResultBytes"] == gw.runs.results.bytes


async def test_session_cache_is_bounded_in_bytes(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway(session_cache_max_bytes=4096)
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(30):
            await c.call("sessions.patch", {"key": f"agent:main:s{i}", "label": "x" * 60})
    assert 0 < len(gw.sessions.cache) < 30
    assert gw.sessions.cache.bytes <= 4096


# -- the memory budget is on by default -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("total", "budget"),
    [
        (256 * MiB, 256 * MiB),  # never more than the machine has
        (1024 * MiB, MEMORY_BUDGET_FLOOR),
        (8 * 1024 * MiB, 4 * 1024 * MiB),
        (256 * 1024 * MiB, MEMORY_BUDGET_CEILING),
    ],
)
def test_default_memory_budget_is_derived_from_ram(total: int, budget: int) -> None:
    assert default_memory_budget(total) == budget


async def test_memory_budget_is_on_by_default(start_gateway: GatewayFactory) -> None:
    assert Settings().memory_budget_bytes is None
    rg = await start_gateway()
    assert rg.gateway.admission.memory_budget_bytes > 0
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        status = await c.call("status")
    assert status["memory"]["budgetBytes"] == rg.gateway.admission.memory_budget_bytes
    # 0 still turns the check off.
    off = await start_gateway(memory_budget_bytes=0)
    assert off.gateway.admission.memory_budget_bytes == 0


_ = FakeClock
