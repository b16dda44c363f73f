"""Guards for what the performance work relies on: behaviour only, never wall-clock speed.

- The real `clawgate gateway --store sqlite --provider scripted` process, once it
  answers /healthz, has imported none of the heavy modules it does not use.
- A device proof still verifies after `cryptography` became a lazy import.
- Frames queued together reach the client in order, each once, as separate messages
  (the writer batches several into one transport write).
- The SQLite writer hands a loop turn's operations over together, and an awaited
  write is still committed (readable from another connection) when it resolves; an op
  that fails in a batch fails alone, and the ops around it are applied exactly once.
- Lanes keep FIFO order and removal when they grow from a list into a deque.
- A `clawgate gateway` process applies its collector policy; an in-process gateway does not.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from clawgate.client import Client
from clawgate.errors import StoreError
from clawgate.protocol.device import build_device_payload_v3, derive_device_id, verify_device_signature
from clawgate.runs.lanes import SMALL_LANE, _Lane
from clawgate.server.sendbuffer import SendBuffer
from clawgate.store.records import RunRecord
from clawgate.store.sqlite import SqliteStore
from clawgate.testing import clean_env, free_port
from conftest import GatewayFactory, GatewayProcessFactory
from helpers import HEAVY

# Runs the CLI entry point exactly as `clawgate gateway ...` does, in this process, and
# prints the loaded top-level modules once /healthz answers 200.
PROBE = """
import json, os, sys, threading, time, urllib.request

port = sys.argv[1]

def watch():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    print("MODULES " + json.dumps(sorted({n.split(".")[0] for n in list(sys.modules)})), flush=True)
    os._exit(0)

threading.Thread(target=watch, daemon=True).start()
sys.argv = ["clawgate", "gateway", "--store", "sqlite", "--provider", "scripted", "--port", port,
            "--state-dir", sys.argv[2], "--log-level", "warning"]
from clawgate.cli.main import main
main()
"""


def test_gateway_command_imports_no_heavy_module(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(free_port()), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=90,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, out.stdout + out.stderr
    loaded = set(json.loads(lines[-1].removeprefix("MODULES ")))
    assert {"clawgate", "uvicorn", "starlette"} <= loaded  # it really served
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_device_proof_verifies_with_lazy_cryptography() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    public = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    device_id = derive_device_id(public)
    payload = build_device_payload_v3(
        device_id=device_id,
        client_id="cli",
        client_mode="cli",
        role="operator",
        scopes=["operator.read"],
        signed_at_ms=1_000,
        token=None,
        nonce="n-1",
        platform=None,
        device_family=None,
    )
    signature = base64.urlsafe_b64encode(key.sign(payload.encode())).decode().rstrip("=")
    device = {"id": device_id, "publicKey": public, "signature": signature, "signedAt": 1_000, "nonce": "n-1"}
    common: dict[str, Any] = {
        "client_id": "cli",
        "client_mode": "cli",
        "role": "operator",
        "scopes": ["operator.read"],
        "token": None,
        "nonce": "n-1",
        "now_ms": 1_000,
    }
    verify_device_signature(device, **common)  # no exception: accepted
    from clawgate.errors import Unauthorized

    with pytest.raises(Unauthorized):
        verify_device_signature({**device, "signature": signature[:-4] + "AAAA"}, **common)


def test_send_buffer_pops_in_order_within_a_byte_budget() -> None:
    buf = SendBuffer(1_000_000)
    frames = [f'{{"n":{i}}}'.encode() for i in range(10)]
    for frame in frames:
        assert buf.push(frame, writer_blocked=False)
    first = buf.pop_many(3 * len(frames[0]))
    assert first == frames[:3]
    assert buf.pop_many(1) == [frames[3]]  # at least one, even over the budget
    assert buf.pop_many(10**9) == frames[4:]
    assert buf.pending_bytes == 0 and len(buf) == 0
    assert buf.pop_many(100) == []


async def test_gateway_connections_write_their_frames_batched(gateway: Any) -> None:
    """The gateway's own WebSocket protocol (server/protocols.py, a subclass of uvicorn's
    sans-I/O one) must get the batched writer: one transport write per turn, not one ASGI
    `send` and system call per frame. A check of the exact class name missed the subclass,
    and every connection silently took the per-frame path (about 60% of the gateway's CPU
    with 100 subscribers of all events)."""
    async with Client(gateway.url, max_reconnect_attempts=0) as c:
        await c.call("health")
        conns = list(gateway.gateway.connections.values())
        assert conns
        assert all(conn.frame_writer is not None and conn.frame_writer.batched for conn in conns)


async def test_batched_frames_arrive_in_order_as_separate_messages(gateway: Any) -> None:
    ws = await websockets.connect(gateway.url, ping_interval=None, open_timeout=5, close_timeout=2)
    challenge = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert challenge["event"] == "connect.challenge"
    params = {
        "minProtocol": 3,
        "maxProtocol": 4,
        "client": {"id": "cli", "version": "1", "platform": "python", "mode": "cli"},
        "role": "operator",
        "scopes": ["operator.read"],
    }
    await ws.send(json.dumps({"type": "req", "id": "c", "method": "connect", "params": params}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["ok"] is True
    # Many requests in one go: their answers are queued together and leave in few writes.
    for i in range(50):
        await ws.send(json.dumps({"type": "req", "id": f"h{i}", "method": "health", "params": {}}))
    seen: list[str] = []
    while len(seen) < 50:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("type") == "res":
            assert frame["ok"], frame
            seen.append(frame["id"])
    assert sorted(seen, key=lambda s: int(s[1:])) == [f"h{i}" for i in range(50)]
    assert len(set(seen)) == 50
    await ws.close()


async def test_sqlite_writes_of_one_turn_are_committed_when_awaited(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        records = [
            RunRecord(
                run_id=f"r{i}", session_key="agent:main:x", agent_id="main", message="m", accepted_at=1.0
            )
            for i in range(20)
        ]
        commits_before = store.commits
        # All submitted in one loop turn: one item for the writer, hence one transaction.
        results = await asyncio.gather(*(store.create_run(r, reuse_after_s=60, now=1.0) for r in records))
        assert results == [None] * 20
        assert store.commits - commits_before == 1
        # Accepted means stored: another connection sees every row once the await returned.
        with sqlite3.connect(tmp_path / "s.db") as other:
            ids = {row[0] for row in other.execute("SELECT run_id FROM runs")}
        assert ids == {f"r{i}" for i in range(20)}
        rec = await store.get_run("r7")
        assert rec is not None and msgspec.structs.asdict(rec)["run_id"] == "r7"
    finally:
        await store.close()


async def test_sqlite_close_commits_writes_submitted_in_the_same_turn(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    rec = RunRecord(run_id="late", session_key="agent:main:x", agent_id="main", message="m", accepted_at=1.0)
    store.put_run(rec)  # not awaited, still pending in this turn when close starts
    await store.close()
    with sqlite3.connect(tmp_path / "s.db") as other:
        assert other.execute("SELECT count(*) FROM runs WHERE run_id='late'").fetchone()[0] == 1


def test_lane_keeps_fifo_order_across_the_switch_to_a_deque() -> None:
    lane: _Lane[int] = _Lane(0)
    for i in range(1, 3 * SMALL_LANE):
        lane.append(i)
    lane.remove(5)
    out = []
    while len(lane):
        out.append(lane.popleft())
    assert out == [i for i in range(3 * SMALL_LANE) if i != 5]


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65_535, 65_536, 300_000])
def test_text_frame_matches_websockets_serialization(length: int) -> None:
    from websockets.frames import Frame, Opcode

    from clawgate.server.framewriter import text_frame

    data = ("\u20ac" * length).encode()[:length]
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False)


async def test_a_gateway_process_tunes_its_collector_and_an_in_process_gateway_does_not(
    gateway_process: GatewayProcessFactory, start_gateway: GatewayFactory
) -> None:
    """`clawgate gateway` freezes what start-up made and raises the young threshold
    (server/gcpolicy.py); `gc_threshold0 = 0` keeps the interpreter's defaults, and a gateway
    run inside another program never touches its host's collector."""
    host = gc.get_threshold()
    tuned = await gateway_process(settings={"shutdown_grace_s": 1}).astart()
    plain = await gateway_process(settings={"shutdown_grace_s": 1, "gc_threshold0": 0}).astart()
    try:
        for gp, want in ((tuned, 10_000), (plain, host[0])):
            async with Client(gp.url, max_reconnect_attempts=0) as c:
                mem = (await c.call("status", {}))["memory"]["gc"]
            assert mem["thresholds"] == [want, host[1], host[2]]
            assert (mem["frozen"] > 10_000) == (gp is tuned)  # the modules' objects, at least
    finally:
        await asyncio.gather(tuned.astop(), plain.astop())
    rg = await start_gateway()
    async with Client(rg.url, max_reconnect_attempts=0) as c:
        mem = (await c.call("status", {}))["memory"]["gc"]
    assert mem["thresholds"] == list(host) and gc.get_threshold() == host


async def test_a_failing_op_fails_alone_and_its_neighbours_commit_once(tmp_path: Path) -> None:
    """The writer runs a batch without per-op savepoints and, when one op fails, rolls the
    whole transaction back and runs it again with them: the failing op's own writes are
    undone, the ops around it are applied exactly once, and all of it is one commit."""
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        await store.call(lambda c: c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)"))

        def insert(v: str) -> Callable[[sqlite3.Connection], int]:
            return lambda c: int(c.execute("INSERT INTO t (v) VALUES (?)", (v,)).lastrowid or 0)

        def half_then_fail(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO t (v) VALUES ('partial')")
            raise ValueError("op bug")

        commits_before = store.commits
        # Submitted in one loop turn: one batch for the writer.
        results = await asyncio.gather(
            store.call(insert("a")),
            store.call(insert("b")),
            store.call(half_then_fail),
            store.call(insert("c")),
            return_exceptions=True,
        )
        assert results[:2] == [1, 2] and results[3] == 3, results
        assert isinstance(results[2], StoreError) and "ValueError: op bug" in str(results[2])
        assert store.commits - commits_before == 1
        with sqlite3.connect(tmp_path / "s.db") as other:
            rows = other.execute("SELECT id, v FROM t ORDER BY id").fetchall()
        assert rows == [(1, "a"), (2, "b"), (3, "c")]
        # A batch of that op alone fails the same way, and the store keeps serving.
        with pytest.raises(StoreError, match="op bug"):
            await store.call(half_then_fail)
        assert await store.call(insert("d")) == 4
    finally:
        await store.close()
