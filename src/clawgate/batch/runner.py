"""Run a batch through a gateway, exactly once per task, resumably.

Exactly once, across crashes of the gateway or of this process:
  - the idempotency key of a task is `batch:{id}`; for `agent` the run id IS the key;
  - a task with a final line in the results file is skipped;
  - before submitting, `agent.wait` (timeoutMs 0) asks whether the key's run already
    exists: a final run is taken as is, a running one is waited for, and only
    `NOT_FOUND` leads to a submission;
  - a spawned run's id is not its key, so it is journalled (`OUT.spawns`) as soon as the
    spawn is accepted, and a rerun waits on the journalled run instead of spawning again;
  - a run the gateway reports as "interrupted by gateway restart" is resubmitted under
    `batch:{id}:retry{n}` (counted as retried), and a rerun walks that chain the same way.
Retryable failures (`UNAVAILABLE`, honouring `retryAfterMs`; a lost connection; the
spawn-children limit) are retried with jittered backoff up to `max_attempts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from clawgate.batch.journal import Appender, load_results, load_spawns, spawn_journal_path
from clawgate.batch.progress import BatchProgress
from clawgate.batch.tasks import (
    BadLine,
    Task,
    batch_label,
    default_out_path,
    default_session_key,
    read_tasks,
    task_run_key,
)
from clawgate.client import Client, ClientError, ConnectionLost
from clawgate.protocol.constants import INTERRUPTED

DEFAULT_REQUESTER = "agent:main:batch"
WAIT_SLICE_MS = 30_000
HISTORY_LIMIT = 1000


@dataclass
class BatchOptions:
    concurrency: int = 16
    connections: int = 4
    max_attempts: int = 20
    requester: str = DEFAULT_REQUESTER
    spawn_concurrency: int = 4
    progress: bool = True
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    # Sent with every `agent` run, so dashboards group a batch's runs (`runs.list label=`).
    label: str | None = None
    # Stop submitting new tasks once the tasks finished in this run used this many tokens
    # (tasks already in flight still finish). None: no budget.
    budget_tokens: int | None = None


@dataclass
class BatchSummary:
    tasks: int = 0
    ok: int = 0
    error: int = 0
    timeout: int = 0
    aborted: int = 0
    skipped: int = 0
    skipped_not_ok: int = 0
    retried: int = 0
    unfinished: int = 0
    invalid: int = 0
    completed: int = 0  # tasks finished in this run
    tokens: int = 0  # provider tokens of the tasks finished in this run
    cost_usd: float | None = None  # their cost, when the gateway has a price for the model
    over_budget: int = 0  # tasks not submitted because the token budget was reached
    wall_s: float = 0.0
    bad_lines: list[BadLine] = field(default_factory=list)
    out_path: Path | None = None

    def add_usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        self.tokens += int(usage.get("total", 0))
        if usage.get("costUsd") is not None:
            self.cost_usd = round((self.cost_usd or 0.0) + float(usage["costUsd"]), 8)

    @property
    def runs_per_s(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def all_ok(self) -> bool:
        """Every task of the file ended ok (in this run or an earlier one); no malformed line."""
        return (
            self.invalid == 0
            and self.unfinished == 0
            and self.over_budget == 0
            and self.skipped_not_ok == 0
            and self.ok + self.skipped == self.tasks
        )

    def count(self, status: str) -> None:
        setattr(self, status, getattr(self, status) + 1)
        self.completed += 1


@dataclass
class _Outcome:
    run_id: str | None
    status: str
    text: str | None = None
    error: str | None = None
    accepted_ms: float | None = None
    usage: dict[str, Any] | None = None


class _Retry(Exception):
    def __init__(self, cause: ClientError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class BatchRunner:
    """Runs parsed tasks against one gateway URL; results go to `out_path` as they finish."""

    def __init__(
        self,
        url: str,
        out_path: Path,
        *,
        token: str | None = None,
        options: BatchOptions | None = None,
        console: Console | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.out_path = out_path
        self.journal_path = spawn_journal_path(out_path)
        self.opts = options or BatchOptions()
        self.console = console or Console(stderr=True)
        self.summary = BatchSummary(out_path=out_path)
        self._results = Appender(out_path)
        self._journal = Appender(self.journal_path)
        self._spawned: dict[str, dict[str, Any]] = {}
        self._spawn_slots = asyncio.Semaphore(max(1, self.opts.spawn_concurrency))
        self._clients: list[Client] = []
        self._progress = BatchProgress(self.console)

    async def run(self, tasks: list[Task], bad: list[BadLine]) -> BatchSummary:
        s = self.summary
        s.tasks = len(tasks)
        s.bad_lines = list(bad)
        s.invalid = len(bad)
        done = load_results(self.out_path)
        self._spawned = load_spawns(self.journal_path)
        todo = []
        for task in tasks:
            prior = done.get(task.key)
            if prior is None:
                todo.append(task)
                continue
            s.skipped += 1
            if prior.get("status") != "ok":
                s.skipped_not_ok += 1
        started = time.monotonic()
        n_clients = max(1, min(self.opts.connections, self.opts.concurrency, len(todo) or 1))
        self._clients = [
            Client(
                self.url,
                token=self.token,
                max_reconnect_attempts=0,
                keep_events=False,
                client_id="clawgate-batch",
            )
            for _ in range(n_clients)
        ]
        try:
            if todo:
                # Fail fast (and clearly) when the gateway is not there at all.
                await self._first_connect()
            with self._progress.shown(len(todo), self.opts.progress):
                queue: asyncio.Queue[Task] = asyncio.Queue()
                for task in todo:
                    queue.put_nowait(task)
                workers = [
                    asyncio.create_task(self._worker(queue, self._clients[i % n_clients]))
                    for i in range(max(1, min(self.opts.concurrency, len(todo))))
                ]
                try:
                    await asyncio.gather(*workers)
                finally:
                    for w in workers:
                        w.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
        finally:
            s.wall_s = time.monotonic() - started
            for client in self._clients:
                await client.close()
            self._results.close()
            self._journal.close()
        if s.unfinished == 0 and self.journal_path.exists():
            with contextlib.suppress(OSError):
                self.journal_path.unlink()  # every spawned task has its final line now
        return s

    async def _first_connect(self) -> None:
        delay = self.opts.backoff_base_s
        for attempt in range(1, self.opts.max_attempts + 1):
            try:
                await self._clients[0].connect()
                return
            except ConnectionLost:
                if attempt == self.opts.max_attempts:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.opts.backoff_max_s)

    def _advance(self) -> None:
        s = self.summary
        self._progress.advance(s.ok, s.error + s.timeout + s.aborted, s.retried)

    async def _worker(self, queue: asyncio.Queue[Task], client: Client) -> None:
        while True:
            try:
                task = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            budget = self.opts.budget_tokens
            if budget is not None and self.summary.tokens >= budget:
                # Not submitted: a rerun (with a larger budget) resumes from here.
                self.summary.over_budget += 1
                continue
            try:
                line = await self._do_task(task, client)
            except Exception as exc:
                # One task's surprise must not take the batch (and every other result) down with it.
                self.console.print(f"[red]task {task.id!r} (line {task.line}) failed: {exc!r}[/red]")
                line = None
            if line is None:
                self.summary.unfinished += 1
            else:
                self._results.write(line)
                self.summary.count(line["status"])
                self.summary.add_usage(line.get("usage"))
            self._advance()

    # -- one task ----------------------------------------------------------------------------------
    async def _do_task(self, task: Task, client: Client) -> dict[str, Any] | None:
        started = time.monotonic()
        attempts = 0
        retry_n = 0
        transient = 0
        while True:
            attempts += 1
            key = task_run_key(task, retry_n)
            try:
                if task.spawn is not None:
                    outcome = await self._spawn_attempt(task, client, key)
                else:
                    outcome = await self._agent_attempt(task, client, key)
            except _Retry as exc:
                if attempts >= self.opts.max_attempts:
                    self._report_giveup(task, exc.cause)
                    return None
                self.summary.retried += 1
                transient += 1
                await asyncio.sleep(self._backoff(exc.cause, transient))
                continue
            except ClientError as exc:
                outcome = _Outcome(
                    key if task.spawn is None else None, "error", error=f"{exc.code}: {exc.message}"
                )
            if (
                outcome.status == "error"
                and outcome.error == INTERRUPTED
                and attempts < self.opts.max_attempts
            ):
                retry_n += 1
                self.summary.retried += 1
                continue
            return {
                "id": task.id,
                "runId": outcome.run_id,
                "status": outcome.status,
                "text": outcome.text,
                "error": outcome.error,
                "attempts": attempts,
                "acceptedMs": round(outcome.accepted_ms, 3) if outcome.accepted_ms is not None else None,
                "totalMs": round((time.monotonic() - started) * 1000, 3),
                "usage": outcome.usage,
            }

    def _backoff(self, exc: ClientError, n: int) -> float:
        expo = min(self.opts.backoff_base_s * 2 ** (n - 1), self.opts.backoff_max_s)
        # UNAVAILABLE says when to come back; the jitter spreads the herd of refused tasks over a window.
        base = exc.retry_after_ms / 1000 if exc.code == "UNAVAILABLE" and exc.retry_after_ms else expo
        return base * random.uniform(1.0, 1.5)

    def _report_giveup(self, task: Task, exc: ClientError) -> None:
        self.console.print(
            f"[yellow]task {task.id!r} (line {task.line}) left unfinished after "
            f"{self.opts.max_attempts} attempts: {exc.code}: {exc.message}[/yellow]"
        )

    @staticmethod
    def _retryable(exc: ClientError) -> bool:
        if isinstance(exc, ConnectionLost) or exc.code in ("UNAVAILABLE", "CONNECTION_LOST"):
            return True
        # The spawn-children limit frees up as running children end.
        return exc.code == "FORBIDDEN" and "maxChildrenPerAgent" in exc.details

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except ClientError as exc:
            if self._retryable(exc):
                raise _Retry(exc) from exc
            raise

    async def _existing(self, client: Client, run_id: str) -> dict[str, Any] | None:
        """The final `agent.wait` answer of an existing run (waiting for it), or None if unknown."""
        try:
            answer: dict[str, Any] = await self._call(client.wait(run_id, 0))
        except ClientError as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise
        while not _wait_is_final(answer):
            answer = await self._call(client.wait(run_id, WAIT_SLICE_MS))
        return answer

    async def _agent_attempt(self, task: Task, client: Client, key: str) -> _Outcome:
        session = task.session_key or default_session_key(task.key)
        existing = await self._existing(client, key)
        if existing is not None:
            text = await self._history_text(client, session, key) if existing["status"] == "ok" else None
            return _Outcome(key, existing["status"], text, existing.get("error"), usage=existing.get("usage"))
        params: dict[str, Any] = {"message": task.message, "idempotencyKey": key, "sessionKey": session}
        if self.opts.label:
            params["label"] = self.opts.label
        if task.timeout is not None:
            params["timeout"] = task.timeout
        sent = time.monotonic()
        accepted: list[float] = []
        final: dict[str, Any] = await self._call(
            client.call_final("agent", params, on_accepted=lambda _p: accepted.append(time.monotonic()))
        )
        return _Outcome(
            str(final.get("runId", key)),
            str(final.get("status")),
            _payload_text(final),
            final.get("error"),
            (accepted[0] - sent) * 1000 if accepted else None,
            (final.get("result") or {}).get("meta", {}).get("usage"),
        )

    async def _spawn_attempt(self, task: Task, client: Client, key: str) -> _Outcome:
        assert task.spawn is not None
        requester = task.session_key or self.opts.requester
        async with self._spawn_slots:
            entry = self._spawned.get(task.key)
            accepted_ms = None
            if entry is not None and entry.get("key") == key:
                run_id, child = str(entry["runId"]), str(entry["childSessionKey"])
            else:
                params: dict[str, Any] = {
                    "idempotencyKey": key,
                    "label": f"batch:{task.key}"[:256],
                    "mode": task.spawn["mode"],
                    "cleanup": task.spawn["cleanup"],
                }
                if task.timeout is not None:
                    params["runTimeoutSeconds"] = task.timeout
                sent = time.monotonic()
                answer = await self._call(client.spawn(requester, task.message, **params))
                accepted_ms = (time.monotonic() - sent) * 1000
                run_id, child = str(answer["runId"]), str(answer["childSessionKey"])
                entry = {"id": task.id, "key": key, "runId": run_id, "childSessionKey": child}
                self._spawned[task.key] = entry
                self._journal.write(entry)
            final = await self._existing(client, run_id)
        if final is None:
            return _Outcome(run_id, "error", error=f"spawned run {run_id} not found (expired?)")
        text = None
        if final["status"] == "ok":
            text = await self._history_text(client, child, run_id)
            if text is None:
                # cleanup "delete" may already have removed the child session: use the announce.
                text = await self._history_text(client, requester, run_id, role="system")
                if text is not None and "\n" in text:
                    text = text.split("\n", 1)[1]
        return _Outcome(run_id, final["status"], text, final.get("error"), accepted_ms, final.get("usage"))

    async def _history_text(
        self, client: Client, session: str, run_id: str, role: str = "assistant"
    ) -> str | None:
        try:
            history = await self._call(
                client.call("chat.history", {"sessionKey": session, "limit": HISTORY_LIMIT})
            )
        except ClientError:
            return None
        for message in reversed(history.get("messages", [])):
            if message.get("runId") == run_id and message.get("role") == role:
                return str(message.get("content"))
        return None


def _wait_is_final(answer: dict[str, Any]) -> bool:
    # `status: "timeout"` without `endedAt` is the wait timing out, not the run.
    return "endedAt" in answer or answer.get("status") in ("ok", "error", "aborted")


def _payload_text(final: dict[str, Any]) -> str | None:
    payloads = (final.get("result") or {}).get("payloads") or []
    texts = [str(p["text"]) for p in payloads if isinstance(p, dict) and p.get("text")]
    return "\n".join(texts) if texts else None


async def run_batch(
    tasks_path: Path,
    *,
    url: str,
    token: str | None = None,
    out_path: Path | None = None,
    options: BatchOptions | None = None,
    console: Console | None = None,
) -> BatchSummary:
    """Run every task of `tasks_path` (JSONL) through the gateway at `url`; see the module doc."""
    console = console or Console(stderr=True)
    tasks, bad = read_tasks(tasks_path)
    for item in bad:
        console.print(f"[yellow]{tasks_path}:{item.line}: skipped: {item.reason}[/yellow]")
    options = options or BatchOptions()
    if options.label is None:
        options = dataclasses.replace(options, label=batch_label(tasks_path))
    runner = BatchRunner(
        url, out_path or default_out_path(tasks_path), token=token, options=options, console=console
    )
    return await runner.run(tasks, bad)
