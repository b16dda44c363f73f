"""A full filesystem, for real: the state dir on a small tmpfs the test mounts (needs root).

The free-space floor closes admission before the disk is full and opens it again once
there is room; and when a write meets ENOSPC anyway, the SQLite store is not corrupted
and no run that was accepted is lost (it is there when space is back, and after a restart).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clawgate.client import Client, ClientError
from clawgate.state.clock import FakeClock
from conftest import GatewayFactory, settle
from helpers import advance_until

MiB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted under tmp_path, unmounted at teardown."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem holding `path` until at most `leave_bytes` are free."""
    filler = path / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as fh:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free <= leave_bytes:
                break
            try:
                fh.write(chunk[: max(1, min(len(chunk), free - leave_bytes))])
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


async def test_free_space_floor_closes_and_reopens_admission(
    start_gateway: GatewayFactory, small_fs: Path
) -> None:
    rg = await start_gateway(
        state_dir=str(small_fs / "state"), maintenance_interval_s=10**8, disk_free_min_bytes=MiB
    )
    gw = rg.gateway
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        assert (await c.run_agent("[[reply:before]]", session_key="agent:main:a"))["status"] == "ok"
        filler = fill(small_fs, leave_bytes=MiB // 2)
        await gw.disk.refresh()
        with pytest.raises(ClientError) as err:
            await c.run_agent("[[reply:refused]]", session_key="agent:main:a")
        assert err.value.code == "UNAVAILABLE" and err.value.retry_after_ms
        filler.unlink()
        await gw.disk.refresh()
        assert (await c.run_agent("[[reply:after]]", session_key="agent:main:a"))["status"] == "ok"


async def test_enospc_never_corrupts_the_store_or_loses_accepted_runs(
    start_gateway: GatewayFactory, small_fs: Path, clock: FakeClock
) -> None:
    state = small_fs / "state"
    settings = {"state_dir": str(state), "maintenance_interval_s": 10**8, "disk_free_min_bytes": 0}
    rg = await start_gateway(**settings)
    gw = rg.gateway
    accepted: list[str] = []
    refused = 0
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        for i in range(5):
            answer = await c.run_agent(f"[[reply:early {i}]]", session_key=f"agent:main:e{i}")
            accepted.append(answer["runId"])
        # Accepted (durably) before the disk fills up, ends after: its end cannot be written.
        inflight = asyncio.create_task(
            c.run_agent("[[delay:5]] slow", session_key="agent:main:slow", idempotency_key="slow")
        )
        while not gw.runs.running:
            await asyncio.sleep(0.005)
        await gw.store.flush()
        filler = fill(small_fs)
        await advance_until(clock, inflight.done, "the slow run to end", step_s=5)
        inflight.result()
        accepted.append("slow")
        for i in range(60):  # big answers: the WAL must grow, and cannot
            try:
                answer = await c.run_agent("[[size:20000]]", session_key=f"agent:main:full{i}")
            except ClientError as exc:
                # The failed transaction is refused as a whole, retryably: nothing half-written.
                assert exc.code == "UNAVAILABLE" and "disk is full" in exc.message, exc
                refused += 1
                continue
            accepted.append(answer["runId"])
        assert refused > 0, "the filesystem never filled up"
        filler.unlink()
        # Space is back: the same gateway accepts and records work again.
        answer = await c.run_agent("[[reply:later]]", session_key="agent:main:later")
        assert answer["status"] == "ok"
        accepted.append(answer["runId"])
        await settle(gw)
    for run_id in accepted:
        assert await gw.store.get_run(run_id) is not None, run_id
    await rg.stop()

    db = sqlite3.connect(state / "clawgate.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    rg2 = await start_gateway(**settings)
    for run_id in accepted:
        assert await rg2.gateway.store.get_run(run_id) is not None, run_id
    # The run whose end was lost to ENOSPC is not lost: it has an end after the restart.
    await settle(rg2.gateway)
    slow = await rg2.gateway.store.get_run("slow")
    assert slow is not None and slow.is_final
