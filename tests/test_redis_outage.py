"""Faults from outside: the store's Redis goes away and comes back.

Each test runs its own `redis-server` (AOF, `appendfsync always`) on a free loopback port,
and gateway processes on it. The outage test restarts that Redis mid-batch; the partition
test puts a TCP proxy between one gateway and Redis and cuts it for longer than the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from clawgate.client import Client, ClientError
from clawgate.errors import StoreError
from clawgate.protocol.constants import INTERRUPTED
from clawgate.runs.endwrite import FIRST_DELAY_S, MAX_DELAY_S, next_delay
from clawgate.scaleout import redis_io
from clawgate.scaleout.redis_io import pause_s
from clawgate.store import redis_store
from clawgate.store.records import RunRecord
from clawgate.store.redis_store import RedisStore, persistence_of
from clawgate.testing import GatewayProcess, free_port
from helpers import poll_until

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]

PREFIX = "outage"


class RedisServer:
    """A `redis-server` of our own: AOF with fsync on every write, on a fixed dir and port."""

    def __init__(self, data_dir: Path, *, persist: bool = True) -> None:
        self.dir = data_dir
        self.persist = persist
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115, ASYNC230 - the child keeps it open
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starts at once; waiting is below
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always", "--save", "",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = aioredis.from_url(self.url)
        try:
            for _ in range(400):
                with contextlib.suppress(Exception):
                    if await client.ping():
                        return
                await asyncio.sleep(0.025)
        finally:
            await client.aclose()
        raise AssertionError("redis-server did not start")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    await server.start()
    try:
        yield server
    finally:
        server.stop()


def gateway(tmp: Path, name: str, redis_url: str, **settings: object) -> GatewayProcess:
    (tmp / name).mkdir(exist_ok=True)
    return GatewayProcess(
        tmp / name,
        settings={"store": redis_url, "redis_prefix": PREFIX, "shutdown_grace_s": 2, **settings},
        log_path=tmp / f"{name}.log",
    )


async def stored_runs(redis_url: str, run_ids: list[str]) -> dict[str, RunRecord | None]:
    import msgspec

    client = aioredis.from_url(redis_url)
    try:
        raws = await client.mget([f"{PREFIX}:run:{r}" for r in run_ids])
    finally:
        await client.aclose()
    return {
        r: msgspec.json.decode(raw, type=RunRecord) if raw else None
        for r, raw in zip(run_ids, raws, strict=True)
    }


async def readyz(gw: GatewayProcess) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{gw.http_url}/readyz", timeout=10)).status_code


async def submit(
    client: Client, message: str, session: str, run_id: str, accepted: set[str]
) -> dict[str, Any]:
    return await client.run_agent(
        message, session_key=session, idempotency_key=run_id, on_accepted=lambda _p: accepted.add(run_id)
    )


@pytest.mark.timeout(120)
async def test_redis_restart_mid_batch_loses_no_accepted_run(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    gw = gateway(tmp_path, "gw", redis_server.url)
    await gw.astart()
    accepted: set[str] = set()
    try:
        async with Client(gw.url, max_reconnect_attempts=0) as c:
            ids = [f"b{i}" for i in range(24)]
            batch = [
                asyncio.create_task(submit(c, "[[delay:1.5]] w", f"agent:main:o{i % 8}", rid, accepted))
                for i, rid in enumerate(ids)
            ]
            await asyncio.sleep(0.7)  # the first runs are executing
            # At the least (a loaded machine can take longer): 8 runs accepted (checked below)
            # and one executing, so the outage comes mid-batch.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while len(accepted) < 8 or not (await c.status())["runs"]["active"]:
                assert loop.time() < deadline, f"{len(accepted)} runs accepted, none executing"
                await asyncio.sleep(0.01)
            redis_server.stop(signal.SIGKILL)
            down_at = time.monotonic()
            # New work is refused as retryable UNAVAILABLE, and the gateway says it is not ready.
            refused: list[ClientError] = []
            for i in range(3):
                with pytest.raises(ClientError) as info:
                    await submit(c, "w", "agent:main:during", f"d{i}", accepted)
                refused.append(info.value)
            assert {(e.code, e.retryable) for e in refused} == {("UNAVAILABLE", True)}, refused
            assert all(e.retry_after_ms for e in refused)
            assert await readyz(gw) == 503
            status = await c.status()
            assert status["store"]["up"] is False and status["store"]["lastError"], status["store"]
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))  # a 3 s outage
            await redis_server.start()
            finals = await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 60)
            # The gateway came back by itself.
            for _ in range(200):
                if await readyz(gw) == 200:
                    break
                await asyncio.sleep(0.05)
            assert await readyz(gw) == 200
            status = await c.status()
            assert status["store"]["up"] is True and status["store"]["reconnects"] >= 1, status["store"]
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{gw.http_url}/metrics", timeout=10)).text
            assert "clawgate_store_up 1" in metrics and "clawgate_store_reconnects_total" in metrics
            # A run refused during the outage was never accepted; one accepted before it all ended once.
            assert not {"d0", "d1", "d2"} & accepted
            answered = {
                rid: f for rid, f in zip(ids, finals, strict=True) if not isinstance(f, BaseException)
            }
            assert set(answered) >= accepted & set(ids), (accepted, finals)
            stored = await stored_runs(redis_server.url, sorted(accepted))
            for rid in accepted:
                rec = stored[rid]
                assert rec is not None and rec.is_final, (rid, rec)
                assert (rec.status, rec.error) == (answered[rid]["status"], answered[rid].get("error")), rid
            # Every end counted once, by the one process that wrote it.
            assert sum(status["runs"]["byStatus"].values()) == len(accepted), status["runs"]
            assert len(accepted) >= 8
            ended = sum(1 for rid in accepted if stored[rid] is not None)
            print(f"outage: accepted={len(accepted)} ended={ended} refused={len(refused)} outage_s=3")
    finally:
        gw.stop()
    assert "Traceback" not in gw.log(200_000), gw.log()


@pytest.mark.timeout(60)
async def test_a_redis_that_persists_nothing_is_warned_about_at_start(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "volatile", persist=False)
    await server.start()
    gw = gateway(tmp_path, "gw", server.url)
    try:
        await gw.astart()
        assert "persists nothing" in gw.log(200_000)
    finally:
        gw.stop()
        server.stop()


@pytest.mark.timeout(60)
async def test_an_aof_redis_is_not_warned_about(tmp_path: Path, redis_server: RedisServer) -> None:
    gw = gateway(tmp_path, "gw", redis_server.url)
    try:
        await gw.astart()
        async with Client(gw.url, max_reconnect_attempts=0) as c:
            assert (await c.run_agent("hi", session_key="agent:main:aof"))["status"] == "ok"
        assert "persists nothing" not in gw.log(200_000)
    finally:
        gw.stop()


class Proxy:
    """A TCP proxy on loopback between one gateway and Redis. `cut()` drops every open
    connection and closes new ones at once (the gateway sees a broken network); `heal()`
    lets connections through again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if not self.open:
                        break
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.open = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def heal(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


class Ends:
    """Terminal lifecycle events per run, as seen by a subscriber of all sessions."""

    def __init__(self) -> None:
        self.by_run: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, frame: dict[str, Any]) -> None:
        payload = frame.get("payload") or {}
        data = payload.get("data") or {}
        if frame.get("event") != "agent" or payload.get("stream") != "lifecycle":
            return
        if data.get("phase") in ("end", "error") and not data.get("willRetry"):
            self.by_run.setdefault(payload["runId"], []).append(data)


@pytest.mark.timeout(150)
async def test_a_partitioned_gateway_loses_its_runs_once_and_rejoins(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    proxy = Proxy(redis_server.port)
    await proxy.start()
    fast = {"cluster_lease_s": 2, "cluster_claim_idle_s": 2}
    a = gateway(tmp_path, "a", f"redis://127.0.0.1:{proxy.port}/0", **fast)
    b = gateway(tmp_path, "b", redis_server.url, **fast)
    await a.astart()
    ends = Ends()
    try:
        async with Client(a.url, max_reconnect_attempts=0) as ca:
            # A alone takes the first run of every session, then B joins.
            ids = [f"p{i}" for i in range(16)]
            accepted: set[str] = set()
            batch = [
                asyncio.create_task(submit(ca, "[[delay:6]] w", f"agent:main:p{i % 8}", rid, accepted))
                for i, rid in enumerate(ids)
            ]
            for _ in range(1000):
                if (await ca.status())["cluster"]["servingSessions"] == 8:
                    break
                await asyncio.sleep(0.01)
            assert (await ca.status())["cluster"]["servingSessions"] == 8
            assert accepted == set(ids)
            await b.astart()
            async with Client(b.url, max_reconnect_attempts=0) as watcher:
                watcher.on_event = ends
                await watcher.subscribe(all_sessions=True)
                await partition_and_check(a, ca, proxy, redis_server, ids, batch, ends)
    finally:
        # Off the event loop: the proxy runs on it, and A needs it to reach Redis while it stops.
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))
        await proxy.close()
    for gw in (a, b):
        assert "Traceback" not in gw.log(200_000), gw.log()


async def partition_and_check(
    a: GatewayProcess,
    ca: Client,
    proxy: Proxy,
    redis_server: RedisServer,
    ids: list[str],
    batch: list[asyncio.Task[dict[str, Any]]],
    ends: Ends,
) -> None:
    proxy.cut()
    await asyncio.sleep(7)  # lease 2 s + claim idle 2 s, with room: B takes A's sessions over
    # A has found out by now, or soon after on a loaded machine (a longer cut only helps B).
    await poll_until(lambda: readyz(a), lambda status: status == 503, "A not ready")
    assert (await ca.status())["store"]["up"] is False
    proxy.heal()
    finals = await asyncio.wait_for(asyncio.gather(*batch), 60)
    answered = dict(zip(ids, finals, strict=True))
    await asyncio.sleep(3)  # room for a duplicate end from A, if A could still write one
    # Every run's terminal event reached B's watcher (a pub/sub hop after the final answer,
    # for the runs A ended): at least one each, checked as exactly one below.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while any(rid not in ends.by_run for rid in ids) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    stored = await stored_runs(redis_server.url, ids)
    interrupted = 0
    for rid in ids:
        rec, final = stored[rid], answered[rid]
        assert rec is not None and rec.is_final, (rid, rec)
        outcome = (rec.status, rec.error if rec.status != "ok" else None)
        assert outcome in (("ok", None), ("error", INTERRUPTED)), (rid, outcome)
        assert (final["status"], final.get("error") if final["status"] != "ok" else None) == outcome
        assert len(ends.by_run.get(rid, [])) == 1, (rid, ends.by_run.get(rid))
        interrupted += outcome[0] == "error"
    assert interrupted >= 1  # A held runs when it was cut off, and B ended them
    # A rejoined by itself: ready, reconnected, and it runs new work again.
    for _ in range(200):
        if await readyz(a) == 200:
            break
        await asyncio.sleep(0.05)
    store_a = (await ca.status())["store"]
    assert store_a["up"] is True and store_a["reconnects"] >= 1, store_a
    after = await asyncio.gather(*[ca.run_agent("again", session_key=f"agent:main:p{i}") for i in range(8)])
    assert [f["status"] for f in after] == ["ok"] * 8
    cluster_a = (await ca.status())["cluster"]
    print(f"partition: runs={len(ids)} interrupted={interrupted} a={cluster_a}")


def test_end_write_backoff_doubles_up_to_a_cap_with_jitter() -> None:
    assert next_delay(0.0, rand=lambda: 0.0) == FIRST_DELAY_S
    assert next_delay(0.4, rand=lambda: 0.0) == 0.8
    assert next_delay(0.4, rand=lambda: 1.0) == 0.4
    assert next_delay(MAX_DELAY_S, rand=lambda: 0.0) == MAX_DELAY_S


@pytest.mark.parametrize(
    ("appendonly", "save", "want"),
    [
        ("yes", "", "aof"),
        ("yes", "3600 1", "aof"),
        ("no", "3600 1 300 100", "rdb"),
        ("no", "", "none"),
        ("no", " ", "none"),
    ],
)
def test_persistence_of_a_redis_config(appendonly: str, save: str, want: str) -> None:
    assert persistence_of(appendonly, save) == want


def test_background_loops_back_off_while_redis_stays_down() -> None:
    pauses = [pause_s(n, retry_s=0.5, max_retry_s=2.0) for n in range(1, 6)]
    assert pauses == [0.5, 1.0, 2.0, 2.0, 2.0]


async def test_a_paused_redis_fails_store_and_cluster_calls_after_the_call_bound(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGSTOPped redis-server keeps its connections open and answers nothing. The store's
    writer connection and the cluster's connections have no socket timeout (redis-py would
    arm one per reply); each pipeline and each cluster call is bounded as a whole instead,
    so a paused Redis is an outage after that bound, never a hang."""
    monkeypatch.setattr(redis_store, "CALL_TIMEOUT_S", 0.5)
    monkeypatch.setattr(redis_io, "CALL_TIMEOUT_S", 0.5)
    store = RedisStore(redis_server.url, prefix=f"paused{uuid.uuid4().hex[:6]}")
    await store.open()
    cluster = aioredis.Redis.from_url(redis_server.url, socket_timeout=None)  # as ClusterMember's pool
    await cluster.ping()
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        async with asyncio.timeout(20) as outer:
            with pytest.raises(StoreError):
                await store.get_session("agent:main:paused")
            with pytest.raises(TimeoutError):
                await redis_io.redis_call(cluster.ping())
        assert not outer.expired()  # each failed on its own bound, not on this one
        assert not store.connection()["up"]
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    # Resumed: the same store and client work again.
    assert await store.get_session("agent:main:paused") is None
    assert store.connection()["up"]
    assert await redis_io.redis_call(cluster.ping())
    await cluster.aclose()
    await store.close()
