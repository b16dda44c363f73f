"""`agents.list`, `models.list`, `tools.catalog`, `tools.invoke`: what the agent profiles configure."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from clawgate.agent.loop import ToolPolicy, cap_text, invoke_tool
from clawgate.agent.tools import ToolCallContext
from clawgate.agents.profiles import MAIN_AGENT, Profile
from clawgate.clip import clip
from clawgate.errors import InvalidRequest
from clawgate.ids import MAIN_SESSION
from clawgate.methods.spec import MethodSpec
from clawgate.protocol.constants import ADMIN, READ
from clawgate.protocol.schemas import AgentIdStr, EmptyParams, SessionKeyStr, _Params
from clawgate.providers.base import ToolCall
from clawgate.sessions.keys import agent_id_of

if TYPE_CHECKING:
    from clawgate.methods.context import Caller, Core


class ToolsCatalogParams(_Params):
    agent_id: AgentIdStr | None = None


class ToolsInvokeParams(_Params):
    tool: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    agent_id: AgentIdStr | None = None
    session_key: SessionKeyStr | None = None


async def agents_list(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    agents = []
    for profile in gw.runs.profiles:
        item: dict[str, Any] = {"id": profile.id}
        if profile.name:
            item["name"] = profile.name
        agents.append(item)
    return {"defaultId": MAIN_AGENT, "mainKey": "main", "scope": "per-sender", "agents": agents}


async def models_list(gw: Core, conn: Caller, req_id: str, params: EmptyParams) -> dict[str, Any]:
    """Every model a profile (or the gateway) runs on, with its fallbacks, once each."""
    seen: dict[str, dict[str, Any]] = {}
    default = getattr(gw.provider, "default_model", None) or gw.provider.name
    candidates: list[tuple[str, str]] = [(default, gw.settings.provider)]
    candidates += [(m, gw.settings.provider) for m in gw.settings.fallback_models]
    for profile in gw.runs.profiles:
        for model in (profile.model, *profile.fallback_models):
            if model:
                candidates.append((model, profile.provider))
    for model, provider in candidates:
        seen.setdefault(model, {"id": model, "name": model, "provider": provider})
    return {"models": list(seen.values())}


def _profile(gw: Core, agent_id: str | None, session_key: str | None) -> Profile:
    if agent_id is not None:
        return gw.runs.profiles.require(agent_id, "agentId")
    return gw.runs.profiles.require(agent_id_of(session_key or MAIN_SESSION), "sessionKey")


async def tools_catalog(gw: Core, conn: Caller, req_id: str, params: ToolsCatalogParams) -> dict[str, Any]:
    """The tools an agent is offered (its allowlist applied); MCP servers it names are started."""
    profile = _profile(gw, params.agent_id, None)
    tools = await gw.runs.tools_for(profile)
    return {
        "agentId": profile.id,
        "allow": list(profile.tools),
        "tools": [
            {
                "id": tool.spec.name,
                "name": tool.spec.name,
                "description": tool.spec.description,
                "source": tool.source,
                "scope": tool.scope,
                "parameters": tool.spec.parameters,
            }
            for tool in tools.values()
        ],
    }


async def tools_invoke(gw: Core, conn: Caller, req_id: str, params: ToolsInvokeParams) -> dict[str, Any]:
    return await invoke(gw, params, conn.grant.scopes if conn.grant else frozenset())


async def invoke(gw: Core, params: ToolsInvokeParams, scopes: frozenset[str]) -> dict[str, Any]:
    """`tools.invoke` and `POST /tools/invoke`: one call, under the agent's allowlist, timeout
    and result cap."""
    profile = _profile(gw, params.agent_id, params.session_key)
    tools = await gw.runs.tools_for(profile)
    tool = tools.get(params.tool)
    if tool is None:
        raise InvalidRequest(
            f"tool {clip(params.tool)!r} is not allowed for agent {profile.id!r}",
            details={"field": "tool", "agentId": profile.id},
        )
    key = params.session_key or f"agent:{profile.id}:main"
    ctx = ToolCallContext(
        run_id="",
        session_key=key,
        agent_id=profile.id,
        scopes=scopes,
    )
    policy = ToolPolicy(
        max_turns=1,
        timeout_s=profile.tool_timeout_s,
        result_max_bytes=profile.tool_result_max_bytes,
        sleep=gw.clock.sleep,
    )
    result = await invoke_tool(
        tool, ctx, ToolCall(id="invoke", name=params.tool, arguments=params.args), policy
    )
    text, truncated = cap_text(json.dumps(result, default=str), profile.tool_result_max_bytes)
    return {
        "ok": result.get("status") != "error",
        "tool": params.tool,
        "result": text if truncated else result,
        "truncated": truncated,
    }


METHODS = [
    MethodSpec("agents.list", EmptyParams, READ, agents_list),
    MethodSpec("models.list", EmptyParams, READ, models_list),
    MethodSpec("tools.catalog", ToolsCatalogParams, READ, tools_catalog),
    MethodSpec("tools.invoke", ToolsInvokeParams, ADMIN, tools_invoke),
]
