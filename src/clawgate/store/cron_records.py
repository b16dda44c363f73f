"""Cron job records (msgspec, camelCase on the wire, as OpenClaw's cron.* methods)."""

from __future__ import annotations

from typing import Literal

import msgspec


class _Rec(msgspec.Struct, rename="camel", kw_only=True):
    pass


class CronSchedule(_Rec):
    kind: Literal["at", "every", "cron"]
    at: str | None = None
    every_ms: int | None = None
    anchor_ms: int | None = None
    expr: str | None = None
    tz: str | None = None


class CronPayload(_Rec):
    kind: Literal["agentTurn", "systemEvent"] = "agentTurn"
    message: str | None = None  # agentTurn
    text: str | None = None  # systemEvent: a system message appended to the session
    model: str | None = None
    timeout_seconds: float | None = None


class CronState(_Rec):
    next_run_at_ms: int | None = None
    last_run_at_ms: int | None = None
    last_status: str | None = None
    last_error: str | None = None
    last_run_id: str | None = None
    consecutive_errors: int = 0
    running: list[str] = msgspec.field(default_factory=list)  # run ids in flight


class CronJob(_Rec):
    id: str
    name: str
    schedule: CronSchedule
    payload: CronPayload
    agent_id: str = "main"
    session_key: str | None = None  # default: agent:<agentId>:cron:<id>
    enabled: bool = True
    delete_after_run: bool = False
    max_concurrent_runs: int = 1
    webhook: str | None = None  # each run's final answer is POSTed here (automation/webhooks.py)
    created_at_ms: int = 0
    updated_at_ms: int = 0
    state: CronState = msgspec.field(default_factory=CronState)


class CronRunEntry(_Rec):
    job_id: str
    run_id: str
    scheduled_for_ms: int
    started_at_ms: int
    status: str  # "started" | "ok" | "error" | "timeout" | "aborted" | "skipped"
    ended_at_ms: int | None = None
    error: str | None = None


job_encoder = msgspec.json.Encoder()
job_decoder = msgspec.json.Decoder(CronJob)
entry_decoder = msgspec.json.Decoder(CronRunEntry)
