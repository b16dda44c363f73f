"""Every accepted run ends exactly once on Redis, when a process pauses or dies mid-run.

Real gateway subprocesses on the real Redis (a private key prefix per test), real time:
the processes are separate, so no fake clock reaches them. Durations are compressed
(leases of a few seconds) and every wait is bounded.

- A process stopped (SIGSTOP) longer than its lease loses its sessions: a live process
  takes them over and ends their runs, and the stopped one, once continued (SIGCONT),
  can no longer end them (its end write is fenced by the lease token).
- A process killed (SIGKILL) in the middle of a batch leaves no accepted run without
  an end, whatever point of a run's life the kill hits.
- In both, a run's end events continue its `seq` (for `agent` and `chat`) as a subscriber
  saw it, whichever process tells them: the executor, or the one that took the run over.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from clawgate.client import Client
from clawgate.protocol.constants import INTERRUPTED
from clawgate.store.records import RunRecord, TranscriptMessage
from clawgate.testing import GatewayProcess, astart_all, stop_all
from clawgate.testing.redis import drop_redis_prefix

pytestmark = pytest.mark.redis


class Procs:
    """Gateway processes sharing one Redis under one private prefix."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.prefix = f"cgtest:{uuid.uuid4().hex[:10]}"
        self.gateways: list[GatewayProcess] = []

    @property
    def urls(self) -> list[str]:
        return [gp.url for gp in self.gateways]

    async def start(self, n: int, **settings: object) -> None:
        added = [
            GatewayProcess(
                self.tmp / f"gw{i}",
                args=["--log-level", "warning"],
                settings={"store": self.redis_url, "redis_prefix": self.prefix, **settings},
                log_path=self.tmp / f"gw{i}.log",
            )
            for i in range(len(self.gateways), len(self.gateways) + n)
        ]
        self.gateways += added
        await astart_all(added)

    def log(self, i: int) -> str:
        return self.gateways[i].log(None)

    async def stored_run(self, run_id: str) -> RunRecord | None:
        r = aioredis.from_url(self.redis_url)
        try:
            raw = await r.get(f"{self.prefix}:run:{run_id}")
        finally:
            await r.aclose()
        return msgspec.json.decode(raw, type=RunRecord) if raw is not None else None

    async def replies(self, session_key: str) -> list[str | None]:
        """The run ids of the assistant replies in a session's stored transcript."""
        r = aioredis.from_url(self.redis_url)
        try:
            raws = await r.lrange(f"{self.prefix}:messages:{session_key}", 0, -1)
        finally:
            await r.aclose()
        messages = [msgspec.json.decode(raw, type=TranscriptMessage) for raw in raws]
        return [m.run_id for m in messages if m.role == "assistant"]

    async def cleanup(self) -> None:
        await drop_redis_prefix(self.redis_url, self.prefix)


@pytest.fixture
async def procs(tmp_path: Path, redis_url: str) -> AsyncIterator[Procs]:
    p = Procs(tmp_path, redis_url)
    try:
        yield p
    finally:
        await asyncio.to_thread(stop_all, p.gateways)
        await p.cleanup()


class Ends:
    """Terminal lifecycle events per run, as seen by a subscriber of all sessions, and for
    each terminal `agent` or `chat` event, the highest seq of that stream the subscriber had
    seen of the run before it."""

    def __init__(self) -> None:
        self.by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.seqs: dict[tuple[str, str], int] = defaultdict(int)  # (run, event) -> highest seq
        self.backwards: dict[str, list[str]] = defaultdict(list)  # ends whose seq went back

    def __call__(self, frame: dict[str, Any]) -> None:
        event = frame.get("event")
        if event not in ("agent", "chat"):
            return
        payload = frame["payload"]
        run_id, seq = payload["runId"], payload["seq"]
        data = payload.get("data") or {}
        if event == "agent":
            terminal = payload.get("stream") == "lifecycle" and data.get("phase") in ("end", "error")
            terminal = terminal and not data.get("willRetry")
        else:
            terminal = payload.get("state") in ("final", "error", "aborted")
        if terminal and seq <= self.seqs[run_id, event]:
            self.backwards[run_id].append(f"{event} end seq {seq} after seq {self.seqs[run_id, event]}")
        self.seqs[run_id, event] = max(seq, self.seqs[run_id, event])
        if terminal and event == "agent":
            self.by_run[run_id].append(data)


def _outcome(status: str, error: str | None) -> tuple[str, str | None]:
    return status, error if status != "ok" else None


async def _assert_one_agreed_end(
    procs: Procs, clients: list[Client], ends: Ends, run_id: str, final: dict[str, Any]
) -> tuple[str, str | None]:
    """The final answer, agent.wait on every process, the stored record and the lifecycle
    events of one run all tell the same single end."""
    want = _outcome(final["status"], final.get("error"))
    for c in clients:
        waited = await c.wait(run_id, 1000)
        assert _outcome(waited["status"], waited.get("error")) == want, (run_id, waited, final)
    rec = await procs.stored_run(run_id)
    assert rec is not None and rec.is_final, (run_id, rec)
    assert _outcome(rec.status, rec.error) == want, (run_id, rec, final)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not ends.by_run.get(run_id) and loop.time() < deadline:
        await asyncio.sleep(0.01)  # the terminal event may trail the final answer by a pub/sub hop
    seen = ends.by_run.get(run_id, [])
    assert len(seen) == 1, (run_id, seen, final)
    # The end continues the run's seq, whichever process tells it (the executor, or the one
    # that took the run over from a process that died or stopped).
    assert not ends.backwards.get(run_id), (run_id, ends.backwards[run_id])
    phase = "end" if want[0] == "ok" else "error"
    assert seen[0]["phase"] == phase, (run_id, seen, final)
    if phase == "error":
        assert seen[0]["error"] == want[1], (run_id, seen, final)
    return want


async def test_paused_process_runs_are_taken_over_and_it_cannot_end_them(procs: Procs) -> None:
    lease_s = claim_idle_s = 3.0
    await procs.start(2, cluster_lease_s=lease_s, cluster_claim_idle_s=claim_idle_s, shutdown_grace_s=2)
    n = 24
    ends = Ends()
    async with (
        Client(procs.urls[0], max_reconnect_attempts=0) as a,
        Client(procs.urls[0], max_reconnect_attempts=0) as watcher,
        Client(procs.urls[1], max_reconnect_attempts=0) as b,
    ):
        watcher.on_event = ends
        await watcher.subscribe(all_sessions=True)
        ids = [f"{procs.prefix}-p{i}" for i in range(n)]
        accepted: list[dict[str, Any]] = []
        tasks = [
            asyncio.create_task(
                a.run_agent(
                    "[[delay:4]] slow",
                    session_key=f"agent:main:pause{i}",
                    idempotency_key=ids[i],
                    on_accepted=accepted.append,
                )
            )
            for i in range(n)
        ]
        # B takes its share of the runs, then stops answering, longer than lease + claim idle.
        # Stopped while it executes one (4 s each): a session B only holds, with its run not
        # yet taken from the queue, is just drained by A, and nothing is interrupted.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            status_b = await b.status()
            if len(accepted) == n and status_b["runs"]["active"] > 0:
                break
            assert loop.time() < deadline, (len(accepted), status_b["runs"], status_b["cluster"])
            await asyncio.sleep(0.01)
        assert status_b["cluster"]["servingSessions"] > 0
        procs.gateways[1].signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(lease_s + claim_idle_s + 2)
        finally:
            procs.gateways[1].signal(signal.SIGCONT)
        done, pending = await asyncio.wait(tasks, timeout=45)
        assert not pending, f"{len(pending)} of {n} runs got no final answer"
        finals = {f["runId"]: f for f in (t.result() for t in done)}
        assert set(finals) == set(ids)
        outcomes = [await _assert_one_agreed_end(procs, [a, b], ends, rid, finals[rid]) for rid in ids]
        # The transcript agrees too: an assistant reply only for the runs that ended ok.
        for i, outcome in enumerate(outcomes):
            history = (await a.call("chat.history", {"sessionKey": f"agent:main:pause{i}"}))["messages"]
            replies = [m for m in history if m["role"] == "assistant"]
            assert len(replies) == (1 if outcome[0] == "ok" else 0), (i, outcome, history)
        cluster_a, cluster_b = (await a.status())["cluster"], (await b.status())["cluster"]
    interrupted = [o for o in outcomes if o == ("error", INTERRUPTED)]
    assert len(interrupted) + outcomes.count(("ok", None)) == n, outcomes
    # The runs B was executing when it stopped were taken over and ended as interrupted.
    assert len(interrupted) >= 1, outcomes
    # Reported as orphans by a live holder: A, or B itself once continued, when A's slots
    # were all busy with its own sessions (a stopped process holds nothing after its lease).
    assert cluster_a["orphans"] + cluster_b["orphans"] >= len(interrupted)
    assert cluster_a["leasesLost"] == 0
    assert cluster_b["leasesLost"] >= len(interrupted)
    log_b = procs.log(1)
    assert "lease lost" in log_b
    # B's late attempts to end runs it no longer held were refused and counted, not raised.
    assert "Traceback" not in log_b, log_b[-3000:]


async def _kill_mid_batch(procs: Procs, runs: int, sessions: int) -> list[str]:
    """Send `runs` runs over `sessions` sessions to A, SIGKILL B 1 s later; return what went wrong."""
    await procs.start(2, cluster_lease_s=1, cluster_claim_idle_s=2, shutdown_grace_s=2)
    ends = Ends()
    problems: list[str] = []
    async with (
        Client(procs.urls[0], max_reconnect_attempts=0) as a,
        Client(procs.urls[0], max_reconnect_attempts=0) as watcher,
    ):
        watcher.on_event = ends
        await watcher.subscribe(all_sessions=True)
        ids = [f"{procs.prefix}-k{i}" for i in range(runs)]
        tasks = [
            asyncio.create_task(
                a.run_agent(
                    "[[delay:0.2]] w", session_key=f"agent:main:kill{i % sessions}", idempotency_key=ids[i]
                )
            )
            for i in range(runs)
        ]
        await asyncio.sleep(1.0)
        procs.gateways[1].signal(signal.SIGKILL)
        done, pending = await asyncio.wait(tasks, timeout=40)
        for t in pending:
            t.cancel()
        if pending:
            problems.append(f"{len(pending)} of {runs} runs got no final answer")
        for t in done:
            if t.exception() is not None:
                problems.append(f"request failed: {t.exception()!r}")
        finals = {f["runId"]: f for t in done if t.exception() is None for f in [t.result()]}
        for rid in ids:
            if rid not in finals:
                continue
            try:
                outcome = await _assert_one_agreed_end(procs, [a], ends, rid, finals[rid])
            except AssertionError as exc:
                problems.append(f"disagreement: {exc}")
                continue
            if outcome not in (("ok", None), ("error", INTERRUPTED)):
                problems.append(f"unexpected end {outcome}")
        # A run whose end says ok has its reply in the transcript, once; any other end has none.
        for j in range(sessions):
            replies = await procs.replies(f"agent:main:kill{j}")
            for rid in ids[j::sessions]:
                rec = await procs.stored_run(rid)
                want = 1 if rec is not None and rec.status == "ok" else 0
                if replies.count(rid) != want:
                    status = rec.status if rec is not None else None
                    problems.append(
                        f"{rid} ended {status} with {replies.count(rid)} replies in the transcript"
                    )
    return problems


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_mid_batch_leaves_no_run_without_an_end(tmp_path: Path, redis_url: str) -> None:
    failures: dict[int, list[str]] = {}
    for attempt in range(6):
        procs = Procs(tmp_path / f"try{attempt}", redis_url)
        (tmp_path / f"try{attempt}").mkdir()
        try:
            problems = await _kill_mid_batch(procs, runs=100, sessions=20)
        finally:
            await asyncio.to_thread(stop_all, procs.gateways)
            await procs.cleanup()
        if problems:
            failures[attempt] = problems[:5]
    assert failures == {}, failures
