"""Parameter schemas of every method (msgspec structs, camelCase on the wire).

Unknown fields are ignored (OpenClaw clients send extras such as `deliver`);
known fields are validated strictly: no type coercion, bounded lengths.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

SESSION_KEY_PATTERN = r"^agent:[A-Za-z0-9_\-]{1,64}:(?!.*\.\.)[A-Za-z0-9_\-:.]{1,190}$"
SessionKeyStr = Annotated[str, msgspec.Meta(pattern=SESSION_KEY_PATTERN, max_length=256)]
AgentIdStr = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
IdemKey = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Label = Annotated[str, msgspec.Meta(max_length=256)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400 * 7)]


class _Params(msgspec.Struct, rename="camel", kw_only=True):
    pass


class ClientInfo(_Params):
    id: str = "unknown"
    version: str = "0"
    platform: str = "unknown"
    mode: str = "cli"
    display_name: str | None = None
    device_family: str | None = None
    instance_id: str | None = None


class AuthInfo(_Params):
    token: str | None = None
    password: str | None = None
    device_token: str | None = None
    bootstrap_token: str | None = None


class ConnectParams(_Params):
    min_protocol: int
    max_protocol: int
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)
    caps: list[str] = msgspec.field(default_factory=list)
    role: str = "operator"
    scopes: list[str] | None = None
    auth: AuthInfo | None = None
    device: dict[str, Any] | None = None  # checked by clawgate.protocol.device
    user_agent: str | None = None


class EmptyParams(_Params):
    pass


class AgentParams(_Params):
    message: Annotated[str, msgspec.Meta(max_length=400_000)]
    idempotency_key: IdemKey
    session_key: SessionKeyStr | None = None
    agent_id: AgentIdStr | None = None
    model: ModelName | None = None
    timeout: Seconds | None = None
    extra_system_prompt: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    label: Label | None = None
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # POSTed the final answer


class ChatSendParams(_Params):
    session_key: SessionKeyStr
    message: Annotated[str, msgspec.Meta(max_length=400_000)]
    idempotency_key: IdemKey
    timeout_ms: Annotated[int, msgspec.Meta(gt=0)] | None = None
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # POSTed the final answer


class WaitParams(_Params):
    run_id: IdemKey
    timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 30_000


class AbortParams(_Params):
    run_id: IdemKey


class ChatAbortParams(_Params):
    session_key: SessionKeyStr
    run_id: IdemKey | None = None


class HistoryParams(_Params):
    session_key: SessionKeyStr
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 200
    # The `nextCursor` of the previous page (older messages); OpenClaw names it the same.
    cursor: Annotated[str, msgspec.Meta(max_length=32)] | Annotated[int, msgspec.Meta(ge=0)] | None = None


class SessionsListParams(_Params):
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    active_minutes: Annotated[float, msgspec.Meta(gt=0)] | None = None
    prefix: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    agent_id: AgentIdStr | None = None  # only that agent's sessions (`agent:<id>:...`)


class SessionsPatchParams(_Params):
    key: SessionKeyStr
    label: Label | None = None
    # Absent: unchanged; null: back to the gateway's default model (OpenClaw's `/model default`).
    model: ModelName | msgspec.UnsetType | None = msgspec.UNSET
    budget_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None  # 0 removes the budget


class SessionKeyParams(_Params):
    key: SessionKeyStr


class Attachment(_Params):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    content: str
    encoding: Literal["utf8", "base64"] = "utf8"


class SpawnParams(_Params):
    session_key: SessionKeyStr
    task: Annotated[str, msgspec.Meta(min_length=1, max_length=400_000)]
    label: Label | None = None
    agent_id: AgentIdStr | None = None
    model: ModelName | None = None
    run_timeout_seconds: Seconds | None = None
    mode: Literal["run", "session"] = "run"
    cleanup: Literal["keep", "delete"] = "keep"
    attachments: list[Attachment] | None = None
    idempotency_key: IdemKey | None = None
    webhook: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # POSTed the final answer


class SubagentsListParams(_Params):
    session_key: SessionKeyStr | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500


class SubscribeParams(_Params):
    session_keys: Annotated[list[SessionKeyStr], msgspec.Meta(max_length=1000)] | None = None
    all: bool = False


# --- the session and catalog methods of OpenClaw's interactive clients -------------------
# A key as OpenClaw clients send it: a full `agent:<id>:<rest>` key, or just `<rest>`,
# which belongs to `agentId` (default `main`); see `clawgate.sessions.keys.qualify`.
LooseSessionKey = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class SessionsDescribeParams(_Params):
    key: LooseSessionKey
    agent_id: AgentIdStr | None = None


class SessionsCreateParams(_Params):
    key: LooseSessionKey | None = None
    agent_id: AgentIdStr | None = None
    label: Label | None = None
    model: ModelName | None = None


class SessionsResolveParams(_Params):
    key: LooseSessionKey | None = None
    session_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    label: Label | None = None
    agent_id: AgentIdStr | None = None


class IdParams(_Params):
    """`question.get` / `question.resolve` / `plugin.approval.resolve`: one record id."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ArtifactParams(_Params):
    artifact_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


def to_wire(obj: msgspec.Struct) -> Any:
    return msgspec.to_builtins(obj)


class SessionsCleanupParams(_Params):
    """`sessions.cleanup`: run retention now; `dryRun` reports without deleting."""

    dry_run: bool = False


RunsListStatus = Literal["queued", "running", "ok", "error", "timeout", "aborted", "active", "finished"]


class RunsListParams(_Params):
    """`runs.list`: one bounded page of runs, newest first; `cursor` comes from the previous page."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 50
    cursor: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    status: RunsListStatus | None = None
    session_key: SessionKeyStr | None = None
    run_id_prefix: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    label: Label | None = None
