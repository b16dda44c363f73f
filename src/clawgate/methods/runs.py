"""`runs.list`: a bounded page of run records, for dashboards and operators."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clawgate.clip import clip
from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ
from clawgate.protocol.schemas import RunsListParams
from clawgate.store.records import RunRecord
from clawgate.store.run_pages import RunsPageQuery

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core

# A page lists runs, it does not carry them: long texts are cut to these many characters.
MESSAGE_CHARS = 200
RESULT_CHARS = 2000
# Records a page examines at most, whatever its filter matches (the cost bound of one read).
SCAN_PER_PAGE = 1000


def _ms(t: float | None) -> int | None:
    return None if t is None else int(t * 1000)


def run_summary(rec: RunRecord) -> dict[str, Any]:
    """A run as one row of the list: its state and the start of its texts."""
    out: dict[str, Any] = {
        "runId": rec.run_id,
        "sessionKey": rec.session_key,
        "agentId": rec.agent_id,
        "kind": rec.kind,
        "status": rec.status,
        "acceptedAt": _ms(rec.accepted_at),
        "message": clip(rec.message, MESSAGE_CHARS),
    }
    optional: dict[str, Any] = {
        "startedAt": _ms(rec.started_at),
        "endedAt": _ms(rec.ended_at),
        "durationMs": rec.duration_ms,
        "error": rec.error,
        "result": clip(rec.result_text, RESULT_CHARS) if rec.result_text else None,
        "model": rec.model,
        "usage": rec.usage,
        "label": rec.label,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


async def list_runs(gw: Core, conn: Caller, req_id: str, params: RunsListParams) -> dict[str, Any]:
    query = RunsPageQuery(
        limit=params.limit,
        cursor=params.cursor,
        status=params.status,
        session_key=params.session_key,
        run_id_prefix=params.run_id_prefix,
        label=params.label,
        scan=SCAN_PER_PAGE,
    )
    page = await gw.store.page_runs(query)
    return {"runs": [run_summary(r) for r in page.runs], "cursor": page.cursor}


METHODS = [MethodSpec("runs.list", RunsListParams, READ, list_runs)]
