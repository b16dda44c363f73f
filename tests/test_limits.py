"""Limits and hygiene: per-connection rate limit, secrets kept out of logs, file modes, key checks.

The max-connections and pending-handshake limits are covered by tests/test_protocol.py
(`test_connections_over_the_limit_get_close_1013`, `test_pending_handshakes_over_the_limit_get_close_1013`).
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from clawgate.client import Client, ClientError
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, GatewayProcessFactory, settle

SECRET = "SECRETVALUE"


async def test_rate_limit_refuses_the_sixth_request_until_the_clock_moves(
    start_gateway: GatewayFactory, clock: FakeClock
) -> None:
    rg = await start_gateway(rate_limit_per_s=5, rate_limit_burst=5)
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for _ in range(5):
            assert (await c.call("health"))["ok"] is True
        with pytest.raises(ClientError) as info:
            await c.call("health")
        err = info.value
        assert err.code == "UNAVAILABLE"
        assert err.retryable is True
        # The bucket is empty at the same (frozen) instant: one token takes 1/5 s.
        assert err.retry_after_ms is not None and 150 <= err.retry_after_ms <= 201
        # Still refused while the clock has not moved: the refusal did not refill anything.
        with pytest.raises(ClientError) as again:
            await c.call("status")
        assert again.value.code == "UNAVAILABLE"
        clock.advance(1)
        assert (await c.call("health"))["ok"] is True
        # A second connection has its own bucket.
        async with Client(rg.url, max_reconnect_attempts=0) as other:
            assert (await other.call("health"))["ok"] is True


@pytest.mark.parametrize(
    "key", ["agent:main:../x", "agent:main:a/b", "agent:../main", "agent:main:..", "../etc"]
)
async def test_path_traversal_session_keys_are_refused(start_gateway: GatewayFactory, key: str) -> None:
    rg = await start_gateway()
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        with pytest.raises(ClientError) as info:
            await c.call(
                "agent", {"message": "hi", "idempotencyKey": f"k-{abs(hash(key))}", "sessionKey": key}
            )
        assert info.value.code == "INVALID_REQUEST"
        with pytest.raises(ClientError) as spawn:
            await c.call("sessions.spawn", {"sessionKey": key, "task": "t"})
        assert spawn.value.code == "INVALID_REQUEST"
        with pytest.raises(ClientError) as hist:
            await c.call("chat.history", {"sessionKey": key})
        assert hist.value.code == "INVALID_REQUEST"
    await settle(rg.gateway)
    assert rg.gateway.runs.totals == {} or sum(rg.gateway.runs.totals.values()) == 0
    # Nothing escaped the state dir.
    state = Path(rg.gateway.settings.state_path)
    assert not (state.parent / "x").exists()


async def test_state_dir_is_0700_and_database_0600(start_gateway: GatewayFactory) -> None:
    rg = await start_gateway()
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        final = await c.run_agent("hello", idempotency_key="mode-check")
        assert final["status"] == "ok"
    await rg.gateway.store.flush()
    _check_modes(Path(rg.gateway.settings.state_path))


def _check_modes(state: Path) -> None:
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    db = state / "clawgate.db"
    assert db.exists()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for side in ("clawgate.db-wal", "clawgate.db-shm"):
        p = state / side
        if p.exists():
            # SQLite gives WAL/SHM files the database file's permissions.
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, side


async def test_token_never_appears_in_debug_logs(gateway_process: GatewayProcessFactory) -> None:
    gp = gateway_process(args=["--token", SECRET, "--log-level", "debug"], settings={"shutdown_grace_s": 1})
    await gp.astart()
    url = gp.url
    async with Client(url, token=SECRET, max_reconnect_attempts=0) as c:
        assert (await c.call("health"))["ok"] is True
        final = await c.run_agent("hi there", idempotency_key="tok-run")
        assert final["status"] == "ok"
    # A wrong token, and one that merely contains the secret, are both refused.
    for bad in ("wrong-token", SECRET + "x", "x" + SECRET):
        with pytest.raises(ClientError) as info:
            async with Client(url, token=bad, max_reconnect_attempts=0):
                pass
        assert info.value.code == "UNAUTHORIZED"
    async with Client(url, max_reconnect_attempts=0, token=SECRET) as c:
        st = await c.call("status")
        assert SECRET not in repr(st)
    _rc, text = await gp.astop()
    # The capture works (the startup lines are there), so the check below looks at real output.
    assert "gateway started" in text, text
    assert SECRET not in text


def test_print_config_redacts_the_token(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clawgate.cli.main",
            "gateway",
            "--token",
            SECRET,
            "--state-dir",
            str(tmp_path / "s"),
            "--print-config",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    text = out.stdout.decode() + out.stderr.decode()
    assert '"token": "***"' in text, text
    assert SECRET not in text
