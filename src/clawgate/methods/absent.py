"""OpenClaw features clawgate does not have: agent questions, plugin approvals, artifacts.

Nothing here ever creates a question, an approval or an artifact, so the lists are
always empty and a lookup of one id is always `NOT_FOUND`. Answering (instead of
"unknown method") lets OpenClaw's interactive clients start without an error line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clawgate.errors import NotFound
from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import READ, WRITE
from clawgate.protocol.schemas import ArtifactParams, EmptyParams, IdParams

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core


async def list_questions(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    return {"questions": []}


async def get_question(gw: Core, conn: Caller, req_id: str, params: IdParams) -> dict[str, Any]:
    raise NotFound(f"unknown question {params.id}", details={"id": params.id})


async def list_plugin_approvals(
    gw: Core, conn: Caller, req_id: str, params: EmptyParams
) -> list[dict[str, Any]]:
    # OpenClaw answers this one with a bare array.
    return []


async def resolve_plugin_approval(gw: Core, conn: Caller, req_id: str, params: IdParams) -> dict[str, Any]:
    raise NotFound(f"unknown plugin approval {params.id}", details={"id": params.id})


async def download_artifact(gw: Core, conn: Caller, req_id: str, params: ArtifactParams) -> dict[str, Any]:
    raise NotFound(f"unknown artifact {params.artifact_id}", details={"artifactId": params.artifact_id})


METHODS = [
    MethodSpec("question.list", EmptyParams, READ, list_questions),
    MethodSpec("question.get", IdParams, READ, get_question),
    MethodSpec("question.resolve", IdParams, WRITE, get_question),
    MethodSpec("plugin.approval.list", EmptyParams, READ, list_plugin_approvals),
    MethodSpec("plugin.approval.resolve", IdParams, WRITE, resolve_plugin_approval),
    MethodSpec("artifacts.download", ArtifactParams, READ, download_artifact),
]
