"""`cron.add`, `cron.list`, `cron.get`, `cron.update`, `cron.remove`, `cron.run`, `cron.runs` (OpenClaw's names)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ, WRITE
from clawgate.protocol.schemas import AgentIdStr, SessionKeyStr
from clawgate.sessions.keys import agent_id_of
from clawgate.store.cron_records import CronJob, CronPayload, CronSchedule

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core

JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _P(msgspec.Struct, rename="camel", kw_only=True):
    pass


class CronAddParams(_P):
    name: Name
    schedule: CronSchedule
    payload: CronPayload | None = None
    message: Annotated[str, msgspec.Meta(max_length=400_000)] | None = None  # shorthand for an agentTurn
    agent_id: AgentIdStr = "main"
    session_key: SessionKeyStr | None = None
    enabled: bool = True
    delete_after_run: bool = False
    max_concurrent_runs: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None


class CronPatch(_P):
    name: Name | None = None
    schedule: CronSchedule | None = None
    payload: CronPayload | None = None
    agent_id: AgentIdStr | None = None
    session_key: SessionKeyStr | None = None
    enabled: bool | None = None
    delete_after_run: bool | None = None
    max_concurrent_runs: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None


class CronJobParams(_P):
    job_id: JobId


class CronUpdateParams(_P):
    job_id: JobId
    patch: CronPatch


class CronListParams(_P):
    include_disabled: bool = True
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000


class CronRunsParams(_P):
    job_id: JobId
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


def wire(job: CronJob) -> dict[str, Any]:
    return msgspec.to_builtins(job)  # type: ignore[no-any-return]


async def add(gw: Core, conn: Caller, req_id: str, p: CronAddParams) -> dict[str, Any]:
    # Refused now rather than at every firing: the job's agent must be configured.
    gw.runs.profiles.require(p.agent_id, "agentId")
    if p.session_key is not None:
        gw.runs.profiles.require(agent_id_of(p.session_key), "sessionKey")
    payload = p.payload or CronPayload(kind="agentTurn", message=p.message)
    job = await gw.cron.add(
        {
            "name": p.name,
            "schedule": p.schedule,
            "payload": payload,
            "agent_id": p.agent_id,
            "session_key": p.session_key,
            "enabled": p.enabled,
            "delete_after_run": p.delete_after_run,
            "max_concurrent_runs": p.max_concurrent_runs,
            "webhook": p.webhook,
        }
    )
    return {"ok": True, "job": wire(job)}


async def list_jobs(gw: Core, conn: Caller, req_id: str, p: CronListParams) -> dict[str, Any]:
    jobs = await gw.cron.store.list_jobs(p.limit)
    return {"jobs": [wire(j) for j in jobs if p.include_disabled or j.enabled]}


async def get(gw: Core, conn: Caller, req_id: str, p: CronJobParams) -> dict[str, Any]:
    return {"job": wire(await gw.cron.get(p.job_id))}


async def update(gw: Core, conn: Caller, req_id: str, p: CronUpdateParams) -> dict[str, Any]:
    fields = {name: value for name, value in msgspec.structs.asdict(p.patch).items() if value is not None}
    return {"ok": True, "job": wire(await gw.cron.update(p.job_id, fields))}


async def remove(gw: Core, conn: Caller, req_id: str, p: CronJobParams) -> dict[str, Any]:
    return {"ok": True, "removed": await gw.cron.remove(p.job_id)}


async def run(gw: Core, conn: Caller, req_id: str, p: CronJobParams) -> dict[str, Any]:
    gw.admission.check()
    return {"ok": True, "runId": await gw.cron.run_now(p.job_id)}


async def runs(gw: Core, conn: Caller, req_id: str, p: CronRunsParams) -> dict[str, Any]:
    await gw.cron.get(p.job_id)
    entries = await gw.cron.store.list_runs(p.job_id, p.limit)
    return {"jobId": p.job_id, "entries": [msgspec.to_builtins(e) for e in entries]}


METHODS = [
    MethodSpec("cron.add", CronAddParams, WRITE, add),
    MethodSpec("cron.list", CronListParams, READ, list_jobs),
    MethodSpec("cron.get", CronJobParams, READ, get),
    MethodSpec("cron.update", CronUpdateParams, WRITE, update),
    MethodSpec("cron.remove", CronJobParams, WRITE, remove),
    MethodSpec("cron.run", CronJobParams, WRITE, run),
    MethodSpec("cron.runs", CronRunsParams, READ, runs),
]
