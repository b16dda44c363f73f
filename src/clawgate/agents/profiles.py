"""Agent profiles resolved from the settings: `[agents.<id>]`, with `main` always present.

Pure data, built once at start: a system prompt file is read here, so a missing file fails
the start rather than the first run of that agent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path

from clawgate.clip import clip
from clawgate.errors import InvalidRequest
from clawgate.settings import AgentProfile, Settings

MAIN_AGENT = "main"


@dataclass(frozen=True)
class Profile:
    id: str
    name: str | None
    provider: str
    model: str | None
    fallback_models: tuple[str, ...]
    system_prompt: str | None
    tools: tuple[str, ...]
    max_turns: int
    max_tool_calls: int
    tool_timeout_s: float
    tool_result_max_bytes: int
    max_spawn_depth: int
    max_children_per_agent: int

    def allows(self, tool: str) -> bool:
        """Denied unless a pattern names it: `name`, `server.tool`, `server.*` (or `prefix*`)."""
        return any(fnmatchcase(tool, pattern) for pattern in self.tools)

    def mcp_servers(self) -> frozenset[str]:
        """The MCP servers this profile's allowlist reaches into (`server.tool`, `server.*`)."""
        return self._mcp_servers

    @cached_property
    def _mcp_servers(self) -> frozenset[str]:
        return frozenset(pattern.split(".", 1)[0] for pattern in self.tools if "." in pattern)


def resolve(agent_id: str, cfg: AgentProfile, settings: Settings) -> Profile:
    prompt = cfg.system_prompt
    if cfg.system_prompt_file is not None:
        prompt = Path(cfg.system_prompt_file).expanduser().read_text(encoding="utf-8")
    return Profile(
        id=agent_id,
        name=cfg.name,
        provider=cfg.provider or settings.provider,
        model=cfg.model,
        fallback_models=tuple(cfg.fallback_models),
        system_prompt=prompt,
        tools=tuple(cfg.tools),
        max_turns=cfg.max_turns if cfg.max_turns is not None else settings.max_tool_rounds + 1,
        max_tool_calls=cfg.max_tool_calls,
        tool_timeout_s=cfg.tool_timeout_s,
        tool_result_max_bytes=cfg.tool_result_max_bytes,
        max_spawn_depth=cfg.max_spawn_depth or settings.max_spawn_depth,
        max_children_per_agent=cfg.max_children_per_agent or settings.max_children_per_agent,
    )


class Profiles:
    """The configured agents, by id."""

    def __init__(self, settings: Settings) -> None:
        configs = dict(settings.agents)
        configs.setdefault(MAIN_AGENT, AgentProfile())
        self.by_id: dict[str, Profile] = {
            agent_id: resolve(agent_id, cfg, settings) for agent_id, cfg in configs.items()
        }
        for profile in self.by_id.values():
            unknown = sorted(profile.mcp_servers() - set(settings.mcp_servers))
            if unknown:
                raise ValueError(f"agent {profile.id!r} allows tools of unknown MCP servers {unknown}")

    def get(self, agent_id: str) -> Profile | None:
        return self.by_id.get(agent_id)

    def require(self, agent_id: str, field: str) -> Profile:
        """The profile, or INVALID_REQUEST naming the request field that carried the id."""
        profile = self.by_id.get(agent_id)
        if profile is None:
            raise InvalidRequest(
                f"unknown agent {clip(agent_id)!r} (configured: {', '.join(sorted(self.by_id))})",
                details={"field": field, "agentId": clip(agent_id)},
            )
        return profile

    def ids(self) -> list[str]:
        return sorted(self.by_id)

    def __iter__(self) -> Iterator[Profile]:
        return iter(self.by_id.values())
